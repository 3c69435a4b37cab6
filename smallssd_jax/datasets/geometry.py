"""Geometric augmentation: each op moves the boxes and the window, no pixels (docs/design.md §3).

Every op is `op(example, rng) -> example` over the whole example dict
(records.py), so pixels and boxes can never drift apart. Boxes are
`[ymin, xmin, ymax, xmax]` normalised to the example's current frame.

One resample per image: Caffe expands (zoom-out), crops and resizes in three
steps; here the ops only update `example['window']`, the region of the
*source* image (normalised source coordinates `[y0, x0, y1, x1]`, x0 > x1 when
mirrored, outside [0, 1] where a zoom-out canvas reaches beyond the image)
that the current frame shows, and `resize.resize` realises it once.

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

from typing import Sequence

import numpy as np

from smallssd_jax.datasets import records

Example = records.Example

IDENTITY_WINDOW = np.array([0.0, 0.0, 1.0, 1.0])


def window(example: Example) -> np.ndarray:
  """The region of the source the example's frame shows (identity until an op moves it)."""
  return np.asarray(example.get('window', IDENTITY_WINDOW), np.float64)


def _select(example: Example, keep: np.ndarray) -> Example:
  for key in records.PER_BOX_KEYS:
    if key in example:
      example[key] = example[key][keep]
  return example


def reframe(example: Example, region: Sequence[float]) -> Example:
  """Makes `region` (yxyx in current frame coordinates) the new frame.

  Boxes are mapped into the new frame and not filtered; a region larger than
  [0, 1] (zoom-out) shows the mean-colour canvas around the image.
  """
  example = dict(example)
  ry0, rx0, ry1, rx1 = (float(v) for v in region)
  wy0, wx0, wy1, wx1 = window(example)
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
  w = window(example)
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


