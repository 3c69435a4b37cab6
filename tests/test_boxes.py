"""Box arithmetic against per-box NumPy loops and torchvision's BoxCoder formulas."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallssd_jax import boxes as box_lib

VAR = (0.1, 0.1, 0.2, 0.2)


def _ref_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, (ay0, ax0, ay1, ax1) in enumerate(a):
    for j, (by0, bx0, by1, bx1) in enumerate(b):
      ih = max(0.0, min(ay1, by1) - max(ay0, by0))
      iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
      inter = ih * iw
      union = max(0.0, ay1 - ay0) * max(0.0, ax1 - ax0) + max(0.0, by1 - by0) * max(0.0, bx1 - bx0) - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def _random_boxes(rng, n, degenerate=0.0):
  yx = rng.uniform(0, 1, (n, 2))
  hw = rng.uniform(0, 0.5, (n, 2))
  b = np.concatenate([yx, yx + hw], axis=1)
  flip = rng.uniform(size=n) < degenerate / 2
  b[flip] = b[flip][:, [2, 3, 0, 1]]              # inverted
  flat = rng.uniform(size=n) < degenerate / 2
  b[flat, 2] = b[flat, 0]                          # zero height
  return b.astype(np.float32)


def test_iou_matches_loop_reference_including_degenerate_boxes():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 30, 0.3), _random_boxes(rng, 40, 0.3)
  got = np.asarray(jax.jit(box_lib.iou)(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got, _ref_iou(a, b), atol=1e-6)
  assert np.isfinite(got).all()
  # NumPy in, NumPy out (host code never needs a JAX backend).
  got_np = box_lib.iou(a, b)
  assert isinstance(got_np, np.ndarray)
  np.testing.assert_allclose(got_np, _ref_iou(a, b), atol=1e-6)


def test_iou_zero_area_pairs_are_zero_with_finite_gradient():
  a = jnp.array([[0.2, 0.2, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3]])
  b = jnp.array([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]])
  got, grad = jax.jit(jax.value_and_grad(lambda x: box_lib.iou(x, b).sum()))(a)
  assert float(got) == 0.0
  np.testing.assert_array_equal(np.asarray(box_lib.iou(np.asarray(a), np.asarray(b))), np.zeros((2, 2)))
  assert np.isfinite(np.asarray(grad)).all()


def test_iou_identical_and_half_overlap():
  a = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
  b = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.5], [2.0, 2.0, 3.0, 3.0]], np.float32)
  np.testing.assert_allclose(box_lib.iou(a, b), [[1.0, 1.0 / 3.0, 0.0]], rtol=1e-6)


def test_iou_broadcasts_over_batch():
  rng = np.random.default_rng(1)
  a = np.stack([_random_boxes(rng, 5) for _ in range(3)])
  b = np.stack([_random_boxes(rng, 7) for _ in range(3)])
  got = np.asarray(jax.jit(box_lib.iou)(jnp.asarray(a), jnp.asarray(b)))
  assert got.shape == (3, 5, 7)
  for i in range(3):
    np.testing.assert_allclose(got[i], _ref_iou(a[i], b[i]), atol=1e-6)


def test_area_clamps_inverted_boxes():
  b = np.array([[0.1, 0.2, 0.3, 0.6], [0.5, 0.5, 0.4, 0.9]], np.float32)
  np.testing.assert_allclose(box_lib.area(b), [0.2 * 0.4, 0.0], rtol=1e-6)


def test_conversions():
  yxyx = np.array([[0.1, 0.2, 0.5, 0.8]], np.float32)
  np.testing.assert_allclose(box_lib.yxyx_to_xyxy(yxyx), [[0.2, 0.1, 0.8, 0.5]])
  np.testing.assert_allclose(box_lib.xyxy_to_yxyx(box_lib.yxyx_to_xyxy(yxyx)), yxyx)
  np.testing.assert_allclose(box_lib.yxyx_to_cycxhw(yxyx), [[0.3, 0.5, 0.4, 0.6]], rtol=1e-6)
  np.testing.assert_allclose(box_lib.cycxhw_to_yxyx(box_lib.yxyx_to_cycxhw(yxyx)), yxyx, rtol=1e-6)
  px = box_lib.normalised_to_pixels(yxyx, (200, 100))
  np.testing.assert_allclose(px, [[20.0, 20.0, 100.0, 80.0]], rtol=1e-6)
  assert px.dtype == np.float32
  np.testing.assert_allclose(box_lib.pixels_to_normalised(px, (200, 100)), yxyx, rtol=1e-6)
  # Per-image sizes broadcast over the box axis; JAX in, JAX out.
  batch = jnp.asarray(np.stack([yxyx, yxyx]))
  sizes = jnp.array([[200, 100], [10, 20]])
  got = box_lib.normalised_to_pixels(batch, sizes[:, None, :])
  assert isinstance(got, jax.Array)
  np.testing.assert_allclose(np.asarray(got)[1], [[1.0, 4.0, 5.0, 16.0]], rtol=1e-6)


def _ref_encode(box, anchor):
  y0, x0, y1, x1 = (float(v) for v in box)
  acy, acx, ah, aw = (float(v) for v in anchor)
  cy, cx, h, w = (y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0
  return [(cy - acy) / ah / 0.1, (cx - acx) / aw / 0.1, math.log(h / ah) / 0.2, math.log(w / aw) / 0.2]


def _torchvision_decode(rel_codes_xywh, anchors_xyxy, weights=(10.0, 10.0, 5.0, 5.0)):
  """torchvision.models.detection._utils.BoxCoder.decode_single, one box at a time."""
  out = []
  clip = math.log(1000.0 / 16)
  for (dx, dy, dw, dh), (x1, y1, x2, y2) in zip(rel_codes_xywh, anchors_xyxy):
    widths, heights = x2 - x1, y2 - y1
    ctr_x, ctr_y = x1 + 0.5 * widths, y1 + 0.5 * heights
    dx, dy = dx / weights[0], dy / weights[1]
    dw, dh = min(dw / weights[2], clip), min(dh / weights[3], clip)
    pcx, pcy = dx * widths + ctr_x, dy * heights + ctr_y
    pw, ph = math.exp(dw) * widths, math.exp(dh) * heights
    out.append([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph])
  return np.array(out)


def test_encode_matches_loop_reference():
  rng = np.random.default_rng(2)
  boxes = _random_boxes(rng, 50) + np.float32(0.01) * np.array([0, 0, 1, 1], np.float32)
  anchors = np.concatenate([rng.uniform(0, 1, (50, 2)), rng.uniform(0.05, 0.6, (50, 2))], 1).astype(np.float32)
  got = np.asarray(jax.jit(box_lib.encode_boxes)(jnp.asarray(boxes), jnp.asarray(anchors)))
  ref = np.array([_ref_encode(b, a) for b, a in zip(boxes, anchors)])
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_decode_matches_torchvision_box_coder_with_clamp():
  rng = np.random.default_rng(3)
  anchors = np.concatenate([rng.uniform(0, 1, (40, 2)), rng.uniform(0.05, 0.6, (40, 2))], 1)
  deltas = rng.normal(0, 2, (40, 4))
  deltas[:5, 2:] = 50.0          # beyond the log(1000/16) clamp
  got = np.asarray(jax.jit(box_lib.decode_boxes)(jnp.asarray(deltas, jnp.float32),
                                                 jnp.asarray(anchors, jnp.float32)))
  anchors_xyxy = np.stack([anchors[:, 1] - anchors[:, 3] / 2, anchors[:, 0] - anchors[:, 2] / 2,
                           anchors[:, 1] + anchors[:, 3] / 2, anchors[:, 0] + anchors[:, 2] / 2], 1)
  ref_xyxy = _torchvision_decode(deltas[:, [1, 0, 3, 2]], anchors_xyxy)
  np.testing.assert_allclose(got, ref_xyxy[:, [1, 0, 3, 2]], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:5, 2] - got[:5, 0], anchors[:5, 2] * 1000 / 16, rtol=1e-5)


def test_decode_broadcasts_and_promotes_bfloat16():
  anchors = jnp.array([[0.5, 0.5, 0.2, 0.1], [0.3, 0.3, 0.1, 0.1]], jnp.float32)
  deltas = jnp.zeros((3, 2, 4), jnp.bfloat16)
  got = jax.jit(box_lib.decode_boxes)(deltas, anchors)
  assert got.shape == (3, 2, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got[2, 0]), [0.4, 0.45, 0.6, 0.55], rtol=1e-6)


def test_encode_degenerate_boxes_is_finite():
  boxes = jnp.array([[0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0]])
  anchors = jnp.array([[0.3, 0.3, 0.1, 0.1]] * 3)
  value, grad = jax.jit(jax.value_and_grad(lambda b: box_lib.encode_boxes(b, anchors).sum()))(boxes)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


_coord = st.floats(0.0, 1.0, allow_nan=False, width=32)
_jit_round_trip = jax.jit(lambda b, a: box_lib.decode_boxes(box_lib.encode_boxes(b, a, VAR), a, VAR))


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(y=_coord, x=_coord, h=st.floats(1e-3, 1.0), w=st.floats(1e-3, 1.0),
                  acy=_coord, acx=_coord, ah=st.floats(0.01, 1.0), aw=st.floats(0.01, 1.0))
def test_decode_inverts_encode(y, x, h, w, acy, acx, ah, aw):
  box = np.array([[y, x, y + h, x + w]], np.float32)
  anchor = np.array([[acy, acx, ah, aw]], np.float32)
  # Inside the clamp's range, decode is the exact inverse.
  hypothesis.assume(math.log(h / ah) < math.log(1000 / 16) and math.log(w / aw) < math.log(1000 / 16))
  dec = np.asarray(_jit_round_trip(jnp.asarray(box), jnp.asarray(anchor)))
  np.testing.assert_allclose(dec, box, atol=2e-5)
  # The NumPy path agrees with the JAX path.
  np.testing.assert_allclose(box_lib.decode_boxes(box_lib.encode_boxes(box, anchor), anchor), box, atol=2e-5)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(d=st.lists(st.floats(-5.0, 5.0), min_size=4, max_size=4))
def test_encode_inverts_decode(d):
  anchor = np.array([[0.4, 0.6, 0.2, 0.3]], np.float32)
  deltas = np.array([d], np.float32)
  dec = box_lib.decode_boxes(deltas, anchor)
  np.testing.assert_allclose(box_lib.encode_boxes(dec, anchor), deltas, atol=1e-3)


def test_jit():
  f = jax.jit(lambda a, b: (box_lib.iou(a, b), box_lib.decode_boxes(box_lib.encode_boxes(a, b), b)))
  a = jnp.array([[0.1, 0.1, 0.4, 0.5]])
  b = jnp.array([[0.3, 0.3, 0.2, 0.2]])
  i, d = f(a, b)
  assert i.shape == (1, 1)
  np.testing.assert_allclose(np.asarray(d), np.asarray(a), atol=1e-6)


if __name__ == '__main__':
  pytest.main([__file__])
