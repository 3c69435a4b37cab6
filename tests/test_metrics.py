"""Tests for smallssd_jax.metrics: hand-computed cases and reference implementations.

The VOC reference is py-faster-rcnn's `voc_eval.py` transliterated (per class,
per sorted detection), with the two points where the MATLAB devkit is the
authority: a stable sort and `>=` at the IoU threshold. The COCO reference is
pycocotools itself, called directly here.
"""

import contextlib
import io
import math
import os
import re

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from smallssd_jax import metrics
from smallssd_jax.metrics import coco as coco_lib
from smallssd_jax.metrics import voc as voc_lib

# ----------------------------------------------------------------------------
# Helpers and random data.


def image(boxes=(), labels=(), ignore=None, size=(500, 500)):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  labels = np.asarray(labels, np.int64)
  ignore = np.zeros(len(boxes), bool) if ignore is None else np.asarray(ignore, bool)
  return {'boxes': boxes, 'labels': labels, 'ignore': ignore, 'image_size': size}


def dets(boxes=(), scores=(), labels=()):
  return {'boxes': np.asarray(boxes, np.float64).reshape(-1, 4),
          'scores': np.asarray(scores, np.float64), 'labels': np.asarray(labels, np.int64)}


def far_box(i):
  """A box overlapping nothing else in these tests (yxyx pixels)."""
  return [400 + 10 * i, 400, 405 + 10 * i, 405]


def random_data(seed, num_images=60, num_classes=4, dets_per_image=40, crowd_rate=0.1,
                crowded_images=0):
  """Random yxyx-pixel ground truth and detections with realistic structure.

  Boxes are rounded to integers half of the time (exact IoU ties), some ground
  truth is duplicated, scores are rounded (score ties), sizes span the small /
  medium / large buckets, and `crowded_images` images get > 100 detections of
  one class (pycocotools' per-image cap).
  """
  rng = np.random.default_rng(seed)
  ground_truth, detections = [], []
  for i in range(num_images):
    h, w = rng.integers(200, 600, size=2)
    n = rng.integers(0, 8)
    size = np.exp(rng.uniform(np.log(6), np.log(180), size=(n, 2)))
    centre = rng.uniform(0, 1, size=(n, 2)) * [h, w]
    gt = np.concatenate([centre - size / 2, centre + size / 2], axis=1).clip(0, [h, w, h, w])
    labels = rng.integers(1, num_classes + 1, size=n)
    if n and rng.random() < 0.3:  # an exact duplicate object
      gt = np.concatenate([gt, gt[:1]])
      labels = np.concatenate([labels, labels[:1]])
    if rng.random() < 0.5:
      gt = np.round(gt)
    ignore = rng.random(len(gt)) < crowd_rate
    ground_truth.append(image(gt, labels, ignore, (int(h), int(w))))

    boxes, scores, det_labels = [], [], []
    for box, label in zip(gt, labels):
      for _ in range(rng.poisson(1.5)):
        scale = np.array([box[2] - box[0], box[3] - box[1]] * 2) + 1
        boxes.append(box + rng.normal(0, 0.1, 4) * scale)
        scores.append(rng.beta(5, 2))
        det_labels.append(label if rng.random() < 0.85 else rng.integers(1, num_classes + 1))
    extra = max(dets_per_image - len(boxes), 0)
    size = np.exp(rng.uniform(np.log(4), np.log(250), size=(extra, 2)))
    centre = rng.uniform(0, 1, size=(extra, 2)) * [h, w]
    boxes.extend(np.concatenate([centre - size / 2, centre + size / 2], axis=1))
    scores.extend(rng.beta(1, 6, size=extra))
    det_labels.extend(rng.integers(1, num_classes + 1, size=extra))
    if i < crowded_images:
      k = 130
      centre = rng.uniform(0, 1, size=(k, 2)) * [h, w]
      boxes.extend(np.concatenate([centre - 20, centre + 20], axis=1))
      scores.extend(rng.random(k))
      det_labels.extend([1] * k)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                            np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
    if rng.random() < 0.5:
      boxes = np.round(boxes)
    scores = np.round(np.asarray(scores), 2)  # ties
    detections.append(dets(boxes, scores, det_labels))
  return ground_truth, detections


# ----------------------------------------------------------------------------
# Reference implementations.


def voc_ap_reference(rec, prec, use_07_metric):
  """voc_eval.py's voc_ap, verbatim."""
  if use_07_metric:
    ap = 0.
    for t in np.arange(0., 1.1, 0.1):
      if np.sum(rec >= t) == 0:
        p = 0
      else:
        p = np.max(prec[rec >= t])
      ap = ap + p / 11.
  else:
    mrec = np.concatenate(([0.], rec, [1.]))
    mpre = np.concatenate(([0.], prec, [0.]))
    for i in range(mpre.size - 1, 0, -1):
      mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
  return ap


def voc_eval_reference(ground_truth, detections, classname, ovthresh=0.5, use_07_metric=True,
                       bucket=None):
  """voc_eval.py's per-class loop, transliterated (xyxy, +1 pixel widths).

  Two changes, both the MATLAB devkit's behaviour: the score sort is stable
  and a match needs `ovmax >= ovthresh`. With `bucket=(lo, hi)` (continuous
  box area), the size-bucket rules: objects outside count as difficult, and a
  false positive whose box is outside is skipped.
  """

  def outside(b):
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return (area < bucket[0]) | (area > bucket[1]) if bucket else np.zeros(area.shape, bool)

  class_recs = {}
  npos = 0
  for imagename, gt in enumerate(ground_truth):
    keep = gt['labels'] == classname
    bbox = gt['boxes'][keep][:, [1, 0, 3, 2]]
    difficult = gt['ignore'][keep].astype(bool) | outside(gt['boxes'][keep])
    det = [False] * len(bbox)
    npos = npos + sum(~difficult)
    class_recs[imagename] = {'bbox': bbox, 'difficult': difficult, 'det': det}

  image_ids, confidence, bb_list = [], [], []
  for imagename, d in enumerate(detections):
    for box, score, label in zip(d['boxes'], d['scores'], d['labels']):
      if label == classname:
        image_ids.append(imagename)
        confidence.append(float(score))
        bb_list.append([box[1], box[0], box[3], box[2]])
  confidence = np.array(confidence)
  BB = np.array(bb_list).reshape(-1, 4)
  sorted_ind = np.argsort(-confidence, kind='stable')
  BB = BB[sorted_ind, :]
  image_ids = [image_ids[x] for x in sorted_ind]

  nd = len(image_ids)
  tp = np.zeros(nd)
  fp = np.zeros(nd)
  for d in range(nd):
    R = class_recs[image_ids[d]]
    bb = BB[d, :].astype(float)
    ovmax = -np.inf
    BBGT = R['bbox'].astype(float)
    if BBGT.size > 0:
      ixmin = np.maximum(BBGT[:, 0], bb[0])
      iymin = np.maximum(BBGT[:, 1], bb[1])
      ixmax = np.minimum(BBGT[:, 2], bb[2])
      iymax = np.minimum(BBGT[:, 3], bb[3])
      iw = np.maximum(ixmax - ixmin + 1., 0.)
      ih = np.maximum(iymax - iymin + 1., 0.)
      inters = iw * ih
      uni = ((bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.) +
             (BBGT[:, 2] - BBGT[:, 0] + 1.) * (BBGT[:, 3] - BBGT[:, 1] + 1.) - inters)
      overlaps = inters / uni
      ovmax = np.max(overlaps)
      jmax = np.argmax(overlaps)
    fp_counts = not outside(bb[[1, 0, 3, 2]])
    if ovmax >= ovthresh:
      if not R['difficult'][jmax]:
        if not R['det'][jmax]:
          tp[d] = 1.
          R['det'][jmax] = 1
        else:
          fp[d] = fp_counts
    else:
      fp[d] = fp_counts
  if npos == 0:
    return float('nan')
  fp = np.cumsum(fp)
  tp = np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return voc_ap_reference(rec, prec, use_07_metric)


def pycocotools_reference(ground_truth, detections, num_classes):
  """pycocotools run directly: (stats, precision array), prints swallowed."""
  images = [{'id': i + 1, 'height': int(g['image_size'][0]), 'width': int(g['image_size'][1])}
            for i, g in enumerate(ground_truth)]
  anns, results = [], []
  for i, (g, d) in enumerate(zip(ground_truth, detections)):
    areas = g.get('area', [None] * len(g['labels']))
    for box, label, crowd, area in zip(g['boxes'], g['labels'], g['ignore'], areas):
      y0, x0, y1, x1 = (float(v) for v in box)
      anns.append({'id': len(anns) + 1, 'image_id': i + 1, 'category_id': int(label),
                   'bbox': [x0, y0, x1 - x0, y1 - y0],
                   'area': (x1 - x0) * (y1 - y0) if area is None else float(area),
                   'iscrowd': int(crowd)})
    for box, score, label in zip(d['boxes'], d['scores'], d['labels']):
      y0, x0, y1, x1 = (float(v) for v in box)
      results.append({'image_id': i + 1, 'category_id': int(label),
                      'bbox': [x0, y0, x1 - x0, y1 - y0], 'score': float(score)})
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    coco_gt = COCO()
    coco_gt.dataset = {'images': images, 'annotations': anns,
                       'categories': [{'id': c} for c in range(1, num_classes + 1)]}
    coco_gt.createIndex()
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), 'bbox')
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  return coco_eval.stats, coco_eval.eval['precision'], printed.getvalue()


def per_class(precision, c, a):
  s = precision[:, :, c - 1, a, -1]
  s = s[s > -1]
  return float(np.mean(s)) if s.size else float('nan')


def assert_same(actual, expected, tol=1e-9):
  if math.isnan(expected):
    assert math.isnan(actual)
  else:
    assert actual == pytest.approx(expected, abs=tol)


# ----------------------------------------------------------------------------
# Hand-computed cases.

ALL = ('voc07', 'voc', 'coco', 'kitti')


@pytest.mark.parametrize('metric', ALL)
def test_perfect_detector_scores_one(metric):
  gt = [image([[10, 10, 60, 80], [100, 100, 300, 260]], [1, 2]),
        image([[5, 5, 25, 30]], [3])]
  dt = [dets(g['boxes'], [0.9] * len(g['boxes']), g['labels']) for g in gt]
  results = metrics.evaluate(gt, dt, metric)
  assert results['mAP'] == pytest.approx(1.0)
  for c in (1, 2, 3):
    assert results[f'AP/{c}'] == pytest.approx(1.0)
  if metric == 'coco':
    for key in coco_lib.STAT_KEYS:
      assert results[key] in (pytest.approx(1.0), -1.0)


def ranked_case():
  """4 objects; detections ranked TP, FP, TP, FP, FP, TP (one object missed)."""
  objects = [[10 + 60 * i, 10, 50 + 60 * i, 50] for i in range(4)]
  outcome = ['tp0', 'fp', 'tp1', 'fp', 'fp', 'tp2']
  boxes, fps = [], 0
  for o in outcome:
    if o == 'fp':
      boxes.append(far_box(fps))
      fps += 1
    else:
      boxes.append(objects[int(o[2])])
  scores = np.linspace(0.9, 0.4, len(boxes))
  return [image(objects, [1] * 4)], [dets(boxes, scores, [1] * len(boxes))]


def test_ranked_list_hand_computed():
  gt, dt = ranked_case()
  # (precision, recall) after each detection: tp/(tp+fp), tp/4.
  precision = [1 / 1, 1 / 2, 2 / 3, 2 / 4, 2 / 5, 3 / 6]
  recall = [1 / 4, 1 / 4, 2 / 4, 2 / 4, 2 / 4, 3 / 4]
  # 11-point: best precision at recall >= t. t = 0, .1, .2 -> 1; .3, .4, .5 ->
  # 2/3; .6, .7 -> 3/6; .8, .9, 1 -> nothing (0).
  eleven = (3 * 1 + 3 * (2 / 3) + 2 * (1 / 2)) / 11
  # Area: recall steps of 1/4 at envelope precisions 1, 2/3, 1/2.
  area = 0.25 * 1 + 0.25 * (2 / 3) + 0.25 * (1 / 2)
  assert metrics.evaluate(gt, dt, 'voc07')['mAP'] == pytest.approx(eleven)
  assert metrics.evaluate(gt, dt, 'voc')['mAP'] == pytest.approx(area)
  curve = metrics.precision_recall(gt, dt, 'voc07')[1]
  np.testing.assert_allclose(curve['precision'], precision)
  np.testing.assert_allclose(curve['recall'], recall)
  assert curve['ap'] == pytest.approx(eleven)


def test_duplicate_detection_is_false_positive():
  objects = [[10, 10, 50, 50], [100, 100, 150, 150]]
  gt = [image(objects, [1, 1])]
  dt = [dets([objects[0], objects[0], objects[1]], [0.9, 0.8, 0.7], [1, 1, 1])]
  curve = metrics.precision_recall(gt, dt, 'voc07')[1]
  np.testing.assert_allclose(curve['precision'], [1, 1 / 2, 2 / 3])
  np.testing.assert_allclose(curve['recall'], [1 / 2, 1 / 2, 1])
  # t <= .5: 1; t > .5: 2/3.
  assert metrics.evaluate(gt, dt, 'voc07')['mAP'] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_iou_exactly_at_threshold_counts_with_devkit_widths():
  # Inclusive widths: the object is 10 x 10 = 100 px, the detection 10 x 5 = 50
  # px inside it: IoU = 50 / 100 = 0.5 exactly, a match for the devkit (>=).
  gt = [image([[0, 0, 9, 9]], [1])]
  dt = [dets([[0, 0, 9, 4]], [0.9], [1])]
  assert metrics.evaluate(gt, dt, 'voc07')['mAP'] == pytest.approx(1.0)


def test_equal_overlap_tie_breaks():
  # The first detection overlaps objects A and B equally (IoU 0.6 each); the
  # second sits exactly on A. pycocotools gives the tie to the LAST object, so
  # the second detection still finds A; the devkit gives it to the FIRST
  # object, so the second detection is a duplicate on A.
  a, b = [0, 0, 10, 10], [0, 5, 10, 15]
  gt = [image([a, b], [1, 1])]
  dt = [dets([[0, 2.5, 10, 12.5], a], [0.9, 0.8], [1, 1])]
  stats, precision, _ = pycocotools_reference(gt, dt, 1)
  results = metrics.evaluate(gt, dt, 'coco')
  assert results['AP50'] == pytest.approx(stats[1]) == pytest.approx(1.0)
  for key, value in zip(coco_lib.STAT_KEYS, stats):
    assert results[key] == pytest.approx(value, abs=1e-12)
  assert metrics.evaluate(gt, dt, 'voc07')['mAP'] == pytest.approx(6 / 11)


def test_detection_on_difficult_object_is_neither():
  gt = [image([[10, 10, 50, 50], [100, 100, 150, 150]], [1, 1], ignore=[False, True])]
  on_difficult = dets([[100, 100, 150, 150], far_box(0), [10, 10, 50, 50]],
                      [0.9, 0.8, 0.7], [1, 1, 1])
  without = dets([far_box(0), [10, 10, 50, 50]], [0.8, 0.7], [1, 1])
  for metric in ('voc07', 'voc'):
    assert (metrics.evaluate(gt, [on_difficult], metric)['mAP']
            == metrics.evaluate(gt, [without], metric)['mAP'])
  curve = metrics.precision_recall(gt, [on_difficult], 'voc07')[1]
  np.testing.assert_allclose(curve['scores'], [0.8, 0.7])  # the difficult match is dropped
  np.testing.assert_allclose(curve['precision'], [0, 1 / 2])
  # voc.outcomes, row by row: neither, FP, TP.
  gt_flat, det_flat, k = metrics.inputs.flatten(gt, [on_difficult])
  tp, fp, _ = voc_lib.outcomes(gt_flat, det_flat, voc_lib.match(gt_flat, det_flat, k))
  assert tp.tolist() == [False, False, True] and fp.tolist() == [False, True, False]


@pytest.mark.parametrize('metric', ALL)
def test_ignored_objects_neither_help_nor_hurt(metric):
  gt, dt = ranked_case()
  base = metrics.evaluate(gt, dt, metric)
  # An ignored object, detected (at the top) and not detected.
  crowd = [300, 300, 360, 380]
  gt_ig = [image(np.concatenate([gt[0]['boxes'], [crowd, [200, 200, 240, 260]]]),
                 [1] * 6, [False] * 4 + [True, True])]
  dt_ig = [dets(np.concatenate([[crowd], dt[0]['boxes']]),
                np.concatenate([[0.95], dt[0]['scores']]), [1] * 7)]
  results = metrics.evaluate(gt_ig, dt_ig, metric)
  for key in ('mAP', 'AP/1', 'APs', 'APm', 'APl'):
    assert_same(results[key], base[key], tol=1e-12)


def test_size_buckets_constructed_case():
  small, medium, large = [10, 10, 30, 30], [100, 100, 150, 150], [200, 200, 330, 330]
  gt = [image([small, medium, large], [1, 1, 1])]
  fp_small = [400, 10, 410, 22]        # 120 px^2
  fp_large = [300, 360, 420, 480]      # 120^2 px^2
  dt = [dets([fp_small, small, large, fp_large], [0.95, 0.9, 0.8, 0.6], [1, 1, 1, 1])]
  # small bucket: FP (counted, small), TP, [large TP on an ignored object:
  #   neither], [large FP: outside, dropped] -> precision 1/2 at recall 1.
  # medium: the object is missed and every detection is outside or on an
  #   ignored object -> 0. large: [small FP dropped], [small TP neither], TP,
  #   FP -> 1.
  # all: FP, TP, TP, FP over 3 objects -> precision 2/3 up to recall 2/3.
  expected = {'APs': 0.5, 'APm': 0.0, 'APl': 1.0, 'mAP': 7 * (2 / 3) / 11}
  results = metrics.evaluate(gt, dt, 'voc07')
  for key, value in expected.items():
    assert results[key] == pytest.approx(value)
  assert metrics.evaluate(gt, dt, 'voc')['APs'] == pytest.approx(0.5)
  results = metrics.evaluate(gt, dt, 'coco')
  assert results['APs'] == pytest.approx(0.5)
  assert results['APm'] == 0.0
  assert results['APl'] == pytest.approx(1.0)


def test_size_bucket_bounds_are_inclusive_like_pycocotools():
  gt = [image([[0, 0, 32, 32]], [1])]   # exactly 32^2: both small and medium
  dt = [dets([[0, 0, 32, 32]], [0.9], [1])]
  for metric in ('voc07', 'coco'):
    results = metrics.evaluate(gt, dt, metric)
    assert results['APs'] == pytest.approx(1.0)
    assert results['APm'] == pytest.approx(1.0)
    assert math.isnan(results['APl']) if metric == 'voc07' else results['APl'] == -1


def test_given_area_sets_the_size_bucket():
  # COCO buckets objects by their annotation (segmentation) area when known.
  box = [100, 100, 200, 200]                         # 100^2 box, a large one
  gt = [dict(image([box], [1]), area=np.array([900.0]))]   # but a small object
  dt = [dets([box], [0.9], [1])]
  for metric in ('voc07', 'coco'):
    results = metrics.evaluate(gt, dt, metric)
    assert results['APs'] == pytest.approx(1.0)
  stats, _, _ = pycocotools_reference(gt, dt, 1)
  assert stats[3] == pytest.approx(1.0) and stats[5] == -1


def test_class_without_ground_truth_is_nan_and_left_out():
  gt = [image([[10, 10, 50, 50]], [1])]
  dt = [dets([[10, 10, 50, 50], [60, 60, 90, 90]], [0.9, 0.8], [1, 2])]
  for metric in ALL:
    results = metrics.evaluate(gt, dt, metric, num_classes=3)
    assert math.isnan(results['AP/2']) and math.isnan(results['AP/3'])
    assert results['mAP'] == pytest.approx(1.0)


def test_class_names_small_classes_and_table():
  names = ['cat', 'boat', 'bottle']
  gt = [image([[10, 10, 50, 50], [60, 60, 90, 90], [100, 10, 110, 20]], [1, 2, 3])]
  dt = [dets([[10, 10, 50, 50], [60, 60, 90, 90]], [0.9, 0.8], [1, 2])]
  results = metrics.evaluate(gt, dt, 'voc07', class_names=names,
                             small_object_classes=['boat', 'bottle'])
  assert results['AP/boat'] == results['AP/2'] == pytest.approx(1.0)
  assert results['AP/bottle'] == 0.0
  assert results['mAP_small_classes'] == pytest.approx(0.5)
  assert metrics.evaluate(gt, dt, 'voc07', small_object_classes=[2, 3])[
      'mAP_small_classes'] == pytest.approx(0.5)
  table = metrics.format_table(results, names)
  assert '2 boat' in table and 'APs' in table and 'mAP_small_classes' in table
  coco_results = metrics.evaluate(gt, dt, 'coco', class_names=names)
  table = metrics.format_table(dict(coco_results, num_images=1.0), names)
  assert 'AP50' in table and re.search(r'num_images +1\b', table)


def test_kitti_dont_care_ignores_every_class():
  car = [50, 50, 100, 150]
  dont_care = [200, 200, 260, 300]
  gt = [image([car, dont_care], [2, 1], ignore=[False, True])]   # DontCare labelled 1
  dt = [dets([dont_care, car], [0.9, 0.8], [2, 2])]              # a vehicle on DontCare
  results = metrics.evaluate(gt, dt, 'kitti')
  assert results['AP/vehicle'] == pytest.approx(1.0)
  assert math.isnan(results['AP/pedestrian'])     # DontCare is never a positive
  assert results['mAP'] == pytest.approx(1.0)
  # Plain VOC keeps the ignore flag to its own class: the same detection is an FP.
  assert metrics.evaluate(gt, dt, 'voc07')['AP/2'] < 1.0


def test_valid_mask_drops_padding_and_empty_inputs():
  gt = [image([[10, 10, 50, 50]], [1]), image()]
  padded = [{'boxes': np.array([[10, 10, 50, 50], [0, 0, 0, 0]]), 'scores': np.array([0.9, 0]),
             'labels': np.array([1, 0]), 'valid': np.array([True, False])},
            {'boxes': np.zeros((0, 4)), 'scores': np.zeros(0), 'labels': np.zeros(0, int)}]
  assert metrics.evaluate(gt, padded, 'voc07')['mAP'] == pytest.approx(1.0)
  nothing = [dets(), dets()]
  for metric in ALL:
    assert metrics.evaluate(gt, nothing, metric)['mAP'] == 0.0
  for backend in ('pycocotools', 'fast'):
    results = metrics.evaluate(gt, nothing, 'coco', backend=backend)
    assert results['AP'] == 0.0 and results['AR100'] == 0.0 and results['APl'] == -1


def test_accepts_lists_and_float32():
  gt = [{'boxes': [[10, 10, 50, 50]], 'labels': [1], 'ignore': [False], 'image_size': [60, 60]}]
  dt = [{'boxes': np.array([[10, 10, 50, 50]], np.float32), 'scores': np.array([0.5], np.float32),
         'labels': np.array([1], np.int32)}]
  for metric in ALL:
    assert metrics.evaluate(gt, dt, metric)['mAP'] == pytest.approx(1.0)


def test_pr_curve_plots(tmp_path):
  gt, dt = random_data(0, num_images=10)
  curves = metrics.precision_recall(gt, dt, 'voc')
  files = metrics.plot_pr_curves(curves, ['a', 'b', 'c', 'd'], str(tmp_path / 'pr'))
  assert len(files) == len(curves) > 0
  assert all(os.path.getsize(f) > 1000 for f in files)
  coco_curves = metrics.precision_recall(gt, dt, 'coco')
  assert set(coco_curves) == set(curves)


# ----------------------------------------------------------------------------
# Against the references.


@pytest.mark.parametrize('seed', range(4))
def test_voc_matches_devkit_reference(seed):
  gt, dt = random_data(seed, num_images=120, num_classes=5, crowd_rate=0.15)
  for metric, use_07 in (('voc07', True), ('voc', False)):
    results = metrics.evaluate(gt, dt, metric, num_classes=5)
    expected = [voc_eval_reference(gt, dt, c, use_07_metric=use_07) for c in range(1, 6)]
    for c, ap in zip(range(1, 6), expected):
      assert_same(results[f'AP/{c}'], ap, tol=1e-12)
    assert results['mAP'] == pytest.approx(np.nanmean(expected), abs=1e-12)


@pytest.mark.parametrize('seed', range(2))
def test_voc_size_buckets_match_reference(seed):
  gt, dt = random_data(10 + seed, num_images=100, num_classes=3)
  for metric, use_07 in (('voc07', True), ('voc', False)):
    results = metrics.evaluate(gt, dt, metric, num_classes=3)
    for key, bucket in (('APs', (0, 32**2)), ('APm', (32**2, 96**2)), ('APl', (96**2, 1e10))):
      expected = [voc_eval_reference(gt, dt, c, use_07_metric=use_07, bucket=bucket)
                  for c in (1, 2, 3)]
      for c in (1, 2, 3):
        assert_same(results[f'{key}/{c}'], expected[c - 1], tol=1e-12)
      assert_same(results[key], np.nanmean(expected) if not np.isnan(expected).all()
                  else float('nan'), tol=1e-12)


@pytest.mark.parametrize('seed,crowd_rate', [(0, 0.15), (1, 0.15), (2, 0.15), (3, 0.4)])
def test_coco_fast_equals_pycocotools(seed, crowd_rate):
  num_classes = 4
  gt, dt = random_data(100 + seed, num_images=50, num_classes=num_classes,
                       crowd_rate=crowd_rate, crowded_images=2)
  stats, precision, printed = pycocotools_reference(gt, dt, num_classes)
  fast = metrics.evaluate(gt, dt, 'coco', num_classes=num_classes, backend='fast')
  for key, value in zip(coco_lib.STAT_KEYS, stats):
    assert fast[key] == pytest.approx(value, abs=1e-12), key
  assert fast['mAP'] == fast['AP']
  for a, prefix in enumerate(('AP', 'APs', 'APm', 'APl')):
    for c in range(1, num_classes + 1):
      assert_same(fast[f'{prefix}/{c}'], per_class(precision, c, a), tol=1e-12)
  # The summary text is pycocotools' own, line for line.
  summary = metrics.coco_summary(fast)
  assert summary.strip() in printed
  if seed == 0:
    reference_backend = metrics.evaluate(gt, dt, 'coco', num_classes=num_classes,
                                         backend='pycocotools')
    assert reference_backend.keys() == fast.keys()
    for key in fast:
      assert_same(reference_backend[key], fast[key], tol=1e-12)


def test_coco_constants_are_pycocotools_params():
  p = Params(iouType='bbox')
  np.testing.assert_array_equal(coco_lib.IOU_THRESHOLDS, p.iouThrs)
  np.testing.assert_array_equal(coco_lib.RECALL_THRESHOLDS, p.recThrs)
  assert list(coco_lib.MAX_DETS) == p.maxDets
  assert [list(metrics.sizes.AREA_RANGES[a]) for a in coco_lib.AREA_NAMES] == p.areaRng
  assert list(coco_lib.AREA_NAMES) == p.areaRngLbl


# ----------------------------------------------------------------------------
# Bad input.


def good():
  return [image([[10, 10, 50, 50]], [1]), image([[5, 5, 9, 9]], [2])], \
         [dets([[10, 10, 50, 50]], [0.9], [1]), dets([[5, 5, 9, 9]], [0.5], [2])]


def _break(part, index, field, value):
  gt, dt = good()
  target = (gt if part == 'gt' else dt)[index]
  if value is None:
    del target[field]
  else:
    target[field] = value
  return gt, dt


BAD = [
    ('gt', 1, 'boxes', np.zeros((1, 3)), r'ground_truth\[1\]\[.boxes.\].*shape \[N, 4\]'),
    ('gt', 1, 'boxes', [[5, 5, float('nan'), 9]], r'ground_truth\[1\]\[.boxes.\].*NaN'),
    ('gt', 0, 'boxes', [[50, 10, 10, 50]], r'ground_truth\[0\]\[.boxes.\]\[0\].*ymax < ymin'),
    ('gt', 1, 'labels', np.array([2, 2]), r'ground_truth\[1\]\[.labels.\].*shape \[1\]'),
    ('gt', 1, 'labels', np.array([0]), r'ground_truth\[1\]\[.labels.\].*label 0 out of range'),
    ('gt', 0, 'labels', np.array([1.5]), r'ground_truth\[0\]\[.labels.\].*integer'),
    ('gt', 0, 'ignore', np.array([True, False]), r'ground_truth\[0\]\[.ignore.\].*shape \[1\]'),
    ('gt', 0, 'labels', None, r"ground_truth\[0\]: missing field 'labels'"),
    ('gt', 0, 'image_size', (10,), r'ground_truth\[0\]\[.image_size.\]'),
    ('gt', 1, 'area', np.array([-1.0]), r'ground_truth\[1\]\[.area.\]\[0\]: negative'),
    ('dt', 1, 'boxes', np.zeros((1, 4, 1)), r'detections\[1\]\[.boxes.\].*shape \[N, 4\]'),
    ('dt', 1, 'boxes', [[5, 5, 9, float('inf')]], r'detections\[1\]\[.boxes.\].*NaN or inf'),
    ('dt', 0, 'scores', np.array([float('nan')]), r'detections\[0\]\[.scores.\].*NaN'),
    ('dt', 0, 'scores', np.array([0.9, 0.1]), r'detections\[0\]\[.scores.\].*shape \[1\]'),
    ('dt', 1, 'labels', np.array([-1]), r'detections\[1\]\[.labels.\].*label -1 out of range'),
    ('dt', 1, 'scores', None, r"detections\[1\]: missing field 'scores'"),
]


@pytest.mark.parametrize('part,index,field,value,message', BAD)
def test_bad_input_names_image_and_field(part, index, field, value, message):
  gt, dt = _break(part, index, field, value)
  for metric in ('voc07', 'coco'):
    with pytest.raises(ValueError, match=message):
      metrics.evaluate(gt, dt, metric)


def test_bad_input_lengths_metric_backend_and_classes():
  gt, dt = good()
  with pytest.raises(ValueError, match='ground_truth has 2 images but detections has 1'):
    metrics.evaluate(gt, dt[:1], 'voc07')
  with pytest.raises(ValueError, match='metric must be one of'):
    metrics.evaluate(gt, dt, 'voc2012')
  with pytest.raises(ValueError, match='backend must be one of'):
    metrics.evaluate(gt, dt, 'coco', backend='cuda')
  with pytest.raises(ValueError,
                     match=r'ground_truth\[1\]\[.labels.\].*label 2 out of range.*1\.\.1'):
    metrics.evaluate(gt, dt, 'voc07', class_names=['only'])
  with pytest.raises(ValueError, match='label 2 out of range'):
    metrics.evaluate(gt, dt, 'voc07', num_classes=1)
  with pytest.raises(ValueError, match="'kitti' has 3 classes"):
    metrics.evaluate(gt, dt, 'kitti', num_classes=5)
  with pytest.raises(ValueError, match='unknown class name'):
    metrics.evaluate(gt, dt, 'voc07', small_object_classes=['boat'])
  with pytest.raises(ValueError, match='small_object_classes'):
    metrics.evaluate(gt, dt, 'voc07', small_object_classes=[7])
  with pytest.raises(ValueError, match='lists with one dict per image'):
    metrics.evaluate(gt[0], dt[0], 'voc07')
