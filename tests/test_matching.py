"""Matching against NumPy loop references (ours and torchvision's SSDMatcher)."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from smallssd_jax import anchors as anchor_lib
from smallssd_jax import matching

THR = 0.5
M = 8
# 184 small SSD-style priors: dense enough for collisions and threshold matches.
ANCHORS = anchor_lib.ssd_anchors([6, 3, 1], [[2], [2], [2]], scales=[0.15, 0.35, 0.6, 0.9])


# Jitted once per shape: eager dispatch of the matcher's many small ops is slow.
_match = jax.jit(matching.match, static_argnames='iou_threshold')


@functools.cache
def _jit_match_batch():
  return jax.jit(lambda a, b, l, m, i: matching.match_batch(a, b, l, m, i, THR))


def _yxyx(anchors):
  cy, cx, h, w = (anchors[:, i].astype(np.float64) for i in range(4))
  return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], 1)


def _ref_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, (ay0, ax0, ay1, ax1) in enumerate(a):
    for j, (by0, bx0, by1, bx1) in enumerate(b):
      ih = max(0.0, min(ay1, by1) - max(ay0, by0))
      iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
      union = (ay1 - ay0) * (ax1 - ax0) + (by1 - by0) * (bx1 - bx0) - ih * iw
      out[i, j] = ih * iw / union if union > 0 else 0.0
  return out


def _valid(gt, mask):
  return [bool(mask[g]) and bool(np.all(np.isfinite(gt[g]))) and gt[g, 2] > gt[g, 0]
          and gt[g, 3] > gt[g, 1] for g in range(len(gt))]


def _overlaps(anchors, gt, mask):
  valid = _valid(gt, mask)
  ious = np.full((len(gt), len(anchors)), -1.0)
  for g in range(len(gt)):
    if valid[g]:
      ious[g] = _ref_iou(gt[g:g + 1].astype(np.float64), _yxyx(anchors))[0]
  return ious, valid


def ref_match(anchors, gt, labels, mask, ignore, thr=THR):
  """The documented rule, one ground truth and one anchor at a time."""
  num_a = len(anchors)
  ious, valid = _overlaps(anchors, gt, mask)
  forceable = [valid[g] and not ignore[g] for g in range(len(gt))]
  order = sorted([g for g in range(len(gt)) if forceable[g]], key=lambda g: (-ious[g].max(), g))
  claimed = [-1] * num_a
  for g in order:
    best_a, best = -1, -np.inf
    for a in range(num_a):
      if claimed[a] < 0 and ious[g, a] > best:
        best_a, best = a, ious[g, a]
    if best > 0:
      claimed[best_a] = g
  positive = np.zeros(num_a, bool)
  ign = np.zeros(num_a, bool)
  index = np.full(num_a, -1)
  for a in range(num_a):
    best_g = int(np.argmax(ious[:, a]))
    if claimed[a] >= 0:
      positive[a], index[a] = True, claimed[a]
    elif ious[best_g, a] >= thr:
      if ignore[best_g]:
        ign[a] = True
      else:
        positive[a], index[a] = True, best_g
  labels_out = np.where(positive, labels[np.maximum(index, 0)], 0)
  return positive, ign, index, labels_out, ious


def torchvision_ssd_matcher(anchors, gt, thr=THR):
  """torchvision.models.detection._utils.SSDMatcher (Matcher + forced best prior)."""
  ious = _ref_iou(gt.astype(np.float64), _yxyx(anchors))          # [M, A]
  matches = ious.argmax(0)
  matches = np.where(ious.max(0) >= thr, matches, -1)
  for g, a in enumerate(ious.argmax(1)):                           # later ground truth wins
    matches[a] = g
  return matches


def _random_image(rng, num_valid, with_bad=True):
  yx = rng.uniform(0, 0.9, (M, 2))
  hw = rng.uniform(0.03, 0.5, (M, 2))
  gt = np.concatenate([yx, np.minimum(yx + hw, 1.0)], 1).astype(np.float32)
  labels = rng.integers(1, 6, M).astype(np.int32)
  mask = np.arange(M) < num_valid
  ignore = (rng.uniform(size=M) < 0.2) & mask
  if with_bad:
    # Padding slots hold junk that the mask must hide; some real slots are degenerate.
    gt[~mask] = rng.uniform(-1, 2, (M - num_valid, 4))
    bad = rng.integers(0, 4, M)
    sel = mask & (rng.uniform(size=M) < 0.2)
    gt[sel & (bad == 0)] = gt[sel & (bad == 0)][:, [2, 3, 0, 1]]          # inverted
    gt[sel & (bad == 1), 2] = gt[sel & (bad == 1), 0]                       # zero height
    gt[sel & (bad == 2), 1] = np.nan
  return gt, labels, mask, ignore


def _run(gt, labels, mask, ignore, anchors=ANCHORS):
  out = _jit_match_batch()(anchors, gt[None], labels[None], mask[None], ignore[None])
  return jax.tree.map(lambda x: np.asarray(x)[0], out)


def _well_separated(ious, thr=THR):
  """No IoU within float32 noise of the threshold, and no near-ties for a maximum."""
  v = ious[ious >= 0]
  if np.any(np.abs(v - thr) < 1e-5):
    return False
  for row in list(ious) + list(ious.T):
    top = np.sort(row[row >= 0])[::-1]
    if len(top) > 1 and top[0] > 0 and top[0] - top[1] < 1e-5:
      return False
  return True


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), num_valid=st.integers(0, M))
def test_match_equals_loop_reference(seed, num_valid):
  rng = np.random.default_rng(seed)
  gt, labels, mask, ignore = _random_image(rng, num_valid)
  positive, ign, index, ref_labels, ious = ref_match(ANCHORS, gt, labels, mask, ignore)
  hypothesis.assume(_well_separated(ious))
  got = _run(gt, labels, mask, ignore)
  np.testing.assert_array_equal(got.positive, positive)
  np.testing.assert_array_equal(got.ignore, ign)
  np.testing.assert_array_equal(got.matched_index, index)
  np.testing.assert_array_equal(got.labels, ref_labels)
  assert np.isfinite(got.matched_boxes).all()
  # Positives carry their ground truth's box; the rest their own anchor's.
  np.testing.assert_allclose(got.matched_boxes[positive], gt[index[positive]], atol=1e-6)
  np.testing.assert_allclose(got.matched_boxes[~positive], _yxyx(ANCHORS)[~positive], atol=1e-6)
  # Every valid, non-ignored ground truth gets at least one positive of its own.
  for g in range(M):
    if _valid(gt, mask)[g] and not ignore[g] and ious[g].max() > 0:
      assert np.any(got.matched_index == g), g
  assert not np.any(got.positive & got.ignore)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), num_valid=st.integers(1, 4))
def test_match_equals_torchvision_ssd_matcher_without_collisions(seed, num_valid):
  rng = np.random.default_rng(seed)
  gt, labels, mask, _ = _random_image(rng, num_valid, with_bad=False)
  ious = _ref_iou(gt[:num_valid].astype(np.float64), _yxyx(ANCHORS))
  best = ious.argmax(1)
  hypothesis.assume(len(set(best)) == len(best) and ious.max(1).min() > 0)
  hypothesis.assume(_well_separated(ious))
  got = _run(gt, labels, mask, np.zeros(M, bool))
  np.testing.assert_array_equal(got.matched_index, torchvision_ssd_matcher(ANCHORS, gt[:num_valid]))


ANCHOR_A = np.array([[0.5, 0.5, 0.4, 0.4],      # yxyx 0.3..0.7
                     [0.5, 0.5, 0.8, 0.8],      # yxyx 0.1..0.9
                     [0.1, 0.1, 0.05, 0.05]], np.float32)


def test_collision_gives_each_ground_truth_its_own_prior():
  # Both boxes' best prior is 0. torchvision hands it to the later box and the
  # first one (IoU 0.25 with prior 1) would end up with no positive at all.
  gt = np.array([[0.3, 0.3, 0.7, 0.7], [0.35, 0.35, 0.55, 0.55]], np.float32)
  got = _match(ANCHOR_A, gt, np.array([3, 4]), np.ones(2, bool), np.zeros(2, bool))
  np.testing.assert_array_equal(np.asarray(got.matched_index), [0, 1, -1])
  np.testing.assert_array_equal(np.asarray(got.labels), [3, 4, 0])
  np.testing.assert_array_equal(torchvision_ssd_matcher(ANCHOR_A, gt), [1, -1, -1])


def test_ignored_ground_truth():
  gt = np.array([[0.3, 0.3, 0.7, 0.7], [0.05, 0.05, 0.15, 0.15], [0.0, 0.0, 0.02, 0.02]], np.float32)
  ignore = np.array([True, False, True])
  got = _match(ANCHOR_A, gt, np.array([1, 2, 3]), np.ones(3, bool), ignore)
  # Prior 0 overlaps the ignored box 0 with IoU 1: ignored. Prior 1's best is box 0
  # at IoU 0.25: a plain negative. Ignored boxes take no prior of their own.
  np.testing.assert_array_equal(np.asarray(got.positive), [False, False, True])
  np.testing.assert_array_equal(np.asarray(got.ignore), [True, False, False])
  np.testing.assert_array_equal(np.asarray(got.labels), [0, 0, 2])


def test_bad_ground_truth_is_dropped():
  gt = np.array([[0.7, 0.7, 0.3, 0.3],              # inverted
                 [0.3, 0.3, 0.3, 0.7],              # zero height
                 [np.nan, 0.3, 0.7, 0.7],           # not finite
                 [0.3, 0.3, 0.7, 0.7]], np.float32)  # padding (mask False)
  mask = np.array([True, True, True, False])
  got = _run(np.pad(gt, [(0, M - 4), (0, 0)]), np.ones(M, np.int32), np.pad(mask, (0, M - 4)),
             np.zeros(M, bool))
  assert not got.positive.any() and not got.ignore.any()
  assert (got.labels == 0).all() and np.isfinite(got.matched_boxes).all()


def test_batch_equals_per_image_and_handles_all_padding():
  # Exact IoU ties (symmetric priors) may break either way between two compiled
  # programs, so take images without them.
  rng = np.random.default_rng(7)
  images = []
  for n in (0, 3, 8):
    image = _random_image(rng, n)
    while not _well_separated(_overlaps(ANCHORS, image[0], image[2])[0]):
      image = _random_image(rng, n)
    images.append(image)
  stacked = [np.stack(x) for x in zip(*images)]
  got = _jit_match_batch()(ANCHORS, *stacked)
  for b, image in enumerate(images):
    one = _match(ANCHORS, *image, iou_threshold=THR)
    for field in one._fields:
      np.testing.assert_array_equal(np.asarray(getattr(got, field))[b], np.asarray(getattr(one, field)))
  assert not np.asarray(got.positive)[0].any()


def test_per_image_anchors():
  gt = np.array([[[0.3, 0.3, 0.7, 0.7]]] * 2, np.float32)
  anchors = np.stack([ANCHOR_A, ANCHOR_A[::-1]])
  got = jax.jit(matching.match_batch)(jnp.asarray(anchors), gt, np.ones((2, 1), np.int32),
                             np.ones((2, 1), bool), np.zeros((2, 1), bool), THR)
  np.testing.assert_array_equal(np.asarray(got.positive), [[True, False, False], [False, False, True]])
