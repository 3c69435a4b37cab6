"""SSD training augmentation with the original Caffe semantics (docs/design.md §3).

Every op is a small function `op(example, rng) -> example` over the whole
example dict {image, boxes, labels, ignore, ...} (records.py), so pixels and
boxes can never drift apart; `data.augment` lists the ops of a training run
and `train_ops` / `eval_ops` build them from the config. Boxes are always
`[ymin, xmin, ymax, xmax]` normalised to the example's current frame.

One resample per image. Caffe expands (zoom-out), crops and resizes the image
in three steps; here the geometric ops only update `example['window']`, the
region of the *source* image (normalised source coordinates `[y0, x0, y1,
x1]`, x0 > x1 when mirrored, outside [0, 1] where a zoom-out canvas reaches
beyond the image) that the current frame shows, and move the boxes. `resize`
then realises the window in a single PIL resample from the decoded source to
the input size, filling the area outside the image with the mean colour; a
JPEG is first decoded at the smallest DCT scale that still covers the window
(`Image.draft`), so a 4x zoom-out decodes at 1/2 or 1/4 size. Geometrically
this is exactly Caffe's expand -> crop -> resize (composition of axis-aligned
affine maps), up to interpolation. The resize is PIL's bilinear (antialiased
when shrinking); `data.resize_method` 'nearest' is cheaper, 'opencv' is
OpenCV's INTER_LINEAR (what Caffe uses, about twice as fast as PIL's; the
`opencv` extra) and 'random' draws Caffe's per-image interpolation (linear,
area, nearest, cubic, Lanczos).

Photometric distortion is pointwise, so it commutes with the geometry: the
`photometric` op samples Caffe's parameters where it stands in the list and
they are applied to the (much smaller) resampled image, on the pixels that
come from the image only, so the zoom-out fill stays the undistorted mean
colour as in Caffe. With `data.pixels_on_device` (the default) the
draw travels with the uint8 batch and the jitted step applies it and
normalises (pixels.py); otherwise `resize` applies it here and `normalize`
makes the float32 input on the host. The arithmetic is Caffe's on 8-bit
images (OpenCV `convertTo` with rounding and saturation): brightness
`x + delta`, contrast
`x * alpha` (a gain, as in Caffe), saturation `S * k` in HSV, hue `H + delta`
in OpenCV's 8-bit hue units (2 degrees; delta 18 = 36 degrees). Hue and
saturation run in one vectorised float32 HSV round trip (exact HSV, within
half a level of a float reference) instead of Caffe's two 8-bit ones, and the
hue wraps around instead of saturating at 0 / 255 (OpenCV's 8-bit quirk, which
keeps hues near 0 from turning further down). No random channel swap (Caffe's
SSD recipe sets its probability to 0).

The min-IoU crop follows Caffe's `batch_sampler`s: the whole image, five
samplers with min IoU 0.1 .. 0.9, one unconstrained; each draws up to
`max_trials` crops of scale s in [0.3, 1] (area s^2) and normalised aspect
ratio w / h in [max(0.5, s^2), min(2, 1 / s^2)], keeps its first crop that
satisfies its constraint for ANY ground-truth box, and one of the found crops
(the whole image always qualifies) is chosen uniformly. Boxes whose centres
lie inside the crop are kept and clipped to it. All trials are drawn and
scored at once (vectorised), so rng consumption differs from Caffe's but the
distribution is the same.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from smallssd_jax import config_lib
from smallssd_jax.datasets import records

Example = records.Example
Op = Callable[[Example, np.random.Generator | None], Example]

IDENTITY_WINDOW = np.array([0.0, 0.0, 1.0, 1.0])
_EPS = 1e-6


def _window(example: Example) -> np.ndarray:
  return np.asarray(example.get('window', IDENTITY_WINDOW), np.float64)


def _select(example: Example, keep: np.ndarray) -> Example:
  for key in records.PER_BOX_KEYS:
    if key in example:
      example[key] = example[key][keep]
  return example


# ---------------------------------------------------------------------------
# Geometry: each op moves the boxes and the window, no pixels yet.
# ---------------------------------------------------------------------------


def reframe(example: Example, region: Sequence[float]) -> Example:
  """Makes `region` (yxyx in current frame coordinates) the new frame.

  Boxes are mapped into the new frame and not filtered; a region larger than
  [0, 1] (zoom-out) shows the mean-colour canvas around the image.
  """
  example = dict(example)
  ry0, rx0, ry1, rx1 = (float(v) for v in region)
  wy0, wx0, wy1, wx1 = _window(example)
  example['window'] = np.array([
      wy0 + ry0 * (wy1 - wy0), wx0 + rx0 * (wx1 - wx0),
      wy0 + ry1 * (wy1 - wy0), wx0 + rx1 * (wx1 - wx0)])
  scale = np.array([ry1 - ry0, rx1 - rx0, ry1 - ry0, rx1 - rx0])
  offset = np.array([ry0, rx0, ry0, rx0])
  example['boxes'] = ((example['boxes'] - offset) / scale).astype(np.float32).reshape(-1, 4)
  return example


def crop(example: Example, region: Sequence[float]) -> Example:
  """Crops to `region` (yxyx, current frame, inside [0, 1]), Caffe's centre rule.

  Keeps the boxes whose centres lie inside the region (inclusive), clips them
  to it and drops any that become empty.
  """
  boxes = example['boxes']
  ry0, rx0, ry1, rx1 = (float(v) for v in region)
  cy = (boxes[:, 0] + boxes[:, 2]) / 2
  cx = (boxes[:, 1] + boxes[:, 3]) / 2
  inside = (cy >= ry0) & (cy <= ry1) & (cx >= rx0) & (cx <= rx1)
  example = reframe(_select(dict(example), inside), region)
  clipped = np.clip(example['boxes'], 0.0, 1.0)
  nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  example['boxes'] = clipped
  return _select(example, nonempty)


def hflip(example: Example) -> Example:
  """Mirrors left-right: x -> 1 - x for boxes and window."""
  example = dict(example)
  b = example['boxes']
  example['boxes'] = np.stack([b[:, 0], 1.0 - b[:, 3], b[:, 2], 1.0 - b[:, 1]], 1).astype(
      np.float32).reshape(-1, 4)
  w = _window(example)
  example['window'] = np.array([w[0], w[3], w[2], w[1]])
  return example


def flip(example: Example, rng: np.random.Generator, *, prob: float = 0.5) -> Example:
  """Horizontal flip with probability `prob`."""
  return hflip(example) if rng.random() < prob else example


def zoom_out(example: Example, rng: np.random.Generator, *, max_ratio: float = 4.0,
             prob: float = 0.5) -> Example:
  """Caffe's expansion: with probability `prob`, put the image at a random place
  on a canvas `ratio` in U(1, max_ratio) times its size, filled with the mean
  colour (the fill is painted by `resize`)."""
  if rng.random() >= prob:
    return example
  ratio = rng.uniform(1.0, max_ratio)
  if ratio - 1.0 < 1e-2:  # Caffe skips negligible expansions too
    return example
  oy, ox = rng.uniform(0.0, ratio - 1.0, 2)
  return reframe(example, (-oy, -ox, ratio - oy, ratio - ox))


def iou_yxyx(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of normalised yxyx boxes a [N, 4] and b [M, 4] -> [N, M] (continuous)."""
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def sample_min_iou_crop(boxes: np.ndarray, rng: np.random.Generator, *,
                        min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                        max_trials: int = 50, scale: Sequence[float] = (0.3, 1.0),
                        aspect: Sequence[float] = (0.5, 2.0)) -> np.ndarray:
  """Caffe's 7 batch samplers; returns the chosen crop, yxyx normalised.

  Args:
    boxes: ground truth [N, 4] `[ymin, xmin, ymax, xmax]` normalised (all of
      them, ignored ones included, as Caffe's annotated datum holds them).
  """
  found = [IDENTITY_WINDOW]  # the whole-image sampler (scale 1, no constraint)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(boxes):
    # Samplers: one per min IoU, then the unconstrained one (Caffe's
    # max_jaccard_overlap 1.0: any crop, as long as there is a box).
    bounds = np.array(list(min_ious) + [-1.0])
    k, t = len(bounds), int(max_trials)
    s = rng.uniform(scale[0], scale[1], (k, t))
    ar_lo = np.maximum(aspect[0], s ** 2)
    ar_hi = np.minimum(aspect[1], 1.0 / s ** 2)
    ar = ar_lo + rng.random((k, t)) * (ar_hi - ar_lo)
    w = np.minimum(s * np.sqrt(ar), 1.0)
    h = np.minimum(s / np.sqrt(ar), 1.0)
    x0 = rng.random((k, t)) * (1.0 - w)
    y0 = rng.random((k, t)) * (1.0 - h)
    crops = np.stack([y0, x0, y0 + h, x0 + w], -1)
    best = iou_yxyx(crops.reshape(-1, 4), boxes).max(1).reshape(k, t)
    ok = best >= bounds[:, None]
    for sampler in range(k):
      hits = np.flatnonzero(ok[sampler])
      if hits.size:
        found.append(crops[sampler, hits[0]])
  return np.asarray(found[int(rng.integers(len(found)))], np.float64)


def min_iou_crop(example: Example, rng: np.random.Generator, **sampler_kwargs) -> Example:
  """Random crop by Caffe's min-IoU samplers (see `sample_min_iou_crop`)."""
  region = sample_min_iou_crop(example['boxes'], rng, **sampler_kwargs)
  if np.array_equal(region, IDENTITY_WINDOW):
    return example
  return crop(example, region)


# ---------------------------------------------------------------------------
# Photometric distortion: sampled here, applied by `resize` (pointwise ops).
# ---------------------------------------------------------------------------


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


# One DistortImage draw as the device path's fixed-size stage (pixels.py):
# [brightness delta, contrast gain before HSV, saturation gain, hue delta,
# contrast gain after HSV].
IDENTITY_STAGE = (0.0, 1.0, 1.0, 0.0, 1.0)


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


# ---------------------------------------------------------------------------
# Realisation: one resample, then the pending pixel ops; normalisation.
# ---------------------------------------------------------------------------


def _decoded_pil(example: Example, min_size: tuple[int, int] | None) -> Image.Image:
  """The source image as PIL RGB, checked against the example's orig_size."""
  image = example['image']
  if isinstance(image, np.ndarray):
    pil = Image.fromarray(records.decode_image(image))
    full_size = image.shape[:2]
  else:
    pil, full_size = records.load_pil(image, min_size)
  if 'orig_size' in example and tuple(int(v) for v in example['orig_size']) != tuple(full_size):
    raise records.BadExampleError(
        example.get('key', ''), f'image is {full_size[0]}x{full_size[1]} (h x w) but the '
        f'annotation says {tuple(int(v) for v in example["orig_size"])}')
  return pil


@functools.lru_cache(maxsize=8)
def _fill_canvas(size: int, fill: tuple[int, int, int]) -> np.ndarray:
  canvas = np.empty((size, size, 3), np.uint8)
  canvas[:] = fill
  canvas.flags.writeable = False
  return canvas


# Caffe's SSD training resizes with an interpolation drawn per image from
# these five (LINEAR, AREA, NEAREST, CUBIC, LANCZOS4); PIL's BOX is its AREA.
_CAFFE_INTERPOLATIONS = (Image.BILINEAR, Image.BOX, Image.NEAREST, Image.BICUBIC, Image.LANCZOS)
_METHODS = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}
_RESIZE_METHODS = (*_METHODS, 'random', 'opencv')


@functools.lru_cache(maxsize=1)
def _cv2():
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.resize_method='opencv' needs OpenCV: pip install "
                      "'smallssd_jax[opencv]' (or opencv-python-headless)") from e
  cv2.setNumThreads(1)  # one image per call; parallelism comes from read threads / workers
  return cv2


def _resample_opencv(pil: Image.Image, size_wh: tuple[int, int],
                     box: tuple[float, float, float, float]) -> Image.Image:
  """OpenCV INTER_LINEAR resample of `box` (PIL's box semantics) to `size_wh`.

  Caffe's own interpolation (cv::resize / warpAffine, bilinear without
  antialiasing), about twice as fast as PIL's antialiased bilinear.
  """
  cv2 = _cv2()
  (out_w, out_h), (x0, y0, x1, y1) = size_wh, box
  sx, sy = (x1 - x0) / out_w, (y1 - y0) / out_h
  # Output pixel centre i + 1/2 <- source x0 + (i + 1/2) sx, in OpenCV's
  # pixel-centre coordinates (minus 1/2).
  matrix = np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]])
  out = cv2.warpAffine(np.asarray(pil), matrix, (out_w, out_h),
                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
  return Image.fromarray(out)


def resize(example: Example, rng: np.random.Generator | None = None, *, size: int,
           fill: Sequence[float] = (123, 117, 104), method: str = 'bilinear',
           source_canvas: tuple[int, int] | None = None) -> Example:
  """Realises the example at `size` x `size`: one resample of the window.

  Decodes the image when needed (at a reduced JPEG scale when the window
  allows), paints the canvas outside the image with `fill` (RGB), applies the
  pending host photometric ops (`pixel_ops`) to the image pixels, records in
  `image_region` the output rectangle `(row0, row1, col0, col1)` that holds
  image pixels (for photometric stages applied on the device) and drops
  `window` and `pixel_ops`. Boxes are unchanged (they are normalised to the
  frame).

  Args:
    method: 'bilinear' (PIL's, antialiased when shrinking), 'nearest' (about
      10x cheaper), 'opencv' (OpenCV's INTER_LINEAR, Caffe's own, not
      antialiased, about 2x cheaper; needs the `opencv` extra), or
      'random': Caffe's per-image choice among bilinear, area, nearest,
      bicubic and Lanczos (bilinear without an rng).
    source_canvas: (height, width) to leave the resample to the train step
      (data.resample_on_device, pixels.resample; bilinear only): the decoded
      source goes to the top-left corner of a uint8 canvas of this size (a
      larger source is first shrunk to fit, keeping its aspect) and the
      example keeps its `window` (float32) and gains `source_size` (h, w).
  """
  if method == 'opencv':
    resample = _resample_opencv
  else:
    if method == 'random':
      pil_filter = (_CAFFE_INTERPOLATIONS[int(rng.integers(len(_CAFFE_INTERPOLATIONS)))]
                    if rng is not None else Image.BILINEAR)
    elif method in _METHODS:
      pil_filter = _METHODS[method]
    else:
      raise ValueError(f'resize method must be one of {_RESIZE_METHODS}, got {method!r}')
    resample = lambda pil, size_wh, box: pil.resize(size_wh, pil_filter, box=box)
  if source_canvas is not None and method != 'bilinear':
    raise ValueError(f'the resample in the train step (data.resample_on_device) is bilinear; '
                     f'data.resize_method is {method!r}')
  window = _window(example)
  ya, yb = sorted((window[0], window[2]))
  xa, xb = sorted((window[1], window[3]))
  if yb - ya <= 0 or xb - xa <= 0:
    raise ValueError(f'empty window {window}')
  dy, dx = (yb - ya) / size, (xb - xa) / size
  # Output rows / columns whose pixels lie on the image (the rest is canvas),
  # before and after mirroring.
  r0 = min(max(math.ceil(-ya / dy - _EPS), 0), size)
  r1 = min(max(math.floor((1.0 - ya) / dy + _EPS), 0), size)
  c0 = min(max(math.ceil(-xa / dx - _EPS), 0), size)
  c1 = min(max(math.floor((1.0 - xa) / dx + _EPS), 0), size)
  on_image = r1 > r0 and c1 > c0
  mirror_y, mirror_x = window[0] > window[2], window[1] > window[3]
  out_rows = (size - r1, size - r0) if mirror_y else (r0, r1)
  out_cols = (size - c1, size - c0) if mirror_x else (c0, c1)
  # The rectangle holding image pixels, for photometric ops applied later.
  image_region = np.array((*out_rows, *out_cols) if on_image else (0, 0, 0, 0), np.int32)
  pil = _decoded_pil(example, (math.ceil(size / (yb - ya)), math.ceil(size / (xb - xa))))
  example = dict(example)
  example['image_region'] = image_region
  pixel_ops = example.pop('pixel_ops', None)
  if source_canvas is not None:
    if pixel_ops:
      raise ValueError('host photometric ops with the resample in the train step')
    example['image'], example['source_size'] = _source_canvas(pil, source_canvas)
    example['window'] = window.astype(np.float32)
    return example
  w, h = pil.size
  region = None
  if on_image:
    box = (min(max(w * (xa + c0 * dx), 0.0), w), min(max(h * (ya + r0 * dy), 0.0), h),
           min(max(w * (xa + c1 * dx), 0.0), w), min(max(h * (ya + r1 * dy), 0.0), h))
    if (c1 - c0, r1 - r0) == (w, h) and np.allclose(box, (0, 0, w, h)):
      region = pil  # already at the output scale: no resample
    else:
      region = resample(pil, (c1 - c0, r1 - r0), box)
    # Mirror the region (PIL, cheap) and its place instead of the whole canvas.
    if mirror_x:
      region = region.transpose(Image.FLIP_LEFT_RIGHT)
    if mirror_y:
      region = region.transpose(Image.FLIP_TOP_BOTTOM)
    if pixel_ops:
      region = apply_pixel_ops(region, pixel_ops)
    region = np.asarray(region)
  if region is not None and (*out_rows, *out_cols) == (0, size, 0, size):
    canvas = region
  else:
    fill_rgb = tuple(int(v) for v in np.clip(np.round(np.asarray(fill, np.float64)), 0, 255))
    canvas = _fill_canvas(size, fill_rgb).copy()
    if region is not None:
      canvas[slice(*out_rows), slice(*out_cols)] = region
  example['image'] = canvas
  example.pop('window', None)
  return example


def _source_canvas(pil: Image.Image, canvas_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """The source in the top-left corner of a zeroed uint8 canvas, and its (h, w)."""
  (ch, cw), (w, h) = canvas_hw, pil.size
  if h > ch or w > cw:
    logging.log_first_n(
        logging.WARNING, 'a %dx%d source is larger than data.source_canvas %dx%d: shrunk on the '
        'host to fit (raise data.source_canvas to keep its resolution)', 1, h, w, ch, cw)
    scale = min(ch / h, cw / w)
    pil = pil.resize((max(1, min(cw, round(w * scale))), max(1, min(ch, round(h * scale)))),
                     Image.BILINEAR)
    w, h = pil.size
  canvas = np.zeros((ch, cw, 3), np.uint8)
  canvas[:h, :w] = np.asarray(pil)
  return canvas, np.array((h, w), np.int32)


def normalize(example: Example, rng: np.random.Generator | None = None, *,
              mean: Sequence[float], std: Sequence[float], bgr: bool = False) -> Example:
  """uint8 RGB -> float32 `(x - mean) / std`, channels reordered to BGR first if `bgr`.

  `mean` and `std` are in 0..255 pixel units and in the output channel order.
  """
  del rng
  example = dict(example)
  image = np.asarray(example['image'])
  h, w, c = image.shape
  out = image.astype(np.float32)
  if bgr:
    out = out[..., ::-1].copy()
  # Operating on [H, W * C] rows with a tiled mean avoids numpy's slow
  # broadcast over a length-3 innermost axis.
  rows = out.reshape(h, w * c)
  rows -= np.tile(np.asarray(mean, np.float32), w)
  std = np.asarray(std, np.float32)
  if np.any(std != 1.0):
    rows *= np.tile(1.0 / std, w)
  example['image'] = out
  return example


def fill_colour(data_cfg) -> tuple[float, float, float]:
  """The mean colour in RGB 0..255 (the config's mean is in the model's channel order)."""
  mean = [float(v) for v in data_cfg.mean]
  return tuple(mean[::-1]) if data_cfg.bgr else tuple(mean)


# ---------------------------------------------------------------------------
# Config -> op lists.
# ---------------------------------------------------------------------------


def _cfg_get(cfg, key: str, default: Any) -> Any:
  return cfg[key] if key in cfg else default


def pixels_on_device(data_cfg) -> bool:
  """Whether photometric distortion and normalisation run in the jitted step (pixels.py)."""
  return bool(_cfg_get(data_cfg, 'pixels_on_device', False))


# The largest images of each dataset, (height, width): the canvas of
# `data.resample_on_device` batches when `data.source_canvas` is [0, 0].
_SOURCE_CANVAS = {'voc': (512, 512), 'kitti': (384, 1248), 'coco': (640, 640)}


def source_canvas(data_cfg) -> tuple[int, int]:
  """`data.source_canvas`, or the dataset's own when it is [0, 0]."""
  canvas = tuple(int(v) for v in _cfg_get(data_cfg, 'source_canvas', (0, 0)))
  if len(canvas) != 2 or (canvas != (0, 0) and min(canvas) <= 0):
    raise ValueError(f'data.source_canvas must be [height, width] or [0, 0], got {list(canvas)}')
  if canvas != (0, 0):
    return canvas
  name = str(data_cfg.name)
  if name == 'builtin_small':
    return (int(data_cfg.builtin.image_size),) * 2
  for key, value in _SOURCE_CANVAS.items():
    if key in name:
      return value
  return (512, 512)


def resample_on_device(data_cfg) -> bool:
  """Whether train batches carry the decoded source for the step to resample (pixels.py).

  `data.resample_on_device`: True, False, or 'auto' = when the default JAX
  backend is an accelerator (on a CPU the dense resample costs more than
  PIL's) and the rest of the config allows it.
  """
  value = config_lib.auto_bool(_cfg_get(data_cfg, 'resample_on_device', False),
                               'data.resample_on_device')
  method = str(_cfg_get(data_cfg, 'resize_method', 'bilinear'))
  if value == 'auto':
    if not pixels_on_device(data_cfg) or method != 'bilinear':
      return False
    import jax  # pylint: disable=g-import-not-at-top  (only the main process resolves 'auto')
    return jax.default_backend() != 'cpu'
  if value and not pixels_on_device(data_cfg):
    raise ValueError('data.resample_on_device=True needs data.pixels_on_device=True')
  if value and method != 'bilinear':
    raise ValueError(f"data.resample_on_device=True resamples bilinearly; data.resize_method "
                     f"is {method!r}")
  return value


def op_registry(data_cfg, input_size: int, train: bool = False) -> dict[str, Op]:
  """Name -> op with its parameters from the config (names valid in data.augment).

  `train`: the train pipeline's `resize`, which leaves the resample to the
  step when `resample_on_device`.
  """
  photo = _cfg_get(data_cfg, 'photometric', {})
  crop_cfg = _cfg_get(data_cfg, 'crop', {})
  return {
      'photometric': functools.partial(
          photometric, on_device=pixels_on_device(data_cfg),
          prob=float(_cfg_get(photo, 'prob', 0.5)),
          brightness_delta=float(_cfg_get(photo, 'brightness_delta', 32.0)),
          contrast=tuple(_cfg_get(photo, 'contrast', (0.5, 1.5))),
          saturation=tuple(_cfg_get(photo, 'saturation', (0.5, 1.5))),
          hue_delta=float(_cfg_get(photo, 'hue_delta', 18.0))),
      'zoom_out': functools.partial(
          zoom_out, max_ratio=float(data_cfg.zoom_out_max),
          prob=float(_cfg_get(data_cfg, 'zoom_out_prob', 0.5))),
      'min_iou_crop': functools.partial(
          min_iou_crop,
          min_ious=tuple(_cfg_get(crop_cfg, 'min_ious', (0.1, 0.3, 0.5, 0.7, 0.9))),
          max_trials=int(_cfg_get(crop_cfg, 'max_trials', 50)),
          scale=tuple(_cfg_get(crop_cfg, 'scale', (0.3, 1.0))),
          aspect=tuple(_cfg_get(crop_cfg, 'aspect', (0.5, 2.0)))),
      'flip': functools.partial(flip, prob=float(_cfg_get(data_cfg, 'flip_prob', 0.5))),
      'resize': functools.partial(
          resize, size=int(input_size), fill=fill_colour(data_cfg),
          method=str(_cfg_get(data_cfg, 'resize_method', 'bilinear')),
          source_canvas=(source_canvas(data_cfg)
                         if train and resample_on_device(data_cfg) else None)),
      'normalize': functools.partial(normalize, mean=tuple(data_cfg.mean),
                                     std=tuple(data_cfg.std), bgr=bool(data_cfg.bgr)),
  }


def train_ops(data_cfg, input_size: int) -> list[Op]:
  """The ops of `data.augment`, then resize and (on the host path) normalize unless listed."""
  registry = op_registry(data_cfg, input_size, train=True)
  names = list(data_cfg.augment)
  unknown = [n for n in names if n not in registry]
  if unknown:
    raise ValueError(f'unknown data.augment op(s) {unknown}; known: {sorted(registry)}')
  finals = ['resize']
  if pixels_on_device(data_cfg):
    if 'normalize' in names:
      raise ValueError("data.augment lists 'normalize', but with data.pixels_on_device=True "
                       'the train step normalises; drop one of the two')
  else:
    finals.append('normalize')
  names += [n for n in finals if n not in names]
  return [registry[n] for n in names]


def eval_ops(data_cfg, input_size: int, host_normalize: bool | None = None) -> list[Op]:
  """Evaluation: bilinear resize, then normalize on the host path.

  Args:
    host_normalize: normalise here even when `data.pixels_on_device` (for
      callers that feed the model float input themselves); None = the config's path.
  """
  registry = op_registry(data_cfg, input_size)
  ops = [functools.partial(resize, size=int(input_size), fill=fill_colour(data_cfg))]
  if host_normalize or (host_normalize is None and not pixels_on_device(data_cfg)):
    ops.append(registry['normalize'])
  return ops


def apply(ops: Sequence[Op], example: Example, rng: np.random.Generator | None) -> Example:
  for op in ops:
    example = op(example, rng)
  return example
