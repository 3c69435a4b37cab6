"""NMS and detect() against NumPy greedy loops (torchvision semantics)."""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import ml_collections
import numpy as np

from smallssd_jax import anchors as anchor_lib
from smallssd_jax import postprocess

N, MAX_OUT, THR = 24, 16, 0.45
ANCHORS = anchor_lib.ssd_anchors([6, 3, 1], [[2], [2], [2]], scales=[0.15, 0.35, 0.6, 0.9])
A = len(ANCHORS)


def _iou(a, b):
  ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ih * iw
  return ih * iw / union if union > 0 else 0.0


def ref_batched_nms(boxes, scores, classes, thr):
  """torchvision.ops.batched_nms as a greedy loop: all kept indices, best first."""
  order = sorted((i for i in range(len(scores)) if np.isfinite(scores[i]) or scores[i] == np.inf),
                 key=lambda i: (-scores[i], i))
  keep = []
  for i in order:
    if all(classes[j] != classes[i] or _iou(boxes[i], boxes[j]) <= thr for j in keep):
      keep.append(i)
  return keep


_batched_nms = jax.jit(postprocess.batched_nms, static_argnums=(3, 4))


def _clustered_boxes(rng, n):
  """Boxes around a few centres, so that many pairs overlap."""
  centres = rng.uniform(0.2, 0.8, (3, 2))[rng.integers(0, 3, n)]
  c = centres + rng.normal(0, 0.03, (n, 2))
  hw = rng.uniform(0.1, 0.3, (n, 2))
  return np.concatenate([c - hw / 2, c + hw / 2], 1).astype(np.float32)


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), num_classes=st.integers(1, 3),
                  frac_invalid=st.sampled_from([0.0, 0.3, 1.0]))
def test_batched_nms_equals_greedy_reference(seed, num_classes, frac_invalid):
  rng = np.random.default_rng(seed)
  boxes = _clustered_boxes(rng, N)
  scores = rng.uniform(0, 1, N).astype(np.float32)
  scores[rng.uniform(size=N) < frac_invalid] = -np.inf
  classes = rng.integers(0, num_classes, N).astype(np.int32)
  idx, valid = (np.asarray(x) for x in _batched_nms(boxes, scores, classes, THR, MAX_OUT))
  ref = ref_batched_nms(boxes.astype(np.float64), scores, classes, THR)
  n = int(valid.sum())
  assert n == min(len(ref), MAX_OUT)
  assert valid[:n].all() and not valid[n:].any()          # valid slots first
  np.testing.assert_array_equal(idx[:n], ref[:n])
  kept = idx[:n]
  assert np.all(np.diff(scores[kept]) <= 0)                # descending scores
  assert np.isfinite(scores[kept]).all()                   # a subset of the valid inputs
  assert len(set(kept.tolist())) == n
  for i in range(n):
    for j in range(i + 1, n):
      if classes[kept[i]] == classes[kept[j]]:
        assert _iou(boxes[kept[i]], boxes[kept[j]]) <= THR + 1e-6


def test_batched_nms_threshold_is_strict_and_classes_are_separate():
  boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 2], [0, 0, 1, 1.01], [0, 0, 1, 1]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
  classes = np.array([0, 0, 0, 1], np.int32)
  idx, valid = _batched_nms(boxes, scores, classes, 0.5, 4)
  # Box 1 has IoU exactly 0.5 with box 0: kept (suppression needs IoU > 0.5).
  # Box 2 is suppressed by box 0; box 3 is another class.
  np.testing.assert_array_equal(np.asarray(idx)[:3], [0, 1, 3])
  np.testing.assert_array_equal(np.asarray(valid), [True, True, True, False])


def _post_cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(score_threshold=0.05, nms_iou=THR, pre_nms_top_k=8,
                                       max_detections=25, arm_filter_threshold=0.99))
  cfg.update(kw)
  return cfg


@functools.cache
def _jit_detect(two_step=False):
  cfg = _post_cfg()
  return jax.jit(lambda o: postprocess.detect(o, ANCHORS, cfg, two_step=two_step))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _decode(d, a, v=(0.1, 0.1, 0.2, 0.2)):
  cy, cx = a[0] + d[0] * v[0] * a[2], a[1] + d[1] * v[1] * a[3]
  h = math.exp(min(d[2] * v[2], math.log(1000 / 16))) * a[2]
  w = math.exp(min(d[3] * v[3], math.log(1000 / 16))) * a[3]
  return [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2]


def ref_detect(cls_logits, box_deltas, anchors, cfg, arm_background=None):
  """torchvision SSD postprocess_detections, per image and class, yxyx normalised."""
  results = []
  for b in range(cls_logits.shape[0]):
    probs = _softmax(cls_logits[b].astype(np.float64))
    if arm_background is not None:
      probs[arm_background[b] > 0.99] = 0.0
    anchors_b = anchors[b] if anchors.ndim == 3 else anchors
    boxes = np.clip([_decode(box_deltas[b, a], anchors_b[a]) for a in range(len(anchors_b))], 0, 1)
    dets = []
    for c in range(1, cls_logits.shape[-1]):
      cand = [a for a in range(len(boxes)) if probs[a, c] > cfg.score_threshold]
      cand = sorted(cand, key=lambda a: -probs[a, c])[:cfg.pre_nms_top_k]
      keep = ref_batched_nms(boxes[cand], probs[cand, c], np.zeros(len(cand)), cfg.nms_iou)
      dets += [(probs[cand[k], c], c, boxes[cand[k]]) for k in keep]
    dets.sort(key=lambda d: -d[0])
    results.append(dets[:cfg.max_detections])
  return results


def _check_against_reference(got, ref):
  got = {k: np.asarray(v) for k, v in got.items()}
  for b, dets in enumerate(ref):
    n = len(dets)
    assert got['valid'][b].sum() == n and got['valid'][b, :n].all()
    np.testing.assert_allclose(got['scores'][b, :n], [d[0] for d in dets], rtol=1e-5)
    np.testing.assert_array_equal(got['labels'][b, :n], [d[1] for d in dets])
    np.testing.assert_allclose(got['boxes'][b, :n], np.array([d[2] for d in dets]).reshape(-1, 4),
                               atol=1e-5)
    assert (got['labels'][b, n:] == 0).all() and (got['scores'][b, n:] == 0).all()


def test_detect_equals_reference():
  rng = np.random.default_rng(0)
  out = dict(cls_logits=rng.normal(0, 2, (2, A, 4)).astype(np.float32),
             box_deltas=rng.normal(0, 1, (2, A, 4)).astype(np.float32))
  out['cls_logits'][1, :, 0] += 8.0     # the second image is mostly background
  got = _jit_detect()(out)
  assert got['boxes'].shape == (2, 25, 4) and got['labels'].dtype == np.int32
  assert got['valid'].dtype == bool
  ref = ref_detect(out['cls_logits'], out['box_deltas'], ANCHORS, _post_cfg())
  # 3 classes x pre_nms_top_k 8 = 24 candidates < 25 slots: the padded path.
  assert len(ref[0]) <= 24 and len(ref[1]) < len(ref[0])
  _check_against_reference(got, ref)
  boxes = np.asarray(got['boxes'])
  assert boxes.min() >= 0 and boxes.max() <= 1


def test_detect_without_detections():
  out = dict(cls_logits=np.zeros((2, A, 4), np.float32), box_deltas=np.zeros((2, A, 4), np.float32))
  out['cls_logits'][..., 0] = 20.0
  got = _jit_detect()(out)
  assert not np.asarray(got['valid']).any()
  assert (np.asarray(got['boxes']) == 0).all() and (np.asarray(got['labels']) == 0).all()


def test_detect_two_step_refines_anchors_and_filters():
  rng = np.random.default_rng(1)
  out = dict(cls_logits=rng.normal(0, 2, (2, A, 4)).astype(np.float32),
             box_deltas=rng.normal(0, 1, (2, A, 4)).astype(np.float32),
             arm_logits=rng.normal(0, 1, (2, A, 2)).astype(np.float32),
             arm_deltas=rng.normal(0, 1, (2, A, 4)).astype(np.float32))
  out['arm_logits'][rng.uniform(size=(2, A)) < 0.5] = [8.0, -8.0]    # background to step one
  got = _jit_detect(two_step=True)(out)
  refined = np.array([[_decode(out['arm_deltas'][b, a], ANCHORS[a]) for a in range(A)] for b in range(2)])
  refined = np.stack([(refined[..., 0] + refined[..., 2]) / 2, (refined[..., 1] + refined[..., 3]) / 2,
                      refined[..., 2] - refined[..., 0], refined[..., 3] - refined[..., 1]], -1)
  arm_bg = _softmax(out['arm_logits'].astype(np.float64))[..., 0]
  ref = ref_detect(out['cls_logits'], out['box_deltas'], refined, _post_cfg(), arm_background=arm_bg)
  _check_against_reference(got, ref)


def test_batched_nms_under_vmap_and_max_outputs_larger_than_inputs():
  rng = np.random.default_rng(2)
  boxes = np.stack([_clustered_boxes(rng, 6) for _ in range(3)])
  scores = rng.uniform(size=(3, 6)).astype(np.float32)
  classes = np.zeros((3, 6), np.int32)
  idx, valid = jax.jit(jax.vmap(lambda b, s, c: postprocess.batched_nms(b, s, c, 0.3, 10)))(
      boxes, scores, classes)
  assert idx.shape == (3, 10) and idx.dtype == np.int32
  for b in range(3):
    ref = ref_batched_nms(boxes[b].astype(np.float64), scores[b], classes[b], 0.3)
    n = int(np.asarray(valid[b]).sum())
    np.testing.assert_array_equal(np.asarray(idx[b])[:n], ref)
