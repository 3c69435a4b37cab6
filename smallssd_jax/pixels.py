"""Pixel preprocessing inside the jitted steps: resample, photometric distortion, normalisation.

What a batch carries is fixed by its layout (batch_layout.py), resolved once
from the config: `model_input(batch, spec, train)` turns a batch of
`spec.layout(train)` into the model's float32 input. The host then does only
what needs the source image (decode, the one geometric resample, or on the
`RESAMPLE` layout not even that), and a batch crosses to the device as uint8.

The arithmetic is Caffe's on 8-bit images, exactly as the host path
(datasets/photometric.py `apply_pixel_ops`): every op rounds half up and
saturates to 0..255; saturation and hue share one HSV round trip (here with
the exact hue formula; the host path looks it up in a table, within half a
level).

One photometric stage is Caffe's DistortImage: five values `[brightness
delta, contrast gain before, saturation gain, hue delta (OpenCV 8-bit units,
2 degrees), contrast gain after]`, the identity being
`batch_layout.IDENTITY_STAGE`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smallssd_jax.batch_layout import InputSpec
from smallssd_jax.batch_layout import Layout


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


def _inside(region: jax.Array, height: int, width: int) -> jax.Array:
  """[B, H, W, 1] mask of the pixels in region [B, 4] (row0, row1, col0, col1)."""
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  r0, r1, c0, c1 = (region[:, i][:, None, None, None] for i in range(4))
  return (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)


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
  return jnp.where(_inside(region, *images.shape[1:3]), x, images)


def resample_weights(lo: jax.Array, hi: jax.Array, mirrored: jax.Array, length: jax.Array,
                     canvas: int, size: int) -> jax.Array:
  """PIL's antialiased bilinear coefficients along one axis, per image: [B, size, canvas].

  Output pixel i shows the source interval [lo, hi] (normalised, lo < hi) at
  i (or size - 1 - i when `mirrored`); its centre in source pixels is
  c = length * (lo + (i + 1/2) * (hi - lo) / size) and, with the scale
  s = length * (hi - lo) / size, source pixel j (centre j + 1/2, j < length)
  weighs max(0, 1 - |j + 1/2 - c| / max(s, 1)), normalised to sum 1 (PIL's
  `precompute_coeffs` with its bilinear filter). Rows without a source pixel
  in reach are zero (they lie outside the image region).
  """
  f32 = jnp.float32
  lo, hi, length = (jnp.asarray(v, f32)[:, None] for v in (lo, hi, length))
  scale = length * (hi - lo) / size  # source pixels per output pixel
  i = jnp.arange(size, dtype=f32)[None, :]
  i = jnp.where(jnp.asarray(mirrored)[:, None], size - 1 - i, i)
  centre = length * lo + (i + 0.5) * scale
  support = jnp.maximum(scale, 1.0)[..., None]
  j = jnp.arange(canvas, dtype=f32)[None, None, :]
  w = jnp.maximum(0.0, 1.0 - jnp.abs(j + 0.5 - centre[..., None]) / support)
  w = jnp.where(j < length[..., None], w, 0.0)
  total = jnp.sum(w, -1, keepdims=True)
  return w / jnp.where(total > 0, total, 1.0)


def resample(source: jax.Array, source_size: jax.Array, window: jax.Array,
             region: jax.Array, size: int, fill: tuple[float, ...]) -> jax.Array:
  """The train pipeline's `resize` (datasets/resize.py) on the device.

  Args:
    source: uint8 [B, Hc, Wc, 3], each source image in the top-left corner.
    source_size: [B, 2] int, the images' (height, width) in the canvas.
    window: [B, 4] float, normalised `[y0, x0, y1, x1]` of the source shown
      by the output (y0 > y1 / x0 > x1: mirrored).
    region: [B, 4] int (row0, row1, col0, col1), the output pixels that lie
      on the image; the rest is `fill`.
  Returns:
    float32 [B, size, size, 3] holding integers 0..255: PIL's two passes
    (horizontal, then vertical), each rounded to 8 bits as PIL does, so the
    result is the host path's up to PIL's fixed-point coefficients.
  """
  _, hc, wc, _ = source.shape
  window = window.astype(jnp.float32)
  size_f = source_size.astype(jnp.float32)
  wy = resample_weights(jnp.minimum(window[:, 0], window[:, 2]),
                        jnp.maximum(window[:, 0], window[:, 2]), window[:, 0] > window[:, 2],
                        size_f[:, 0], hc, size)
  wx = resample_weights(jnp.minimum(window[:, 1], window[:, 3]),
                        jnp.maximum(window[:, 1], window[:, 3]), window[:, 1] > window[:, 3],
                        size_f[:, 1], wc, size)
  hp = jax.lax.Precision.HIGHEST
  x = source.astype(jnp.float32)
  x = _round_u8(jnp.einsum('bjx,byxc->byjc', wx, x, precision=hp))
  x = _round_u8(jnp.einsum('biy,byjc->bijc', wy, x, precision=hp))
  return jnp.where(_inside(region, size, size), x, jnp.asarray(fill, jnp.float32))


def normalize(images: jax.Array, spec: InputSpec) -> jax.Array:
  """Float RGB 0..255 -> the model's input (channel order and mean / std of `spec`)."""
  if spec.bgr:
    images = images[..., ::-1]
  out = images - jnp.asarray(spec.mean, jnp.float32)
  if any(s != 1.0 for s in spec.std):
    out = out / jnp.asarray(spec.std, jnp.float32)
  return out


def model_input(batch: dict[str, jax.Array], spec: InputSpec, train: bool) -> jax.Array:
  """The float32 model input of a batch of layout `spec.layout(train)` (batch_layout.py)."""
  layout = spec.layout(train)
  images = batch['image']
  if layout == Layout.HOST:
    return images                       # the host made the model input
  if images.dtype != jnp.uint8:
    raise ValueError(f'a {layout.value!r}-layout batch holds uint8 images, got {images.dtype}')
  if layout == Layout.RESAMPLE:
    x = resample(images, batch['source_size'], batch['window'], batch['image_region'],
                 spec.size, spec.fill)
  else:
    x = images.astype(jnp.float32)
  if train:
    x = photometric(x, batch['photometric'], batch['image_region'])
  return normalize(x, spec)
