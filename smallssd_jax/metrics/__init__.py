"""Host-side detection metrics: VOC07 / VOC / COCO / KITTI AP, and AP by size.

NumPy only; nothing here knows about models or datasets. The eval loop hands
over plain per-image arrays, in pixels of the original image:

  ground_truth[i] = {'boxes': [N, 4] [ymin, xmin, ymax, xmax] pixels,
                     'labels': [N] int 1..K, 'ignore': [N] bool,
                     'image_size': (h, w)}
  detections[i] = {'boxes': [M, 4] [ymin, xmin, ymax, xmax] pixels,
                   'scores': [M], 'labels': [M] int 1..K}

and `evaluate(ground_truth, detections, metric)` returns a flat dict of
floats. See `voc`, `coco`, `kitti` and `sizes` for each metric's exact rules.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from smallssd_jax.metrics import coco
from smallssd_jax.metrics import inputs
from smallssd_jax.metrics import kitti
from smallssd_jax.metrics import voc
from smallssd_jax.metrics.coco import summary_text as coco_summary
from smallssd_jax.metrics.plots import plot_pr_curves
from smallssd_jax.metrics.table import format_table

METRICS = ('voc07', 'voc', 'coco', 'kitti')

__all__ = ['evaluate', 'precision_recall', 'format_table', 'plot_pr_curves', 'coco_summary',
           'METRICS']

Records = Sequence[Mapping[str, Any]]


def _num_classes(metric: str, class_names: Sequence[str] | None,
                 num_classes: int | None) -> int | None:
  if metric not in METRICS:
    raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
  if metric == 'kitti':
    if num_classes not in (None, kitti.NUM_CLASSES):
      raise ValueError(f"metric 'kitti' has {kitti.NUM_CLASSES} classes, got "
                       f'num_classes={num_classes}')
    num_classes = kitti.NUM_CLASSES
  if class_names is not None:
    if num_classes is not None and len(class_names) != num_classes:
      raise ValueError(f'class_names has {len(class_names)} names but there are '
                       f'{num_classes} classes')
    num_classes = len(class_names)
  return num_classes


def evaluate(ground_truth: Records, detections: Records, metric: str,
             class_names: Sequence[str] | None = None,
             small_object_classes: Sequence[int | str] | None = None,
             *, num_classes: int | None = None, backend: str = 'auto') -> dict[str, float]:
  """Detection metrics over a whole evaluation set.

  Args:
    ground_truth: one dict per image: 'boxes' [N, 4] `[ymin, xmin, ymax,
      xmax]` in pixels of the original image, 'labels' [N] int 1..K,
      'ignore' [N] bool (VOC difficult, COCO crowd, KITTI DontCare; default
      all False), 'image_size' (h, w) (optional), 'area' [N] (optional: the
      area the size buckets use, e.g. COCO's segmentation area; default the
      box area).
    detections: one dict per image, aligned with `ground_truth`: 'boxes'
      [M, 4] yxyx pixels, 'scores' [M], 'labels' [M] int 1..K, and
      optionally 'valid' [M] bool to drop padding rows.
    metric: 'voc07' (VOC2007 11-point AP at IoU 0.5, the papers' metric),
      'voc' (VOC2010+ area AP at IoU 0.5), 'coco' (pycocotools AP@[.5:.95]
      and the rest) or 'kitti' (11-point AP at IoU 0.5 over the 3 merged
      classes, DontCare ignored).
    class_names: K names of classes 1..K; adds name-keyed copies of the
      per-class entries ('AP/boat' beside 'AP/4'). Default for 'kitti':
      pedestrian, vehicle, other.
    small_object_classes: class ids (or names, with `class_names`) whose mean
      AP is reported as 'mAP_small_classes' (the VOC papers' boat, bottle,
      chair, pottedplant, tvmonitor, bird).
    num_classes: K; labels must lie in 1..K. Default: len(class_names), else
      the largest label seen.
    backend: for 'coco': 'pycocotools' (the reference), 'fast' (an exact
      NumPy re-implementation, many times faster) or 'auto' (= 'fast').

  Returns:
    A flat dict of floats:
      'mAP': the metric's headline (mean AP over classes that have
        ground truth; classes without are left out, as the VOC devkit's
        per-class loop leaves them out);
      'AP/<c>' per class (NaN for a class without ground truth);
      'APs', 'APm', 'APl': AP over objects of COCO size small (area <= 32^2
        px), medium (32^2..96^2), large (>= 96^2), each metric with its own
        AP flavour (see `sizes`), with 'APs/<c>', 'APm/<c>', 'APl/<c>';
      for 'coco' also 'AP', 'AP50', 'AP75', 'AR1', 'AR10', 'AR100', 'ARs',
        'ARm', 'ARl' exactly as pycocotools computes them (-1 where it
        gives -1);
      'mAP_small_classes' when `small_object_classes` is given.
    VOC/KITTI means over an empty set of classes are NaN; with no images at
    all every value is NaN, for every metric.

  Raises:
    ValueError: on an unknown metric or backend, or malformed input (the
      message names the image index and field).
  """
  num_classes = _num_classes(metric, class_names, num_classes)
  if metric == 'kitti' and class_names is None:
    class_names = kitti.CLASS_NAMES
  if backend not in coco.BACKENDS:
    raise ValueError(f'backend must be one of {coco.BACKENDS}, got {backend!r}')
  small_ids = _class_ids(small_object_classes, class_names)
  gt, dets, num_classes = inputs.flatten(ground_truth, detections, num_classes)
  if small_ids is not None and any(not 1 <= c <= num_classes for c in small_ids):
    raise ValueError(f'small_object_classes {list(small_ids)} must be class ids in '
                     f'1..{num_classes}')

  if metric in ('voc07', 'voc'):
    results = voc.evaluate(gt, dets, num_classes, use_07_metric=metric == 'voc07')
  elif metric == 'kitti':
    results = kitti.evaluate(gt, dets)
  else:
    results = coco.evaluate(gt, dets, num_classes, backend=backend)

  if not len(ground_truth):
    # Nothing to score: every value is undefined, whatever the metric's own
    # convention for an empty class (pycocotools' -1, VOC's NaN).
    results = {k: float('nan') for k in results}
  if small_ids is not None:
    aps = np.array([results[f'AP/{c}'] for c in small_ids], np.float64)
    aps = aps[~np.isnan(aps)]
    results['mAP_small_classes'] = float(np.mean(aps)) if aps.size else float('nan')
  if class_names is not None:
    for key in [k for k in results if '/' in k]:
      prefix, c = key.split('/')
      results[f'{prefix}/{class_names[int(c) - 1]}'] = results[key]
  return results


def _class_ids(classes: Sequence[int | str] | None,
               class_names: Sequence[str] | None) -> list[int] | None:
  if classes is None:
    return None
  ids = []
  for c in classes:
    if isinstance(c, str):
      if class_names is None or c not in class_names:
        raise ValueError(f'small_object_classes: unknown class name {c!r} '
                         f'(class_names: {None if class_names is None else list(class_names)})')
      ids.append(list(class_names).index(c) + 1)
    else:
      ids.append(int(c))
  return ids


def precision_recall(ground_truth: Records, detections: Records, metric: str = 'voc07',
                     *, num_classes: int | None = None,
                     iou_threshold: float = 0.5) -> dict[int, dict[str, Any]]:
  """Per-class precision/recall curves, for PR plots.

  Args:
    ground_truth, detections: as for `evaluate` (boxes yxyx pixels).
    metric: whose matching to use: 'voc07' / 'voc' / 'kitti' (the devkit's,
      inclusive-pixel IoU) or 'coco' (pycocotools', all areas, 100
      detections per image).
    num_classes: K, as for `evaluate`.
    iou_threshold: IoU a true positive needs.

  Returns:
    {class id: {'precision': [D], 'recall': [D], 'scores': [D] descending,
    'ap': float}} over the class's counted detections (matches to ignored
    objects dropped), for every class with ground truth. 'ap' is the
    metric's AP flavour at `iou_threshold` (101-point for 'coco').
  """
  num_classes = _num_classes(metric, None, num_classes)
  gt, dets, num_classes = inputs.flatten(ground_truth, detections, num_classes)
  if metric == 'coco':
    return coco.class_curves(gt, dets, num_classes, iou_threshold)
  if metric == 'kitti':
    gt = kitti.dont_care_for_every_class(gt)
  matches = voc.match(gt, dets, num_classes, iou_threshold)
  curves = {}
  for c, (recall, precision, scores, counted) in voc.class_curves(
      gt, dets, matches, num_classes).items():
    ap = voc.average_precision(recall, precision, use_07_metric=metric != 'voc')
    curves[c] = {'precision': precision[counted], 'recall': recall[counted],
                 'scores': scores[counted], 'ap': ap}
  return curves
