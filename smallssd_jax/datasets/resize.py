"""The one resample of an image, and normalisation (docs/design.md §3).

`resize` realises the window the geometric ops left (geometry.py) in a
single PIL resample from the decoded source to the input size, filling the
area outside the image with the mean colour; a JPEG is first decoded at the
smallest DCT scale that still covers the window (`Image.draft`), so a 4x
zoom-out decodes at 1/2 or 1/4 size. Geometrically this is exactly Caffe's
expand -> crop -> resize (axis-aligned affine maps compose), up to
interpolation. PIL's bilinear (antialiased when shrinking) by default;
'nearest' is cheaper, 'opencv' is OpenCV's INTER_LINEAR (what Caffe uses,
about twice as fast as PIL's; the `opencv` extra) and 'random' draws Caffe's
per-image interpolation. Then the photometric draw of the host layout
(photometric.py). On the device-resample layout (batch_layout.py) the train
`resize` only places the decoded source in a canvas and the step resamples.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

from absl import logging
import numpy as np
from PIL import Image

from smallssd_jax.datasets import geometry
from smallssd_jax.datasets import photometric
from smallssd_jax.datasets import records

Example = records.Example
_EPS = 1e-6

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
  window = geometry.window(example)
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
      region = photometric.apply_pixel_ops(region, pixel_ops)
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


