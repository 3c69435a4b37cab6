"""Photometric distortion with Caffe's 8-bit semantics: drawn here, applied after the resample.

The `photometric` op samples Caffe's DistortImage where it stands in
`data.augment`; the distortion is pointwise, so it commutes with the geometry
and is applied to the (much smaller) resampled image, on the pixels that come
from the image only (the zoom-out fill stays the undistorted mean colour, as
in Caffe). On the device-pixels batch layout (batch_layout.py) the draw
travels with the uint8 batch as a stage vector and the jitted step applies it
(pixels.py); on the host layout `resize` applies it here. The arithmetic is
Caffe's on 8-bit images (OpenCV `convertTo` with rounding and saturation):
brightness `x + delta`, contrast `x * alpha`, saturation `S * k` in HSV, hue
`H + delta` in OpenCV's 8-bit hue units (2 degrees). Hue and saturation run
in one vectorised float32 HSV round trip (exact HSV, within half a level of a
float reference) instead of Caffe's two 8-bit ones, and the hue wraps around
instead of saturating. No random channel swap (Caffe's SSD recipe sets its
probability to 0).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from PIL import Image

from smallssd_jax.batch_layout import IDENTITY_STAGE
from smallssd_jax.datasets import records

Example = records.Example

def sample_photometric(rng: np.random.Generator, *, prob: float = 0.5,
                       brightness_delta: float = 32.0,
                       contrast: Sequence[float] = (0.5, 1.5),
                       saturation: Sequence[float] = (0.5, 1.5),
                       hue_delta: float = 18.0) -> list[tuple[str, float]]:
  """Caffe's DistortImage draws: a list of (op, value) in application order.

  Brightness first; then contrast before (p = 0.5) or after the saturation
  and hue ops; each applied with probability `prob`.
  """
  contrast_first = rng.random() > 0.5
  ops: list[tuple[str, float]] = []

  def maybe(name: str, lo: float, hi: float) -> None:
    if rng.random() < prob:
      ops.append((name, float(rng.uniform(lo, hi))))

  maybe('brightness', -brightness_delta, brightness_delta)
  if contrast_first:
    maybe('contrast', contrast[0], contrast[1])
  maybe('saturation', saturation[0], saturation[1])
  maybe('hue', -hue_delta, hue_delta)
  if not contrast_first:
    maybe('contrast', contrast[0], contrast[1])
  return ops


def stage_vector(ops: Sequence[tuple[str, float]]) -> np.ndarray:
  """A `sample_photometric` list as a stage (float32 [5]).

  Contrast takes the 'before' slot when it precedes the HSV ops in `ops` (or
  when there are none: brightness then contrast either way).
  """
  stage = np.array(IDENTITY_STAGE, np.float32)
  seen_hsv = False
  for name, value in ops:
    if name == 'brightness':
      stage[0] = value
    elif name == 'contrast':
      stage[4 if seen_hsv else 1] = value
    elif name in ('saturation', 'hue'):
      stage[2 if name == 'saturation' else 3] = value
      seen_hsv = True
    else:
      raise ValueError(f'unknown pixel op {name!r}')
  return stage


def photometric(example: Example, rng: np.random.Generator, *, on_device: bool = False,
                **kwargs) -> Example:
  """Samples Caffe's photometric distortion.

  On the host path `resize` applies it (`pixel_ops`); with `on_device` the
  draw is kept as a stage in `photometric_stages` for the jitted step
  (pixels.py) and `resize` leaves the pixels alone.
  """
  example = dict(example)
  ops = sample_photometric(rng, **kwargs)
  if on_device:
    example['photometric_stages'] = list(example.get('photometric_stages', [])) + [
        stage_vector(ops)]
  else:
    example['pixel_ops'] = list(example.get('pixel_ops', [])) + ops
  return example


def _lut(name: str, value: float) -> np.ndarray:
  x = np.arange(256, dtype=np.float64)
  y = x + value if name == 'brightness' else x * value
  # OpenCV's saturate_cast rounds half away from zero; values are >= 0 here.
  return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def _round_u8(x: np.ndarray) -> np.ndarray:
  # HSV results lie in [0, V] with V <= 255 (up to float error), so rounding
  # half up is a truncation of x + 0.5 with no clipping needed.
  x += 0.5
  return x.astype(np.uint8)


# Hue resolution of the table lookup: 256 steps per sextant (0.23 degrees,
# finer than OpenCV's 8-bit hue of 2 degrees); at most 0.5 levels of error.
_HUE_STEPS = 256


@functools.lru_cache(maxsize=1)
def _hue_tables() -> np.ndarray:
  """g_n(h) = clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1 (R, G, B).

  Indexed by round((h + 1) * _HUE_STEPS) + shift for h in [-1, 5] and a shift
  in [0, 6) sextants, i.e. over [0, 12 * _HUE_STEPS].
  """
  h = np.arange(12 * _HUE_STEPS + 1, dtype=np.float64) / _HUE_STEPS - 1.0
  k = np.mod(np.array([5.0, 3.0, 1.0])[:, None] + h[None, :], 6.0)
  return np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0).astype(np.float32)


def adjust_hsv_planes(r: np.ndarray, g: np.ndarray, b: np.ndarray, saturation: float = 1.0,
                      hue: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """HSV saturation scale and hue shift on float32 channel planes (0..255).

  V = max, chroma C = V - min (S = C / V); the new chroma is min(C * k, V)
  (S clipped to 1) and the hue H (in sextants) moves by `hue` OpenCV 8-bit
  units (2 degrees, 30 per sextant), wrapping around. RGB comes back as
  `V - C' * g_n(H)` (`_hue_tables`).
  """
  v = np.maximum(np.maximum(r, g), b)
  chroma = v - np.minimum(np.minimum(r, g), b)
  with np.errstate(divide='ignore', invalid='ignore'):
    if hue == 0.0:
      # Saturation only: every channel moves towards V, c' = V - (V - c) * f,
      # with f = k unless that would push the minimum below 0 (S > 1).
      # fmin: grey pixels (chroma 0, and 0 / 0 for black) keep f = k, moving nowhere.
      f = np.fmin(np.float32(saturation), v / chroma)
      return tuple(v - (v - c) * f for c in (r, g, b))
    # H * C by the max channel's sextant formula, then one division.
    hc = np.where(r == v, g - b, np.where(g == v, b - r + 2.0 * chroma, r - g + 4.0 * chroma))
    hc *= np.float32(_HUE_STEPS) / chroma   # -> H * _HUE_STEPS in [-steps, 5 * steps]
  hc[chroma == 0] = 0.0
  shift = int(round(hue / 30.0 * _HUE_STEPS)) % (6 * _HUE_STEPS)
  hc += np.float32(_HUE_STEPS + shift + 0.5)
  index = hc.astype(np.int32)
  if saturation != 1.0:
    chroma = np.minimum(chroma * np.float32(saturation), v)
  tables = _hue_tables()
  return tuple(v - chroma * np.take(tables[n], index) for n in range(3))


def adjust_hsv(image: np.ndarray, saturation: float = 1.0, hue: float = 0.0) -> np.ndarray:
  """`adjust_hsv_planes` on a uint8 [H, W, 3] RGB image; returns uint8 RGB."""
  planes = [image[..., c].astype(np.float32) for c in range(3)]
  out = adjust_hsv_planes(*planes, saturation=saturation, hue=hue)
  return np.stack([_round_u8(c) for c in out], -1)


def _adjust_hsv_pil(image: Image.Image, saturation: float, hue: float) -> Image.Image:
  # PIL splits and merges channel planes in C, far cheaper than numpy's
  # strided [..., c] views on interleaved RGB.
  planes = [np.asarray(band, dtype=np.float32) for band in image.split()]
  out = adjust_hsv_planes(*planes, saturation=saturation, hue=hue)
  return Image.merge('RGB', [Image.fromarray(_round_u8(c)) for c in out])


def apply_pixel_ops(image: Image.Image | np.ndarray,
                    ops: Sequence[tuple[str, float]]) -> Image.Image | np.ndarray:
  """Applies (op, value) pairs from `sample_photometric` to an RGB image, in order.

  Takes and returns uint8 RGB as PIL or numpy (same type back). Runs of
  brightness / contrast become one composed lookup table (exactly Caffe's
  sequence of rounded 8-bit results); saturation and hue next to each other
  share one HSV round trip.
  """
  as_array = isinstance(image, np.ndarray)
  pil = Image.fromarray(image) if as_array else image
  i = 0
  while i < len(ops):
    name = ops[i][0]
    if name in ('brightness', 'contrast'):
      lut = np.arange(256, dtype=np.uint8)
      while i < len(ops) and ops[i][0] in ('brightness', 'contrast'):
        lut = _lut(*ops[i])[lut]
        i += 1
      pil = pil.point(np.tile(lut, 3).tolist())
    elif name in ('saturation', 'hue'):
      sat, hue = 1.0, 0.0
      while i < len(ops) and ops[i][0] in ('saturation', 'hue'):
        if ops[i][0] == 'saturation':
          sat *= ops[i][1]
        else:
          hue += ops[i][1]
        i += 1
      pil = _adjust_hsv_pil(pil, sat, hue)
    else:
      raise ValueError(f'unknown pixel op {name!r}')
  return np.asarray(pil) if as_array else pil


