"""Box arithmetic: area, IoU, format conversions, SSD offset encoding.

Formats (docs/design.md §2):

* `yxyx`: `[ymin, xmin, ymax, xmax]`, normalised to [0, 1] unless the name says
  `_px`. The library's own format.
* `xyxy`: `[xmin, ymin, xmax, ymax]` (torchvision, COCO after conversion).
* `cycxhw`: `[cy, cx, h, w]`, the anchor format.
* deltas: `[dy, dx, dh, dw]`, the SSD offsets of a box relative to an anchor,
  divided by the variances (0.1, 0.1, 0.2, 0.2). torchvision orders its box
  regression `[dx, dy, dw, dh]` with weights (10, 10, 5, 5): the same numbers,
  with x and y swapped.

Every function broadcasts over leading batch dimensions. NumPy inputs give NumPy
outputs (host code such as datasets and metrics never starts a JAX backend);
anything else goes through `jax.numpy` and is jit-able.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray or jax.Array

DEFAULT_VARIANCES = (0.1, 0.1, 0.2, 0.2)
# torchvision's BoxCoder clamps the log-size offset at log(1000 / 16) so exp()
# cannot overflow on an untrained head.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
# Floor for sizes that go into a log or a division; keeps degenerate boxes finite.
_TINY = 1e-8


def _xp(*arrays: Array):
  """jax.numpy when any input is a JAX array (or tracer), else numpy."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def area(boxes: Array) -> Array:
  """Area of `[..., 4]` yxyx boxes (any units); inverted boxes have area 0."""
  xp = _xp(boxes)
  h = xp.maximum(boxes[..., 2] - boxes[..., 0], 0)
  w = xp.maximum(boxes[..., 3] - boxes[..., 1], 0)
  return h * w


def iou(a: Array, b: Array) -> Array:
  """Pairwise intersection over union.

  Args:
    a: `[..., N, 4]` boxes `[ymin, xmin, ymax, xmax]` (normalised or pixels,
      the same units as `b`).
    b: `[..., M, 4]` boxes `[ymin, xmin, ymax, xmax]`.

  Returns:
    `[..., N, M]` IoU. A pair whose union is empty (two zero-area boxes) has
    IoU 0, never NaN; inverted boxes count as empty.
  """
  xp = _xp(a, b)
  a = a[..., :, None, :]
  b = b[..., None, :, :]
  ih = xp.maximum(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0)
  iw = xp.maximum(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0)
  inter = ih * iw
  union = area(a) + area(b) - inter
  positive = union > 0
  # The where on the denominator keeps 0/0 out of the graph, so gradients stay finite too.
  return xp.where(positive, inter / xp.where(positive, union, 1), 0)


def yxyx_to_xyxy(boxes: Array) -> Array:
  """`[ymin, xmin, ymax, xmax]` -> `[xmin, ymin, xmax, ymax]` (units unchanged)."""
  return boxes[..., [1, 0, 3, 2]]


def xyxy_to_yxyx(boxes: Array) -> Array:
  """`[xmin, ymin, xmax, ymax]` -> `[ymin, xmin, ymax, xmax]` (units unchanged)."""
  return boxes[..., [1, 0, 3, 2]]


def yxyx_to_cycxhw(boxes: Array) -> Array:
  """`[ymin, xmin, ymax, xmax]` -> `[cy, cx, h, w]` (units unchanged)."""
  xp = _xp(boxes)
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  return xp.stack([boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w], axis=-1)


def cycxhw_to_yxyx(boxes: Array) -> Array:
  """`[cy, cx, h, w]` -> `[ymin, xmin, ymax, xmax]` (units unchanged)."""
  xp = _xp(boxes)
  cy, cx, h, w = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
  return xp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def _hwhw(image_size: Sequence[float] | Array, boxes: Array, xp) -> Array:
  # Keep the boxes' float dtype: integer (h, w) must not promote float32 to float64.
  size = xp.asarray(image_size).astype(xp.result_type(boxes.dtype, xp.float32))
  return xp.concatenate([size, size], axis=-1)


def normalised_to_pixels(boxes: Array, image_size: Sequence[float] | Array) -> Array:
  """yxyx normalised -> yxyx pixels.

  Args:
    boxes: `[..., 4]` `[ymin, xmin, ymax, xmax]` in [0, 1].
    image_size: `(h, w)`, or `[..., 2]` broadcastable against the boxes' batch
      dimensions with a box axis, e.g. `sizes[:, None, :]` for `[B, M, 4]`.
  """
  xp = _xp(boxes, image_size)
  return boxes * _hwhw(image_size, boxes, xp)


def pixels_to_normalised(boxes_px: Array, image_size: Sequence[float] | Array) -> Array:
  """yxyx pixels -> yxyx normalised; `image_size` is `(h, w)` as in `normalised_to_pixels`."""
  xp = _xp(boxes_px, image_size)
  return boxes_px / _hwhw(image_size, boxes_px, xp)


def encode_boxes(boxes: Array, anchors: Array,
                 variances: Sequence[float] = DEFAULT_VARIANCES) -> Array:
  """SSD offsets of boxes relative to anchors.

  Args:
    boxes: `[..., 4]` `[ymin, xmin, ymax, xmax]` normalised.
    anchors: `[..., 4]` `[cy, cx, h, w]` normalised, broadcastable against `boxes`.
    variances: divisors of the (dy, dx, dh, dw) offsets.

  Returns:
    `[..., 4]` deltas `[dy, dx, dh, dw]`:
    `((cy - acy) / ah / v0, (cx - acx) / aw / v1, log(h / ah) / v2, log(w / aw) / v3)`.
    Zero-size or inverted boxes are floored to a tiny size, so the result stays
    finite (the loss masks such targets out anyway).
  """
  xp = _xp(boxes, anchors)
  v = xp.asarray(variances, dtype=xp.result_type(boxes, anchors))
  b = yxyx_to_cycxhw(boxes)
  ah = xp.maximum(anchors[..., 2], _TINY)
  aw = xp.maximum(anchors[..., 3], _TINY)
  dy = (b[..., 0] - anchors[..., 0]) / ah / v[0]
  dx = (b[..., 1] - anchors[..., 1]) / aw / v[1]
  dh = xp.log(xp.maximum(b[..., 2], _TINY) / ah) / v[2]
  dw = xp.log(xp.maximum(b[..., 3], _TINY) / aw) / v[3]
  return xp.stack([dy, dx, dh, dw], axis=-1)


def decode_boxes(deltas: Array, anchors: Array,
                 variances: Sequence[float] = DEFAULT_VARIANCES) -> Array:
  """Inverse of `encode_boxes`.

  Args:
    deltas: `[..., 4]` `[dy, dx, dh, dw]` (a head's `box_deltas`).
    anchors: `[..., 4]` `[cy, cx, h, w]` normalised, broadcastable against `deltas`.
    variances: the multipliers used by `encode_boxes`.

  Returns:
    `[..., 4]` boxes `[ymin, xmin, ymax, xmax]` normalised (not clipped), in the
    promoted dtype of deltas and anchors. The log-size terms `dh * v2`, `dw * v3`
    are clamped at log(1000 / 16) as in torchvision.
  """
  xp = _xp(deltas, anchors)
  v = xp.asarray(variances, dtype=xp.result_type(deltas, anchors))
  cy = anchors[..., 0] + deltas[..., 0] * v[0] * anchors[..., 2]
  cx = anchors[..., 1] + deltas[..., 1] * v[1] * anchors[..., 3]
  h = xp.exp(xp.minimum(deltas[..., 2] * v[2], BBOX_XFORM_CLIP)) * anchors[..., 2]
  w = xp.exp(xp.minimum(deltas[..., 3] * v[3], BBOX_XFORM_CLIP)) * anchors[..., 3]
  return xp.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)
