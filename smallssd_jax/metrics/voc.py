"""PASCAL VOC detection AP, exactly as the devkit computes it, vectorised.

The devkit (`VOCevaldet.m`, and `voc_eval.py` of py-faster-rcnn that the SSD
ports copy) evaluates one class at a time:

* detections of the class are sorted by score, descending; ties keep input
  order (MATLAB's `sort` is stable; we use a stable sort too, where
  `voc_eval.py`'s default quicksort leaves ties in an unspecified order);
* each detection takes its best-overlapping ground truth of its class in its
  image, over ALL of them (difficult or not, already matched or not), first
  one on ties; IoU uses inclusive pixel widths `x2 - x1 + 1`;
* if that IoU >= threshold (the MATLAB devkit's `>=`; `voc_eval.py` writes
  `>`, which differs only at exactly 0.5): on a difficult object the
  detection is neither a true nor a false positive; on an object not yet
  taken it is a true positive and takes it; on a taken one it is a false
  positive (duplicate). Below the threshold it is a false positive.

Because the best overlap ignores the "taken" state, the only sequential part
of the devkit's loop is "the first detection (by rank) to land on an object
takes it", which is a group-by: no Python loop over detections is needed.

AP flavours: VOC2007's 11-point interpolation (mean over recall thresholds
0, 0.1, .., 1 of the best precision at recall >= t; the thresholds are
`voc_eval.py`'s `np.arange(0., 1.1, 0.1)`) and VOC2010+'s all-point area
under the monotone precision envelope.

A class without (non-difficult) ground truth has no AP (NaN) and is left out
of the mean, as the devkit's per-class loop over the test set's classes does.

Boxes everywhere here are `[ymin, xmin, ymax, xmax]` in pixels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smallssd_jax.metrics import inputs
from smallssd_jax.metrics import sizes

# voc_eval.py's recall thresholds for the 11-point AP. np.arange gives
# 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001: a recall of
# exactly 0.3, 0.6 or 0.7 does not reach those points, as in voc_eval.py.
ELEVEN_POINTS = np.arange(0.0, 1.1, 0.1)


def devkit_iou(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
  """Element-wise IoU of paired `[P, 4]` yxyx pixel boxes, with `+1` widths.

  The operations and their order are `voc_eval.py`'s, in float64, so the
  values are bit-identical to the devkit's (an IoU of exactly the threshold
  must compare the same way).
  """
  d = det_boxes.astype(np.float64)
  g = gt_boxes.astype(np.float64)
  iw = np.maximum(np.minimum(g[:, 3], d[:, 3]) - np.maximum(g[:, 1], d[:, 1]) + 1.0, 0.0)
  ih = np.maximum(np.minimum(g[:, 2], d[:, 2]) - np.maximum(g[:, 0], d[:, 0]) + 1.0, 0.0)
  inters = iw * ih
  uni = ((d[:, 3] - d[:, 1] + 1.0) * (d[:, 2] - d[:, 0] + 1.0)
         + (g[:, 3] - g[:, 1] + 1.0) * (g[:, 2] - g[:, 0] + 1.0) - inters)
  return inters / uni


def average_precision(recall: np.ndarray, precision: np.ndarray,
                      use_07_metric: bool) -> float:
  """`voc_eval.py`'s `voc_ap`: 11-point (VOC2007) or all-point area AP.

  Args:
    recall: [D] non-decreasing recall after each ranked detection.
    precision: [D] precision after each ranked detection.
    use_07_metric: True for the 11-point AP, False for the area AP.
  """
  recall = np.asarray(recall, np.float64)
  precision = np.asarray(precision, np.float64)
  if use_07_metric:
    # max(precision[recall >= t]) is the suffix maximum at the first index
    # whose recall reaches t, recall being sorted.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    first = np.searchsorted(recall, ELEVEN_POINTS, side='left')
    ap = 0.0
    for i in first:  # summed one term at a time, in voc_eval.py's order
      p = envelope[i] if i < len(recall) else 0
      ap = ap + p / 11.0
    return float(ap)
  mrec = np.concatenate(([0.0], recall, [1.0]))
  mpre = np.concatenate(([0.0], precision, [0.0]))
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  i = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@dataclasses.dataclass(frozen=True)
class Matches:
  """The devkit's assignment of every detection (flat, input order).

  Attributes:
    order: [M] detection indices sorted by (label, score descending), stable:
      each class's ranked list, one class after the other.
    gt_index: [M] flat index of the best-overlapping ground truth of the same
      image and class, -1 when there is none.
    hit: [M] the best overlap reaches the IoU threshold.
    first: [M] `hit` and the highest-ranked detection to land on that object.
  """
  order: np.ndarray
  gt_index: np.ndarray
  hit: np.ndarray
  first: np.ndarray


def match(gt: inputs.GroundTruth, dets: inputs.Detections, num_classes: int,
          iou_threshold: float = 0.5) -> Matches:
  """Assigns detections to ground truth as the devkit does, for all classes."""
  m = len(dets.scores)
  order = inputs.rank_by_score(dets.labels, dets.scores)
  rank = np.empty(m, np.int64)
  rank[order] = np.arange(m)

  # Ground truth grouped by (image, class), input order inside a group: the
  # devkit's per-image object list, whose first maximum wins.
  stride = num_classes + 1
  gt_key = gt.image * stride + gt.labels
  gt_order = np.argsort(gt_key, kind='stable')
  gt_key_sorted = gt_key[gt_order]
  det_key = dets.image * stride + dets.labels
  lo = np.searchsorted(gt_key_sorted, det_key, side='left')
  count = np.searchsorted(gt_key_sorted, det_key, side='right') - lo

  # Every (detection, candidate object) pair, detection-major.
  starts = np.cumsum(count) - count
  pair_det = np.repeat(np.arange(m), count)
  local = np.arange(len(pair_det)) - starts[pair_det]
  pair_gt = gt_order[lo[pair_det] + local]
  overlaps = devkit_iou(dets.boxes[pair_det], gt.boxes[pair_gt])

  gt_index = np.full(m, -1, np.int64)
  best = np.full(m, -np.inf)
  has = count > 0
  if has.any():
    seg = starts[has]
    best[has] = np.maximum.reduceat(overlaps, seg)
    # np.argmax's first maximum, per segment.
    first_local = np.minimum.reduceat(
        np.where(overlaps == best[pair_det], local, np.iinfo(np.int64).max), seg)
    gt_index[has] = gt_order[lo[has] + first_local]
  hit = best >= iou_threshold

  # The first detection (by rank) on each object takes it.
  first = np.zeros(m, bool)
  hits = np.flatnonzero(hit)
  if hits.size:
    by_object = hits[np.lexsort((rank[hits], gt_index[hits]))]
    objects = gt_index[by_object]
    leading = np.concatenate(([True], objects[1:] != objects[:-1]))
    first[by_object[leading]] = True
  return Matches(order=order, gt_index=gt_index, hit=hit, first=first)


def outcomes(gt: inputs.GroundTruth, dets: inputs.Detections, matches: Matches,
             bucket: str = 'all') -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """True/false positive flags per detection and positives per class.

  Args:
    gt, dets: the flat inputs `matches` was computed on.
    matches: from `match`.
    bucket: a `sizes.AREA_RANGES` name; outside 'all', ground truth outside
      the bucket counts as difficult and false positives outside it are
      dropped (the COCO convention, see `sizes`).

  Returns:
    (tp [M] bool, fp [M] bool, ignored [N] bool ground truth) in input
    order; a detection with neither flag counts for nothing.
  """
  ignored = gt.ignore.copy()
  if bucket != 'all':
    ignored |= sizes.outside(gt.area, bucket)
  on_ignored = np.zeros(len(matches.hit), bool)
  on_ignored[matches.hit] = ignored[matches.gt_index[matches.hit]]
  tp = matches.first & ~on_ignored
  fp = ~matches.hit | (~matches.first & ~on_ignored)
  if bucket != 'all':
    fp &= ~sizes.outside(inputs.box_area(dets.boxes), bucket)
  return tp, fp, ignored


def class_curves(gt: inputs.GroundTruth, dets: inputs.Detections, matches: Matches,
                 num_classes: int, bucket: str = 'all'
                 ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
  """Per class, the devkit's ranked (recall, precision, scores, counted).

  `counted` marks rows that are a true or false positive; the devkit keeps
  the other rows (matches to difficult objects) with zero increments, and so
  do we, so the values are the devkit's. Classes without positives are
  absent from the result.
  """
  tp, fp, ignored = outcomes(gt, dets, matches, bucket)
  npos = np.bincount(gt.labels[~ignored], minlength=num_classes + 1)
  order = matches.order
  labels = dets.labels[order]
  bounds = np.searchsorted(labels, np.arange(1, num_classes + 2), side='left')
  curves = {}
  for c in range(1, num_classes + 1):
    if npos[c] == 0:
      continue
    rows = order[bounds[c - 1]:bounds[c]]
    tp_sum = np.cumsum(tp[rows]).astype(np.float64)
    fp_sum = np.cumsum(fp[rows]).astype(np.float64)
    recall = tp_sum / float(npos[c])
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
    curves[c] = (recall, precision, dets.scores[rows], tp[rows] | fp[rows])
  return curves


def class_aps(gt: inputs.GroundTruth, dets: inputs.Detections, matches: Matches,
              num_classes: int, use_07_metric: bool, bucket: str = 'all') -> np.ndarray:
  """[K] AP of classes 1..K (index c - 1); NaN where a class has no positives."""
  aps = np.full(num_classes, np.nan)
  for c, (recall, precision, _, _) in class_curves(
      gt, dets, matches, num_classes, bucket).items():
    aps[c - 1] = average_precision(recall, precision, use_07_metric)
  return aps


def evaluate(gt: inputs.GroundTruth, dets: inputs.Detections, num_classes: int,
             use_07_metric: bool = True, iou_threshold: float = 0.5) -> dict[str, float]:
  """VOC AP per class, their mean, and the size-bucket APs.

  Returns:
    'mAP' (mean over classes with positives), 'AP/<c>' for c in 1..K (NaN
    without positives), 'APs'/'APm'/'APl' (mean over classes with positives in
    the bucket; NaN when none has) and 'APs/<c>', 'APm/<c>', 'APl/<c>'.
  """
  matches = match(gt, dets, num_classes, iou_threshold)
  results = {'mAP': float('nan')}  # headline first, for readers of the dict
  for bucket, prefix in (('all', 'AP'), *((b, 'AP' + s) for b, s in sizes.BUCKET_KEYS.items())):
    aps = class_aps(gt, dets, matches, num_classes, use_07_metric, bucket)
    results[prefix] = _nanmean(aps)
    for c in range(1, num_classes + 1):
      results[f'{prefix}/{c}'] = float(aps[c - 1])
  results['mAP'] = results.pop('AP')
  return results


def _nanmean(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(np.mean(values)) if values.size else float('nan')
