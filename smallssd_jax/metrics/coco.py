"""COCO box AP/AR: pycocotools, or an exact vectorised re-implementation.

Two backends behind one interface:

* 'pycocotools': the reference. Ground truth and detections are turned into
  in-memory `COCO` objects (boxes to `[x, y, w, h]`; ground-truth 'area' =
  the record's 'area' when given (COCO's segmentation area, which the
  official size buckets use), else box `w * h`; 'iscrowd' =
  `ignore`; category ids are our labels 1..K; image ids are list index + 1)
  and `COCOeval(..., 'bbox')` runs with its prints captured.
* 'fast' (the default, 'auto'): the same algorithm in NumPy, equal to
  pycocotools to the last bit on the same input (the tests compare every key
  on random data). pycocotools' `evaluateImg` walks detections x objects x 10
  IoU thresholds x 4 area ranges in Python; here the greedy matching steps
  over the detection rank only, with every (image, class) group, threshold,
  area range and object handled at once in arrays.

pycocotools' rules reproduced (`cocoeval.py`):

* per (image, class): detections sorted by score (stable), the first 100
  kept; objects sorted with ignored ones (crowd, or area outside the range)
  last;
* each detection, in rank order, takes the unmatched object with the highest
  IoU >= t (ties: the later object), preferring regular objects; only when
  none qualifies may it match an ignored one (crowd objects may be matched
  any number of times, and their IoU is intersection over the detection's
  area); a detection on an ignored object is ignored, as is an unmatched
  detection whose area is outside the range;
* per class, area range and max-detections: detections of all images ranked
  by score (stable, image order then rank on ties), precision made monotone,
  sampled at 101 recall points; -1 where a class has no regular object.

Boxes in and out of this module are `[ymin, xmin, ymax, xmax]` in pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np

from smallssd_jax.metrics import inputs
from smallssd_jax.metrics import sizes

# pycocotools' Params.setDetParams, computed the same way so the floats agree.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_NAMES = ('all', 'small', 'medium', 'large')

# pycocotools' `stats` order.
STAT_KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
             'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
# (ap, iouThr, areaRng, maxDets) of each stat, as in `_summarizeDets`.
_STAT_SPECS = ((1, None, 'all', 100), (1, .5, 'all', 100), (1, .75, 'all', 100),
               (1, None, 'small', 100), (1, None, 'medium', 100), (1, None, 'large', 100),
               (0, None, 'all', 1), (0, None, 'all', 10), (0, None, 'all', 100),
               (0, None, 'small', 100), (0, None, 'medium', 100), (0, None, 'large', 100))

BACKENDS = ('auto', 'pycocotools', 'fast')


def xywh(boxes: np.ndarray) -> np.ndarray:
  """`[N, 4]` yxyx pixels -> float64 `[x, y, w, h]`, the exact doubles both backends see."""
  boxes = boxes.astype(np.float64)
  return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                   boxes[:, 2] - boxes[:, 0]], axis=1)


# ----------------------------------------------------------------------------
# Reference backend: pycocotools.


def _coco_objects(gt: inputs.GroundTruth, dets: inputs.Detections, num_classes: int):
  """In-memory (ground truth COCO, results COCO); prints go to the caller's stdout."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top

  images = [{'id': i + 1, 'height': int(h), 'width': int(w)}
            for i, (h, w) in enumerate(gt.image_sizes)]
  categories = [{'id': c, 'name': str(c)} for c in range(1, num_classes + 1)]
  g = xywh(gt.boxes)
  annotations = [
      {'id': n + 1, 'image_id': int(image) + 1, 'category_id': int(label),
       'bbox': box.tolist(), 'area': float(area), 'iscrowd': int(crowd)}
      for n, (image, label, box, area, crowd)
      in enumerate(zip(gt.image, gt.labels, g, gt.area, gt.ignore))]
  coco_gt = COCO()
  coco_gt.dataset = {'images': images, 'categories': categories, 'annotations': annotations}
  coco_gt.createIndex()
  d = xywh(dets.boxes)
  results = [{'image_id': int(image) + 1, 'category_id': int(label), 'bbox': box.tolist(),
              'score': float(score)}
             for image, label, box, score in zip(dets.image, dets.labels, d, dets.scores)]
  if results:
    coco_dt = coco_gt.loadRes(results)
  else:
    # loadRes indexes results[0]; an empty result set is built by hand.
    coco_dt = COCO()
    coco_dt.dataset = {'images': images, 'categories': categories, 'annotations': []}
    coco_dt.createIndex()
  return coco_gt, coco_dt


def accumulate_pycocotools(gt: inputs.GroundTruth, dets: inputs.Detections,
                           num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """pycocotools' (precision [T,R,K,A,M], recall [T,K,A,M], stats [12])."""
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top

  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt, coco_dt = _coco_objects(gt, dets, num_classes)
    coco_eval = COCOeval(coco_gt, coco_dt, 'bbox')
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  return coco_eval.eval['precision'], coco_eval.eval['recall'], np.asarray(coco_eval.stats)


# ----------------------------------------------------------------------------
# Fast backend.


@dataclasses.dataclass(frozen=True)
class Matches:
  """pycocotools' per-image matching results, for all images at once.

  Attributes:
    kept: [D] flat detection indices evaluated: per (image, class) the 100
      best by score, ordered by image, class, then score descending (stable).
    rank: [D] rank of each kept detection inside its (image, class) group.
    matched: [D, A, T] the detection matched an object (`dtMatches > 0`).
    ignored: [D, A, T] pycocotools' `dtIgnore`.
    (Detections lead the layout: per-class gathers and cumulative sums over
    detections then run on contiguous rows, several times faster.)
    gt_ignored: [A, N] pycocotools' `gtIgnore` per flat ground truth.
  """
  kept: np.ndarray
  rank: np.ndarray
  matched: np.ndarray
  ignored: np.ndarray
  gt_ignored: np.ndarray


def _crowd_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
  """pycocotools' `bbIou` (maskApi.c) on broadcast xywh arrays, same operation order."""
  w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
  h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
  inter = w * h
  da = d[..., 2] * d[..., 3]
  union = np.where(crowd, da, da + g[..., 2] * g[..., 3] - inter)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where((w > 0) & (h > 0), inter / union, 0.0)


def match(gt: inputs.GroundTruth, dets: inputs.Detections, num_classes: int,
          iou_thresholds: np.ndarray = IOU_THRESHOLDS,
          area_names: tuple[str, ...] = AREA_NAMES, max_dets: int = MAX_DETS[-1]) -> Matches:
  """pycocotools' `evaluateImg` for every image, class, area range and threshold."""
  iou_thresholds = np.asarray(iou_thresholds, np.float64)
  num_t, num_a = len(iou_thresholds), len(area_names)
  g_box, d_box = xywh(gt.boxes), xywh(dets.boxes)
  g_area = gt.area
  d_area = d_box[:, 2] * d_box[:, 3]
  gt_ignored = np.stack([gt.ignore | sizes.outside(g_area, a) for a in area_names])
  d_outside = np.stack([sizes.outside(d_area, a) for a in area_names])

  # Detections by (image, class) group, score descending, top max_dets.
  stride = num_classes + 1
  d_key = dets.image * stride + dets.labels
  order = inputs.rank_by_score(d_key, dets.scores)
  key_sorted = d_key[order]
  new_group = np.ones(len(order), bool)
  new_group[1:] = key_sorted[1:] != key_sorted[:-1]
  group_start = np.flatnonzero(new_group)
  rank = np.arange(len(order)) - np.repeat(group_start, np.diff(np.append(group_start, len(order))))
  keep = rank < max_dets
  kept, rank, kept_key = order[keep], rank[keep], key_sorted[keep]
  n_kept = len(kept)

  matched = np.zeros((n_kept, num_a, num_t), bool)
  on_ignored = np.zeros((n_kept, num_a, num_t), bool)

  # Groups with both detections and objects need matching; the others have
  # every detection unmatched.
  g_key = gt.image * stride + gt.labels
  g_order = np.argsort(g_key, kind='stable')
  g_key_sorted = g_key[g_order]
  new_group = np.ones(n_kept, bool)
  new_group[1:] = kept_key[1:] != kept_key[:-1]
  starts = np.flatnonzero(new_group)
  d_count = np.diff(np.append(starts, n_kept))
  group_keys = kept_key[starts]
  g_lo = np.searchsorted(g_key_sorted, group_keys, side='left')
  g_count = np.searchsorted(g_key_sorted, group_keys, side='right') - g_lo

  # pycocotools compares IoU with min(t, 1 - 1e-10).
  thresholds = np.minimum(iou_thresholds, 1 - 1e-10)
  to_match = np.flatnonzero(g_count > 0)
  # Pad objects per group to a power of two, so a crowded image does not pad
  # all the others.
  width = 1 << np.ceil(np.log2(np.maximum(g_count[to_match], 1))).astype(np.int64)
  for pad in np.unique(width):
    groups = to_match[width == pad]
    groups = groups[np.argsort(-d_count[groups], kind='stable')]  # active ones form a prefix
    _match_groups(groups, int(pad), starts, d_count, g_lo, g_count, g_order, kept,
                  g_box, d_box, gt.ignore, gt_ignored, thresholds, matched, on_ignored)

  ignored = np.where(matched, on_ignored, d_outside.T[kept][:, :, None])
  return Matches(kept=kept, rank=rank, matched=matched, ignored=ignored, gt_ignored=gt_ignored)


def _match_groups(groups, pad, starts, d_count, g_lo, g_count, g_order, kept, g_box, d_box,
                  crowd_flags, gt_ignored, thresholds, matched, on_ignored):
  """Greedy matching of (image, class) groups with `pad` object slots, step by rank."""
  num_d = d_count[groups]
  ranks = np.arange(int(num_d.max()))
  d_valid = ranks < num_d[:, None]                                    # [P, D]
  d_pos = np.where(d_valid, starts[groups][:, None] + ranks, 0)       # kept positions
  slots = np.arange(pad)
  g_valid = slots < g_count[groups][:, None]                          # [P, G]
  g_flat = g_order[np.where(g_valid, g_lo[groups][:, None] + slots, 0)]
  crowd = crowd_flags[g_flat] & g_valid
  iou = _crowd_iou(d_box[kept[d_pos]][:, :, None, :], g_box[g_flat][:, None, :, :],
                   crowd[:, None, :])
  iou = np.where(d_valid[:, :, None] & g_valid[:, None, :], iou, -1.0)  # [P, D, G]

  # A detection below the lowest threshold with every object matches nothing
  # and changes no state: only the others need the sequential walk, in rank
  # order. Most detections of a real detector are such background boxes.
  relevant = (iou >= thresholds.min()).any(-1)
  compact = np.argsort(~relevant, axis=1, kind='stable')
  num_rel = relevant.sum(1)
  by_count = np.argsort(-num_rel, kind='stable')  # active groups form a prefix
  num_rel = num_rel[by_count]
  if num_rel[0] == 0:
    return
  compact = compact[by_count, :num_rel[0]]
  iou = np.take_along_axis(iou[by_count], compact[..., None], axis=1)
  d_pos = np.take_along_axis(d_pos[by_count], compact, axis=1)
  crowd = crowd[by_count]
  ig = gt_ignored[:, g_flat[by_count]].transpose(1, 0, 2)[:, :, None, :]  # [P, A, 1, G]

  taken = np.zeros((len(groups), ig.shape[1], len(thresholds), pad), bool)
  thr = thresholds[:, None]                                           # [T, 1]
  active = len(groups)
  for k in range(int(num_rel[0])):
    while num_rel[active - 1] <= k:
      active -= 1
    step_iou = iou[:active, k][:, None, None, :]                      # [P, 1, 1, G]
    free = ~taken[:active] | crowd[:active, None, None, :]
    ok = (step_iou >= thr) & free                                     # [P, A, T, G]
    g_ig = ig[:active]
    regular = ok & ~g_ig
    has_regular = regular.any(-1)
    candidates = np.where(has_regular[..., None], regular, ok & g_ig)
    hit = candidates.any(-1)                                          # [P, A, T]
    # pycocotools keeps the LAST object with the best IoU (`>=` in its scan).
    best = pad - 1 - np.argmax(np.where(candidates, step_iou, -2.0)[..., ::-1], axis=-1)
    taken[:active] |= (slots == best[..., None]) & hit[..., None]
    pos = d_pos[:active, k]
    matched[pos] = hit
    on_ignored[pos] = hit & ~has_regular


def accumulate_fast(gt: inputs.GroundTruth, dets: inputs.Detections, matches: Matches,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """pycocotools' `accumulate`: (precision [T,R,K,A,M], recall [T,K,A,M]).

  Equal to pycocotools' arrays except that precision is only filled for 100
  detections per image (the only setting its summary reads; the others stay
  -1): recall at 1 and 10 detections needs only the final true-positive count.

  The precision curve is only read where recall first reaches a threshold,
  which is always a true positive, and its monotone envelope peaks at true
  positives too. So only detections matched at some threshold and area
  ("candidates") need rows; the background detections (matched nowhere, most
  of a detector's output) enter as a count of false positives before each
  candidate, per area range.
  """
  _, num_a, num_t = matches.matched.shape
  num_r, num_m = len(RECALL_THRESHOLDS), len(MAX_DETS)
  precision = -np.ones((num_t, num_r, num_classes, num_a, num_m))
  recall = -np.ones((num_t, num_classes, num_a, num_m))
  regular = np.stack([np.bincount(gt.labels[~ig], minlength=num_classes + 1)
                      for ig in matches.gt_ignored])                 # [A, K + 1]
  labels = dets.labels[matches.kept]
  candidate = matches.matched.any(axis=(1, 2))
  # Kept detections are in (image, class, rank) order; a stable sort by class
  # keeps (image, rank) inside a class: pycocotools' concatenation order.
  by_class = np.argsort(labels, kind='stable')
  bounds = np.searchsorted(labels[by_class], np.arange(1, num_classes + 2), side='left')
  for c in range(1, num_classes + 1):
    areas = [a for a in range(num_a) if regular[a, c] > 0]
    if not areas:
      continue  # pycocotools skips a class without regular objects: -1 stays
    rows = by_class[bounds[c - 1]:bounds[c]]
    for m, max_det in enumerate(MAX_DETS[:-1]):
      sel = rows[(matches.rank[rows] < max_det) & candidate[rows]]
      tp_count = np.count_nonzero(matches.matched[sel] & ~matches.ignored[sel], axis=0)
      for a in areas:
        recall[:, c - 1, a, m] = tp_count[a].astype(float) / int(regular[a, c])

    # All (up to 100 per image) detections, ranked over images by score;
    # ties in image order then rank, as pycocotools' mergesort leaves them.
    ranked = rows[np.argsort(-dets.scores[matches.kept[rows]], kind='mergesort')]
    is_candidate = candidate[ranked]
    # A background detection is a false positive in the area ranges that hold
    # its box (pycocotools ignores it in the others).
    background_fp = ~is_candidate[:, None] & ~matches.ignored[ranked, :, 0]   # [n, A]
    sel = ranked[is_candidate]
    u = len(sel)
    fp_before = np.cumsum(background_fp, axis=0, dtype=np.int64)[is_candidate]  # [U, A]
    dtm = matches.matched[sel]
    counted = ~matches.ignored[sel]
    # Integer counts, exact in float64 as pycocotools' cumsum(...).astype(float).
    tp_sum = np.cumsum(dtm & counted, axis=0, dtype=np.int64)
    fp_sum = np.cumsum(~dtm & counted, axis=0, dtype=np.int64) + fp_before[:, :, None]
    tp_sum = tp_sum.transpose(1, 2, 0).astype(np.float64)             # [A, T, U]
    fp_sum = fp_sum.transpose(1, 2, 0).astype(np.float64)
    for a in areas:
      npig = int(regular[a, c])
      rc = tp_sum[a] / npig
      pr = tp_sum[a] / (fp_sum[a] + tp_sum[a] + np.spacing(1))
      recall[:, c - 1, a, -1] = rc[:, -1] if u else 0
      pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
      for t in range(num_t):
        inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side='left')
        q = np.zeros(num_r)
        inside = inds < u
        q[inside] = pr[t, inds[inside]]
        precision[t, :, c - 1, a, -1] = q
  return precision, recall


# ----------------------------------------------------------------------------
# Shared summary.


def summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
  """pycocotools' `_summarizeDets` on accumulated arrays: the 12 stats."""
  stats = np.zeros((12,))
  for i, (ap, iou_thr, area, max_dets) in enumerate(_STAT_SPECS):
    aind = [AREA_NAMES.index(area)]
    mind = [MAX_DETS.index(max_dets)]
    if ap == 1:
      s = precision
      if iou_thr is not None:
        s = s[np.where(iou_thr == IOU_THRESHOLDS)[0]]
      s = s[:, :, :, aind, mind]
    else:
      s = recall
      if iou_thr is not None:
        s = s[np.where(iou_thr == IOU_THRESHOLDS)[0]]
      s = s[:, :, aind, mind]
    stats[i] = -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])
  return stats


def summary_text(results: dict[str, float]) -> str:
  """The 12 lines pycocotools' `summarize()` prints, from an `evaluate` result."""
  lines = []
  for key, (ap, iou_thr, area, max_dets) in zip(STAT_KEYS, _STAT_SPECS):
    title = 'Average Precision' if ap == 1 else 'Average Recall'
    kind = '(AP)' if ap == 1 else '(AR)'
    iou = (f'{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}' if iou_thr is None
           else f'{iou_thr:0.2f}')
    lines.append(' {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}'.format(
        title, kind, iou, area, max_dets, results[key]))
  return '\n'.join(lines) + '\n'


def _per_class_ap(precision: np.ndarray, c: int, a: int) -> float:
  """Per-class AP over IoU and recall thresholds, as detectron2 reports it."""
  s = precision[:, :, c - 1, a, -1]
  s = s[s > -1]
  return float(np.mean(s)) if s.size else float('nan')


def evaluate(gt: inputs.GroundTruth, dets: inputs.Detections, num_classes: int,
             backend: str = 'auto') -> dict[str, float]:
  """COCO box metrics.

  Returns:
    pycocotools' 12 stats ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1',
    'AR10', 'AR100', 'ARs', 'ARm', 'ARl'; -1 where pycocotools gives -1),
    'mAP' (= 'AP'), and per class c 'AP/<c>', 'APs/<c>', 'APm/<c>', 'APl/<c>'
    (mean precision over IoU and recall thresholds at 100 detections; NaN
    without ground truth in that range).
  """
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
  if backend == 'pycocotools':
    precision, recall, stats = accumulate_pycocotools(gt, dets, num_classes)
  else:
    matches = match(gt, dets, num_classes)
    precision, recall = accumulate_fast(gt, dets, matches, num_classes)
    stats = summarize(precision, recall)
  results = {'mAP': float(stats[0])}
  results.update((key, float(value)) for key, value in zip(STAT_KEYS, stats))
  for a, prefix in enumerate(('AP', 'APs', 'APm', 'APl')):
    for c in range(1, num_classes + 1):
      results[f'{prefix}/{c}'] = _per_class_ap(precision, c, a)
  return results


def class_curves(gt: inputs.GroundTruth, dets: inputs.Detections, num_classes: int,
                 iou_threshold: float = 0.5) -> dict[int, dict[str, np.ndarray | float]]:
  """Per class, the ranked precision/recall pycocotools builds at one IoU.

  All areas, 100 detections per image; rows pycocotools ignores (matches to
  crowd objects) are dropped. 'ap' is the 101-point interpolated AP at this
  IoU (pycocotools' per-class AP50 for 0.5). Classes without regular ground
  truth are absent.
  """
  matches = match(gt, dets, num_classes, iou_thresholds=np.array([iou_threshold]),
                  area_names=('all',))
  regular = np.bincount(gt.labels[~matches.gt_ignored[0]], minlength=num_classes + 1)
  labels = dets.labels[matches.kept]
  curves = {}
  for c in range(1, num_classes + 1):
    if regular[c] == 0:
      continue
    rows = np.flatnonzero(labels == c)
    rows = rows[np.argsort(-dets.scores[matches.kept[rows]], kind='mergesort')]
    rows = rows[~matches.ignored[rows, 0, 0]]
    tp = matches.matched[rows, 0, 0]
    tp_sum = np.cumsum(tp).astype(float)
    fp_sum = np.cumsum(~tp).astype(float)
    recall = tp_sum / regular[c]
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    inds = np.searchsorted(recall, RECALL_THRESHOLDS, side='left')
    q = np.zeros(len(RECALL_THRESHOLDS))
    q[inds < len(rows)] = envelope[inds[inds < len(rows)]]
    curves[c] = {'precision': precision, 'recall': recall,
                 'scores': dets.scores[matches.kept[rows]], 'ap': float(np.mean(q))}
  return curves
