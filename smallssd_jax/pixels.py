"""Pixel preprocessing inside the jitted steps: photometric distortion and normalisation.

With `data.pixels_on_device` (the default) the input pipeline sends uint8 RGB
images, the photometric parameters it drew for each image and the rectangle
of the image that holds image pixels (the rest is the zoom-out fill), and the
train / eval steps turn them into the model's float input here. The host then
does only what needs the source image (decode, the one geometric resample),
and a batch crosses to the device in a quarter of the bytes.

The arithmetic is Caffe's on 8-bit images, exactly as the host path
(datasets/augment.py `apply_pixel_ops`): every op rounds half up and
saturates to 0..255; saturation and hue share one HSV round trip (here with
the exact hue formula; the host path looks it up in a table, within half a
level). Float batches (the host path) pass through unchanged.

One photometric stage is Caffe's DistortImage: five values
`[brightness delta, contrast gain before, saturation gain, hue delta (OpenCV
8-bit units, 2 degrees), contrast gain after]`, the identity being
`IDENTITY_STAGE` (datasets/augment.py `stage_vector`); a batch carries
`photometric` float32 [B, n_stages, 5] and `image_region` int32 [B, 4]
`(row0, row1, col0, col1)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PixelConfig(NamedTuple):
  """Normalisation of the model input: `(x[..., ::-1] if bgr else x) - mean) / std`."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  bgr: bool

  @classmethod
  def from_data_config(cls, data_cfg) -> 'PixelConfig':
    return cls(tuple(float(v) for v in data_cfg.mean), tuple(float(v) for v in data_cfg.std),
               bool(data_cfg.bgr))


def _round_u8(x: jax.Array) -> jax.Array:
  """OpenCV's saturate_cast<uchar> for x >= -0.5: round half up, clip to 0..255."""
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def adjust_hsv(image: jax.Array, saturation: jax.Array, hue: jax.Array) -> jax.Array:
  """Saturation gain and hue shift (OpenCV 8-bit units) of float RGB 0..255, rounded.

  `saturation` and `hue` broadcast against image[..., 0]. The chroma C = V - min
  becomes min(C * saturation, V) (S clipped to 1), the hue H (in sextants)
  moves by hue / 30, and each channel is V - C' * clip(min(k, 4 - k), 0, 1)
  with k = (n + H) mod 6, n = 5, 3, 1 for R, G, B.
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), b)
  chroma = v - jnp.minimum(jnp.minimum(r, g), b)
  grey = chroma == 0
  safe = jnp.where(grey, 1.0, chroma)
  hc = jnp.where(r == v, g - b, jnp.where(g == v, b - r + 2.0 * chroma, r - g + 4.0 * chroma))
  h = jnp.where(grey, 0.0, hc / safe) + hue / 30.0
  new_chroma = jnp.minimum(chroma * saturation, v)
  out = []
  for n in (5.0, 3.0, 1.0):
    k = jnp.mod(n + h, 6.0)
    out.append(v - new_chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return _round_u8(jnp.stack(out, -1))


def _per_image(values: jax.Array) -> jax.Array:
  return values[:, None, None, None]


def photometric(images: jax.Array, stages: jax.Array, region: jax.Array) -> jax.Array:
  """Caffe's photometric distortion of float images [B, H, W, 3] holding 0..255 integers.

  Args:
    images: RGB, float32.
    stages: [B, n_stages, 5] (module docstring), applied in order.
    region: [B, 4] int (row0, row1, col0, col1): only these pixels are distorted
      (outside them lies the zoom-out fill, which stays the mean colour).
  Returns:
    float32 images, still integers in 0..255.
  """
  x = images
  for s in range(stages.shape[1]):
    brightness, contrast_a, sat, hue, contrast_b = (stages[:, s, i] for i in range(5))
    x = jnp.where(_per_image(brightness != 0.0), _round_u8(x + _per_image(brightness)), x)
    x = jnp.where(_per_image(contrast_a != 1.0), _round_u8(x * _per_image(contrast_a)), x)
    hsv = (sat != 1.0) | (hue != 0.0)
    x = jnp.where(_per_image(hsv), adjust_hsv(x, sat[:, None, None], hue[:, None, None]), x)
    x = jnp.where(_per_image(contrast_b != 1.0), _round_u8(x * _per_image(contrast_b)), x)
  _, height, width, _ = images.shape
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  r0, r1, c0, c1 = (region[:, i][:, None, None, None] for i in range(4))
  inside = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
  return jnp.where(inside, x, images)


def normalize(images: jax.Array, cfg: PixelConfig) -> jax.Array:
  """Float RGB 0..255 -> the model's input (channel order and mean / std of `cfg`)."""
  if cfg.bgr:
    images = images[..., ::-1]
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)
  out = images - mean
  if any(s != 1.0 for s in cfg.std):
    out = out / std
  return out


def model_input(batch: dict[str, jax.Array], cfg: PixelConfig) -> jax.Array:
  """The float32 model input of a batch: uint8 images are distorted (when the batch
  carries `photometric`) and normalised; float images are already the input."""
  images = batch['image']
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32)
  if 'photometric' in batch:
    x = photometric(x, batch['photometric'], batch['image_region'])
  return normalize(x, cfg)
