"""Validation and flattening of `evaluate()`'s per-image inputs.

Every metric works on the same flat arrays: all images' ground truth (or
detections) concatenated image by image, in input order, with an image index
per box. Keeping input order matters: the devkit and pycocotools break score
ties by it, and so must we to give their numbers.

Boxes are `[ymin, xmin, ymax, xmax]` in pixels of the original image, held as
float64 because the reference implementations compute IoU in doubles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """All images' ground truth, concatenated in input order.

  Attributes:
    image: [N] int64 index of the image each box belongs to.
    boxes: [N, 4] float64 `[ymin, xmin, ymax, xmax]` in pixels.
    labels: [N] int64 class ids 1..K.
    ignore: [N] bool (VOC difficult, COCO crowd, KITTI DontCare).
    area: [N] float64 area for the COCO size buckets: the 'area' given (COCO's
      segmentation area), else the box area.
    occluded: [N] int64 KITTI occlusion level (0 where not given).
    truncated: [N] float64 KITTI truncation in [0, 1] (0 where not given).
    image_sizes: [num_images, 2] int64 (h, w); 0 where not given.
  """
  image: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  ignore: np.ndarray
  area: np.ndarray
  occluded: np.ndarray
  truncated: np.ndarray
  image_sizes: np.ndarray

  @property
  def num_images(self) -> int:
    return len(self.image_sizes)


@dataclasses.dataclass(frozen=True)
class Detections:
  """All images' detections, concatenated in input order.

  Attributes:
    image: [M] int64 image index.
    boxes: [M, 4] float64 `[ymin, xmin, ymax, xmax]` in pixels.
    labels: [M] int64 class ids 1..K.
    scores: [M] float64.
  """
  image: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  scores: np.ndarray


def box_area(boxes: np.ndarray) -> np.ndarray:
  """Continuous area `(ymax - ymin) * (xmax - xmin)` of `[N, 4]` yxyx boxes."""
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def rank_by_score(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Order by group ascending, then score descending, ties in input order.

  `np.lexsort((-scores, groups))`, in two stable passes (float key first,
  then the integer group), several times faster on a million detections.
  """
  by_score = np.argsort(-scores, kind='stable')
  return by_score[np.argsort(groups[by_score], kind='stable')]


def _field(record: Mapping[str, Any], name: str, where: str) -> np.ndarray:
  # isinstance(dict) first: the Mapping ABC check is slow over thousands of images.
  if not isinstance(record, (dict, Mapping)):
    raise ValueError(f'{where}: expected a dict, got {type(record).__name__}')
  if name not in record:
    raise ValueError(f'{where}: missing field {name!r}')
  return np.asarray(record[name])


def _boxes(record: Mapping[str, Any], where: str) -> np.ndarray:
  boxes = _field(record, 'boxes', where)
  if boxes.size == 0:
    # Empty lists and [0] arrays are common for images without objects.
    return np.zeros((0, 4), np.float64)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{where}['boxes']: expected shape [N, 4], got {list(boxes.shape)}")
  if boxes.dtype.kind not in 'biuf':
    raise ValueError(f"{where}['boxes']: expected real numbers, got dtype {boxes.dtype}")
  return boxes


def _vector(record: Mapping[str, Any], name: str, n: int, where: str,
            kinds: str = 'biuf', default: Any = None) -> np.ndarray | None:
  if default is not None and name not in record:
    return None
  values = _field(record, name, where)
  if values.size == 0 and n == 0:
    return values.reshape(0)
  if values.shape != (n,):
    raise ValueError(f'{where}[{name!r}]: expected shape [{n}] (one per box), '
                     f'got {list(values.shape)}')
  if values.dtype.kind not in kinds:
    raise ValueError(f'{where}[{name!r}]: expected numbers, got dtype {values.dtype}')
  return values


class _Parts:
  """Per-image arrays of one field, concatenated once, bad rows traced back."""

  def __init__(self, name: str, prefix: str):
    self.name, self.prefix = name, prefix
    self.parts, self.counts = [], []

  def add(self, values: np.ndarray | None, n: int, default: Any = 0) -> None:
    self.parts.append(np.full((n,), default) if values is None else values)
    self.counts.append(n)

  def concat(self, dtype, width: int | None = None) -> np.ndarray:
    shape = (0,) if width is None else (0, width)
    parts = [p for p in self.parts if len(p)]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

  def where(self, flat_index: int) -> str:
    """`ground_truth[i]['field'][row]` of a row of the concatenation."""
    ends = np.cumsum(self.counts)
    image = int(np.searchsorted(ends, flat_index, side='right'))
    row = flat_index - (ends[image] - self.counts[image])
    return f"{self.prefix}[{image}][{self.name!r}][{row}]"


def _check_boxes(boxes: np.ndarray, parts: _Parts) -> None:
  bad = ~np.isfinite(boxes).all(axis=1)
  if bad.any():
    raise ValueError(f'{parts.where(int(np.flatnonzero(bad)[0]))}: contains NaN or infinite '
                     'coordinates')
  bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f'{parts.where(i)} = {boxes[i].tolist()}: ymax < ymin or xmax < xmin '
                     '(boxes must be [ymin, xmin, ymax, xmax] in pixels)')


# Without num_classes / class_names, the largest label sets the class count;
# beyond this it is far more likely a bad label than a real class id (COCO's
# ids stop at 90, LVIS's at 1203), and per-class arrays would be allocated.
MAX_INFERRED_CLASSES = 10_000


def _check_labels(labels: np.ndarray, parts: _Parts, num_classes: int | None) -> np.ndarray:
  if labels.dtype.kind == 'f':
    bad = ~np.isfinite(labels) | (labels != np.round(labels))
    if bad.any():
      raise ValueError(f'{parts.where(int(np.flatnonzero(bad)[0]))}: expected integer class '
                       f'ids, got {labels[bad][0]}')
  labels = labels.astype(np.int64)
  upper = num_classes if num_classes is not None else np.iinfo(np.int64).max
  bad = (labels < 1) | (labels > upper)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    allowed = f'1..{num_classes}' if num_classes is not None else '>= 1'
    raise ValueError(f'{parts.where(i)}: label {labels[i]} out of range (class ids are '
                     f'{allowed}; 0 is background and never a ground truth or detection)')
  return labels


def flatten(ground_truth: Sequence[Mapping[str, Any]],
            detections: Sequence[Mapping[str, Any]],
            num_classes: int | None = None) -> tuple[GroundTruth, Detections, int]:
  """Validates per-image inputs and concatenates them into flat arrays.

  Shapes are checked image by image; values (NaN, inverted boxes, label
  range) on the concatenation, where a bad row is traced back to its image,
  so validation stays cheap for thousands of images.

  Args:
    ground_truth: one dict per image: 'boxes' [N, 4] `[ymin, xmin, ymax, xmax]`
      pixels, 'labels' [N] int 1..K, optional 'ignore' [N] bool (default all
      False), optional 'image_size' (h, w), optional 'area' [N] (pixels^2,
      for the size buckets; default the box area), optional KITTI
      'occluded' [N] int and 'truncated' [N] float.
    detections: one dict per image: 'boxes' [M, 4] yxyx pixels, 'scores' [M],
      'labels' [M] int 1..K, optional 'valid' [M] bool (padding rows of a
      fixed-size detector output are dropped before anything is checked).
    num_classes: K, the number of object classes; labels must lie in 1..K.
      Default: the largest label seen.

  Returns:
    (ground truth, detections, K).

  Raises:
    ValueError: naming the image index and field of the first bad input.
  """
  if isinstance(ground_truth, Mapping) or isinstance(detections, Mapping):
    raise ValueError('ground_truth and detections must be lists with one dict per image')
  ground_truth, detections = list(ground_truth), list(detections)
  if len(ground_truth) != len(detections):
    raise ValueError(f'ground_truth has {len(ground_truth)} images but detections has '
                     f'{len(detections)}; they must be aligned one to one')
  if num_classes is not None and num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')

  g = {k: _Parts(k, 'ground_truth')
       for k in ('image', 'boxes', 'labels', 'ignore', 'area', 'occluded', 'truncated')}
  d = {k: _Parts(k, 'detections') for k in ('image', 'boxes', 'labels', 'scores')}
  sizes = np.zeros((len(ground_truth), 2), np.int64)
  for i, (gt, det) in enumerate(zip(ground_truth, detections)):
    where = f'ground_truth[{i}]'
    boxes = _boxes(gt, where)
    n = len(boxes)
    g['boxes'].add(boxes, n)
    g['image'].add(None, n, i)
    g['labels'].add(_vector(gt, 'labels', n, where), n)
    g['ignore'].add(_vector(gt, 'ignore', n, where, 'bfiu', default=False), n, False)
    g['area'].add(_vector(gt, 'area', n, where, 'iuf', default=np.nan), n, np.nan)
    g['occluded'].add(_vector(gt, 'occluded', n, where, 'biu', default=0), n, 0)
    g['truncated'].add(_vector(gt, 'truncated', n, where, 'biuf', default=0.0), n, 0.0)
    if 'image_size' in gt:
      size = np.asarray(gt['image_size'])
      if size.shape != (2,) or size.dtype.kind not in 'iuf' or not (size >= 0).all():
        raise ValueError(f"{where}['image_size']: expected (h, w), got {gt['image_size']!r}")
      sizes[i] = size

    where = f'detections[{i}]'
    if isinstance(det, (dict, Mapping)) and 'valid' in det:
      boxes = _field(det, 'boxes', where)
      valid = np.asarray(det['valid'])
      if valid.ndim != 1 or (boxes.size and len(valid) != len(boxes)):
        raise ValueError(f"{where}['valid']: expected shape [{len(boxes)}], "
                         f'got {list(valid.shape)}')
      valid = valid.astype(bool)
      det = {k: (np.asarray(v)[valid] if k in ('boxes', 'scores', 'labels') else v)
             for k, v in det.items()}
    boxes = _boxes(det, where)
    m = len(boxes)
    d['boxes'].add(boxes, m)
    d['image'].add(None, m, i)
    d['labels'].add(_vector(det, 'labels', m, where), m)
    d['scores'].add(_vector(det, 'scores', m, where), m)

  gt_boxes = g['boxes'].concat(np.float64, 4)
  _check_boxes(gt_boxes, g['boxes'])
  ignore = g['ignore'].concat(np.float64)
  if not np.isin(ignore, (0, 1)).all():
    raise ValueError(f"{g['ignore'].where(int(np.flatnonzero(~np.isin(ignore, (0, 1)))[0]))}: "
                     'expected a boolean')
  truncated = g['truncated'].concat(np.float64)
  if not np.isfinite(truncated).all():
    raise ValueError(f"{g['truncated'].where(int(np.flatnonzero(~np.isfinite(truncated))[0]))}"
                     ': contains NaN')
  area = g['area'].concat(np.float64)
  bad = area < 0
  if bad.any():
    raise ValueError(f"{g['area'].where(int(np.flatnonzero(bad)[0]))}: negative area")
  area = np.where(np.isnan(area), box_area(gt_boxes), area)
  det_boxes = d['boxes'].concat(np.float64, 4)
  _check_boxes(det_boxes, d['boxes'])
  scores = d['scores'].concat(np.float64)
  if not np.isfinite(scores).all():
    raise ValueError(f"{d['scores'].where(int(np.flatnonzero(~np.isfinite(scores))[0]))}: "
                     'contains NaN or infinite scores')
  gt_labels = _check_labels(g['labels'].concat(np.result_type(*g['labels'].parts or [int])),
                            g['labels'], num_classes)
  det_labels = _check_labels(d['labels'].concat(np.result_type(*d['labels'].parts or [int])),
                             d['labels'], num_classes)

  gt_flat = GroundTruth(
      image=g['image'].concat(np.int64), boxes=gt_boxes, labels=gt_labels,
      ignore=ignore.astype(bool), area=area, occluded=g['occluded'].concat(np.int64),
      truncated=truncated, image_sizes=sizes)
  det_flat = Detections(image=d['image'].concat(np.int64), boxes=det_boxes, labels=det_labels,
                        scores=scores)
  if num_classes is None:
    seen = np.concatenate([gt_flat.labels, det_flat.labels])
    num_classes = int(seen.max()) if seen.size else 1
    if num_classes > MAX_INFERRED_CLASSES:
      in_gt = gt_flat.labels.size and gt_flat.labels.max() == num_classes
      where = (f'ground truth of image {int(gt_flat.image[np.argmax(gt_flat.labels)])}' if in_gt
               else f'detections of image {int(det_flat.image[np.argmax(det_flat.labels)])}')
      raise ValueError(f'{where}: label {num_classes} would make {num_classes} classes; pass '
                       f'num_classes (or class_names) to evaluate more than '
                       f'{MAX_INFERRED_CLASSES} classes')
  return gt_flat, det_flat, int(num_classes)
