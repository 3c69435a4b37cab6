"""MultiBox and two-step losses against NumPy loop references, plus bad inputs."""

import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallssd_jax import anchors as anchor_lib
from smallssd_jax import losses
from smallssd_jax import matching
from smallssd_jax import config_blocks

B, M, C = 3, 8, 6
ANCHORS = anchor_lib.ssd_anchors([6, 3, 1], [[2], [2], [2]], scales=[0.15, 0.35, 0.6, 0.9])
A = len(ANCHORS)


def _loss_cfg(**kw):
  cfg = config_blocks.multibox_loss()
  cfg.arm_filter_threshold = 0.99
  cfg.negative_anchor_filter = True
  cfg.odm_cls_weight = 1.0
  cfg.update(kw)
  return cfg


@functools.cache
def _jit(name, **kw):
  fn = getattr(losses, name)
  cfg = _loss_cfg(**kw)
  return jax.jit(lambda o, b: fn(o, ANCHORS, b, cfg))


@functools.cache
def _jit_grad(name):
  fn = getattr(losses, name)
  cfg = _loss_cfg()
  return jax.jit(jax.value_and_grad(lambda o, b: fn(o, ANCHORS, b, cfg)[0]))


_match_batch = jax.jit(matching.match_batch, static_argnames='iou_threshold')


def _batch(rng, num_valid=(0, 3, 8)):
  yx = rng.uniform(0, 0.85, (B, M, 2))
  hw = rng.uniform(0.05, 0.5, (B, M, 2))
  boxes = np.concatenate([yx, np.minimum(yx + hw, 1.0)], -1).astype(np.float32)
  mask = np.arange(M)[None] < np.asarray(num_valid)[:, None]
  return dict(boxes=boxes, labels=rng.integers(1, C, (B, M)).astype(np.int32), mask=mask,
              ignore=(rng.uniform(size=(B, M)) < 0.15) & mask)


def _outputs(rng, two_step=False, scale=2.0):
  out = dict(cls_logits=rng.normal(0, scale, (B, A, C)).astype(np.float32),
             box_deltas=rng.normal(0, 1, (B, A, 4)).astype(np.float32))
  if two_step:
    out.update(arm_logits=rng.normal(0, scale, (B, A, 2)).astype(np.float32),
               arm_deltas=rng.normal(0, 0.3, (B, A, 4)).astype(np.float32))
  return out


def _log_softmax(row):
  row = np.asarray(row, np.float64)
  mx = row.max()
  return row - mx - math.log(sum(math.exp(v - mx) for v in row))


def _encode(box, anchor, v=(0.1, 0.1, 0.2, 0.2)):
  y0, x0, y1, x1 = (float(t) for t in box)
  acy, acx, ah, aw = (float(t) for t in anchor)
  return [((y0 + y1) / 2 - acy) / ah / v[0], ((x0 + x1) / 2 - acx) / aw / v[1],
          math.log((y1 - y0) / ah) / v[2], math.log((x1 - x0) / aw) / v[3]]


def _smooth_l1(x):
  return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_multibox(logits, deltas, anchors, m, labels, ratio=3, eligible=None):
  """SSD MultiBox loss, image by image and anchor by anchor. Returns (cls, box, #pos)."""
  positive, ignore, boxes = np.asarray(m.positive), np.asarray(m.ignore), np.asarray(m.matched_boxes)
  labels = np.asarray(labels)
  cls_sum = box_sum = 0.0
  for b in range(logits.shape[0]):
    anchors_b = anchors[b] if anchors.ndim == 3 else anchors
    logp = [_log_softmax(logits[b, a]) for a in range(logits.shape[1])]
    pos = [a for a in range(logits.shape[1]) if positive[b, a]]
    cands = [a for a in range(logits.shape[1]) if not positive[b, a] and not ignore[b, a]
             and (eligible is None or eligible[b, a])]
    cands.sort(key=lambda a: (logp[a][0], a))         # hardest (largest -log p_bg) first
    for a in pos:
      cls_sum -= logp[a][labels[b, a]]
      target = _encode(boxes[b, a], anchors_b[a])
      box_sum += sum(_smooth_l1(float(deltas[b, a, i]) - target[i]) for i in range(4))
    for a in cands[:min(ratio * len(pos), len(cands))]:
      cls_sum -= logp[a][0]
  return cls_sum, box_sum, int(positive.sum())


def test_multibox_loss_matches_loop_reference():
  rng = np.random.default_rng(0)
  batch, out = _batch(rng), _outputs(rng)
  loss, metrics = _jit('multibox_loss')(out, batch)
  m = _match_batch(ANCHORS, batch['boxes'], batch['labels'], batch['mask'], batch['ignore'],
                   iou_threshold=0.5)
  cls_sum, box_sum, npos = ref_multibox(out['cls_logits'], out['box_deltas'], ANCHORS, m, m.labels)
  assert npos > 0
  np.testing.assert_allclose(float(metrics['cls_loss']), cls_sum / npos, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['box_loss']), box_sum / npos, rtol=1e-4)
  np.testing.assert_allclose(float(loss), (cls_sum + box_sum) / npos, rtol=1e-4)
  assert float(metrics['num_pos']) == npos
  pos_per_image = np.asarray(m.positive).sum(1)
  cands = (~np.asarray(m.positive) & ~np.asarray(m.ignore)).sum(1)
  assert float(metrics['num_neg']) == np.minimum(3 * pos_per_image, cands).sum()


def test_bfloat16_outputs_are_computed_in_float32():
  rng = np.random.default_rng(1)
  batch, out = _batch(rng), _outputs(rng)
  _, base = _jit('multibox_loss')(out, batch)
  bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in out.items()}
  loss16, m16 = _jit('multibox_loss')(bf16, batch)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(float(loss16), float(base['loss']), rtol=2e-2)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from([1, 3, 7]))
def test_hard_negatives_count_and_hardness(seed, ratio):
  rng = np.random.default_rng(seed)
  score = rng.normal(size=(4, 64)).astype(np.float32)
  candidates = rng.uniform(size=(4, 64)) < rng.uniform(0, 1, (4, 1))
  num_pos = rng.integers(0, 20, 4)
  sel = np.asarray(_hard_negatives(score, candidates, num_pos, ratio))
  np.testing.assert_array_equal(sel.sum(1), np.minimum(ratio * num_pos, candidates.sum(1)))
  assert not np.any(sel & ~candidates)
  for b in range(4):
    left = candidates[b] & ~sel[b]
    if sel[b].any() and left.any():
      assert score[b][sel[b]].min() >= score[b][left].max()


_hard_negatives = jax.jit(losses.hard_negatives)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_num_negatives_is_min_of_ratio_and_available(seed):
  rng = np.random.default_rng(seed)
  batch = _batch(rng, num_valid=rng.integers(0, M + 1, B))
  _, metrics = _jit('multibox_loss')(_outputs(rng), batch)
  m = _match_batch(ANCHORS, batch['boxes'], batch['labels'], batch['mask'], batch['ignore'],
                   iou_threshold=0.5)
  pos, ign = np.asarray(m.positive), np.asarray(m.ignore)
  expected = np.minimum(3 * pos.sum(1), (~pos & ~ign).sum(1)).sum()
  assert float(metrics['num_neg']) == expected
  assert float(metrics['num_pos']) == pos.sum()


def _bad_batches():
  rng = np.random.default_rng(5)
  good = _batch(rng)
  no_gt = dict(good, mask=np.zeros((B, M), bool), ignore=np.zeros((B, M), bool))
  padding = dict(boxes=np.zeros((B, M, 4), np.float32), labels=np.zeros((B, M), np.int32),
                 mask=np.zeros((B, M), bool), ignore=np.zeros((B, M), bool))
  bad = good['boxes'].copy()
  bad[:, 0] = [0.7, 0.7, 0.3, 0.3]          # inverted
  bad[:, 1] = [0.3, 0.3, 0.3, 0.6]          # zero height
  bad[:, 2] = [np.nan, 0.1, 0.2, 0.2]       # not finite
  bad[:, 3] = [0.4, 0.4, 0.4, 0.4]          # a point
  degenerate = dict(good, boxes=bad, mask=np.ones((B, M), bool))
  all_bad = dict(degenerate, mask=np.arange(M)[None].repeat(B, 0) < 4)
  return {'no_gt': no_gt, 'padding': padding, 'degenerate': degenerate, 'all_degenerate': all_bad,
          'good': good}


@pytest.mark.parametrize('name', ['multibox_loss', 'two_step_loss'])
def test_bad_inputs_give_finite_loss_and_gradients(name):
  rng = np.random.default_rng(6)
  outputs = {
      'normal': _outputs(rng, two_step=True),
      'extreme': {k: np.where(rng.uniform(size=v.shape) < 0.5, 1e4, -1e4).astype(np.float32)
                  for k, v in _outputs(rng, two_step=True).items()},
      'huge_logits': dict(_outputs(rng, two_step=True),
                          cls_logits=np.where(rng.uniform(size=(B, A, C)) < 0.5, 1e30, -1e30).astype(np.float32),
                          arm_logits=np.where(rng.uniform(size=(B, A, 2)) < 0.5, 1e30, -1e30).astype(np.float32)),
  }
  fn = _jit_grad(name)
  for bname, batch in _bad_batches().items():
    for oname, out in outputs.items():
      loss, grads = fn(out, batch)
      assert np.isfinite(float(loss)), (bname, oname)
      for k, g in grads.items():
        assert np.isfinite(np.asarray(g)).all(), (bname, oname, k)
      if bname in ('no_gt', 'padding', 'all_degenerate'):
        assert float(loss) == 0.0, (bname, oname)   # nothing positive, nothing mined


def test_degenerate_boxes_do_not_change_the_loss_of_the_others():
  rng = np.random.default_rng(8)
  batch, out = _batch(rng, num_valid=(4, 4, 4)), _outputs(rng)
  junk = dict(batch, mask=np.ones((B, M), bool))
  junk['boxes'] = batch['boxes'].copy()
  junk['boxes'][:, 4:] = [0.6, 0.6, 0.2, 0.2]       # inverted, flagged as real
  a, _ = _jit('multibox_loss')(out, batch)
  b, _ = _jit('multibox_loss')(out, junk)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def _np_refine(arm_deltas, anchors, v=(0.1, 0.1, 0.2, 0.2)):
  """Decoded step-one boxes as [cy, cx, h, w] (the formula, not boxes.py)."""
  a = anchors.astype(np.float64)
  d = arm_deltas.astype(np.float64)
  cy = a[..., 0] + d[..., 0] * v[0] * a[..., 2]
  cx = a[..., 1] + d[..., 1] * v[1] * a[..., 3]
  h = np.exp(np.minimum(d[..., 2] * v[2], math.log(1000 / 16))) * a[..., 2]
  w = np.exp(np.minimum(d[..., 3] * v[3], math.log(1000 / 16))) * a[..., 3]
  return np.stack([cy, cx, h, w], -1)


def _arm_bg(arm_logits):
  e = np.exp(arm_logits - arm_logits.max(-1, keepdims=True))
  return e[..., 0] / e.sum(-1)


@pytest.mark.parametrize('use_filter,odm_cls_weight', [(True, 1.0), (False, 1.0), (True, 4.0)])
def test_two_step_loss_matches_references(use_filter, odm_cls_weight):
  rng = np.random.default_rng(9)
  batch, out = _batch(rng), _outputs(rng, two_step=True)
  # A third of the anchors look certainly background to step one.
  out['arm_logits'][rng.uniform(size=(B, A)) < 0.33] = [6.0, -1.0]
  loss, metrics = _jit('two_step_loss', negative_anchor_filter=use_filter,
                       odm_cls_weight=odm_cls_weight)(out, batch)

  # Step one: MultiBox on the ARM outputs against the anchors, every object class 1.
  m = _match_batch(ANCHORS, batch['boxes'], batch['labels'], batch['mask'], batch['ignore'],
                   iou_threshold=0.5)
  cls_sum, box_sum, npos = ref_multibox(out['arm_logits'], out['arm_deltas'], ANCHORS, m,
                                        np.asarray(m.positive).astype(int))
  np.testing.assert_allclose(float(metrics['arm_cls_loss']), cls_sum / npos, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['arm_box_loss']), box_sum / npos, rtol=1e-4)
  assert float(metrics['arm_num_pos']) == npos

  # Step two: matched afresh against the refined anchors, filtered negatives.
  refined = _np_refine(out['arm_deltas'], ANCHORS).astype(np.float32)
  m = _match_batch(refined, batch['boxes'], batch['labels'], batch['mask'], batch['ignore'],
                   iou_threshold=0.5)
  eligible = _arm_bg(out['arm_logits']) <= 0.99 if use_filter else None
  cls_sum, box_sum, npos = ref_multibox(out['cls_logits'], out['box_deltas'], refined, m, m.labels,
                                        eligible=eligible)
  assert npos > 0
  np.testing.assert_allclose(float(metrics['odm_cls_loss']), odm_cls_weight * cls_sum / npos,
                             rtol=1e-4)
  np.testing.assert_allclose(float(metrics['odm_box_loss']), box_sum / npos, rtol=1e-3, atol=1e-5)
  assert float(metrics['odm_num_pos']) == npos
  np.testing.assert_allclose(float(loss), float(metrics['arm_loss']) + float(metrics['odm_loss']),
                             rtol=1e-6)
  if use_filter:
    assert float(metrics['num_filtered']) > 0


def test_negative_anchor_filter_keeps_positives():
  rng = np.random.default_rng(10)
  batch, out = _batch(rng), _outputs(rng, two_step=True)
  out['arm_logits'][:] = [9.0, -9.0]             # step one says background everywhere
  _, on = _jit('two_step_loss', negative_anchor_filter=True)(out, batch)
  _, off = _jit('two_step_loss', negative_anchor_filter=False)(out, batch)
  assert float(on['odm_num_pos']) == float(off['odm_num_pos']) > 0
  # With every negative filtered, step two's class loss is its positives' alone.
  refined = _np_refine(out['arm_deltas'], ANCHORS).astype(np.float32)
  m = _match_batch(refined, batch['boxes'], batch['labels'], batch['mask'], batch['ignore'],
                   iou_threshold=0.5)
  cls_sum, _, npos = ref_multibox(out['cls_logits'], out['box_deltas'], refined, m, m.labels,
                                  eligible=np.zeros((B, A), bool))
  np.testing.assert_allclose(float(on['odm_cls_loss']), cls_sum / npos, rtol=1e-4)
  assert float(on['odm_cls_loss']) < float(off['odm_cls_loss'])
