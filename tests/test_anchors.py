"""Prior generators against torchvision / ssd.pytorch loops and the presets' counts."""

import itertools
import math

import numpy as np
import pytest

from smallssd_jax import anchors as anchor_lib
from smallssd_jax import config_blocks

TV_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
TV_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
TV_STEPS = [8, 16, 32, 64, 100, 300]
SSD300_MAPS = [38, 19, 10, 5, 3, 1]


def torchvision_default_boxes(grid_sizes, image_size, aspect_ratios, scales, steps, clip):
  """torchvision DefaultBoxGenerator (anchor_utils.py), as loops.

  `_generate_wh_pairs`, then `_grid_default_boxes`: per level, centres
  `(arange(f) + 0.5) / (image_size / step)` in float32, row-major (meshgrid
  'ij' over (y, x)), each location repeating the level's (w, h) pairs, which are
  clamped to [0, 1] when `clip`. Output rows are (cx, cy, w, h) normalised;
  `forward` then makes pixel xyxy.
  """
  rows = []
  for k, f in enumerate(grid_sizes):
    s_k = scales[k]
    s_prime = math.sqrt(scales[k] * scales[k + 1])
    wh = [[s_k, s_k], [s_prime, s_prime]]
    for ar in aspect_ratios[k]:
      sq = math.sqrt(ar)
      wh.extend([[s_k * sq, s_k / sq], [s_k / sq, s_k * sq]])
    wh = np.asarray(wh, np.float32)
    if clip:
      wh = np.clip(wh, 0, 1)
    f_k = np.float32(image_size / steps[k])
    for y in range(f):
      for x in range(f):
        cx = (np.float32(x) + np.float32(0.5)) / f_k
        cy = (np.float32(y) + np.float32(0.5)) / f_k
        for w, h in wh:
          rows.append([cx, cy, w, h])
  cxcywh = np.asarray(rows, np.float32)
  xyxy = np.concatenate([cxcywh[:, :2] - 0.5 * cxcywh[:, 2:], cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]], 1)
  return cxcywh, xyxy * image_size


def to_cxcywh(anchors):
  return anchors[:, [1, 0, 3, 2]]


def test_torchvision_coco_ssd300_priors_loop_reference():
  ours = anchor_lib.ssd_anchors(SSD300_MAPS, TV_RATIOS, image_size=300, steps=TV_STEPS,
                                scales=TV_SCALES, clip=True)
  ref, ref_xyxy = torchvision_default_boxes(SSD300_MAPS, 300, TV_RATIOS, TV_SCALES, TV_STEPS, True)
  assert ours.shape == (8732, 4) and ours.dtype == np.float32
  np.testing.assert_allclose(to_cxcywh(ours), ref, atol=1e-6, rtol=0)
  c = to_cxcywh(ours).astype(np.float64)
  xyxy = np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1) * 300
  np.testing.assert_allclose(xyxy, ref_xyxy, atol=3e-4)


def test_torchvision_coco_ssd300_priors_from_source_formulas():
  """Spot values worked out by hand from DefaultBoxGenerator's source."""
  a = anchor_lib.ssd_anchors(SSD300_MAPS, TV_RATIOS, image_size=300, steps=TV_STEPS,
                             scales=TV_SCALES, clip=True)
  r2 = math.sqrt(2)
  # conv4_3, location (0, 0): centre 0.5 * 8 / 300; 4 priors.
  c = 4.0 / 300
  np.testing.assert_allclose(a[0], [c, c, 0.07, 0.07], atol=1e-6)
  sp = math.sqrt(0.07 * 0.15)
  np.testing.assert_allclose(a[1], [c, c, sp, sp], atol=1e-6)
  np.testing.assert_allclose(a[2], [c, c, 0.07 / r2, 0.07 * r2], atol=1e-6)   # w = s sqrt(2)
  np.testing.assert_allclose(a[3], [c, c, 0.07 * r2, 0.07 / r2], atol=1e-6)
  # conv4_3, location (y=1, x=2): row-major, 4 priors per location.
  i = (1 * 38 + 2) * 4
  np.testing.assert_allclose(a[i, :2], [1.5 * 8 / 300, 2.5 * 8 / 300], atol=1e-6)
  # conv11_2 (1x1, step 300): centre 0.5; ratio-2 prior w = 0.87 sqrt(2) > 1 is clipped.
  last = a[-4:]
  np.testing.assert_allclose(last[:, :2], 0.5, atol=1e-6)
  np.testing.assert_allclose(last[1, 2], math.sqrt(0.87 * 1.05), atol=1e-6)
  np.testing.assert_allclose(last[2], [0.5, 0.5, 0.87 / r2, 1.0], atol=1e-6)
  np.testing.assert_allclose(last[3], [0.5, 0.5, 1.0, 0.87 / r2], atol=1e-6)
  # conv8_2 (10x10, step 32): the last centre lies past the image, as in torchvision.
  start = 38 * 38 * 4 + 19 * 19 * 6
  np.testing.assert_allclose(a[start + 99 * 6 + 5, :2], [9.5 * 32 / 300] * 2, atol=1e-6)


def ssd_pytorch_priorbox(image_size, feature_maps, min_sizes, max_sizes, steps, aspect_ratios):
  """ssd.pytorch layers/functions/prior_box.py PriorBox.forward (clip off), as loops."""
  mean = []
  for k, f in enumerate(feature_maps):
    for i, j in itertools.product(range(f), repeat=2):
      f_k = image_size / steps[k]
      cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
      s_k = min_sizes[k] / image_size
      mean += [cx, cy, s_k, s_k]
      s_k_prime = math.sqrt(s_k * (max_sizes[k] / image_size))
      mean += [cx, cy, s_k_prime, s_k_prime]
      for ar in aspect_ratios[k]:
        mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
        mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
  return np.asarray(mean).reshape(-1, 4)


@pytest.mark.parametrize('size', [300, 512])
def test_ssd_preset_matches_ssd_pytorch_priorbox(size):
  cfg = config_blocks.ssd_model(size).anchors
  ours = anchor_lib.from_config(cfg)
  ref = ssd_pytorch_priorbox(size, cfg.feature_maps, cfg.min_sizes, cfg.max_sizes, cfg.steps,
                             cfg.aspect_ratios)
  np.testing.assert_allclose(to_cxcywh(ours), ref, atol=1e-6)
  # An explicit input size agrees with the inferred one.
  np.testing.assert_array_equal(anchor_lib.from_config(cfg, size), ours)


@pytest.mark.parametrize('fn,size,count', [
    (config_blocks.ssd_model, 300, 8732), (config_blocks.ssd_model, 512, 24564),
    (config_blocks.dfssd_model, 300, 15966), (config_blocks.skipfpn_model, 320, 6375),
    (config_blocks.skipfpn_model, 512, 16320)])
def test_preset_anchor_counts(fn, size, count):
  cfg = fn(size).anchors
  a = anchor_lib.from_config(cfg)
  assert a.shape == (count, 4) and a.dtype == np.float32
  per = anchor_lib.anchors_per_location(cfg)
  assert sum(p * f * f for p, f in zip(per, cfg.feature_maps)) == count
  assert anchor_lib.anchors_per_level(cfg, size) == per
  assert np.all(a[:, 2:] > 0)


def test_dfssd_priors_loop_reference():
  cfg = config_blocks.dfssd_model(300).anchors
  assert anchor_lib.anchors_per_location(cfg) == [9, 6, 6, 6, 6]
  a = anchor_lib.from_config(cfg)
  m = 5
  s = [0.1 + (0.9 - 0.1) * k / (m - 1) for k in range(m + 1)]   # formula 5, extended linearly
  rows = []
  for k, f in enumerate([38, 19, 10, 5, 3]):
    cell = []
    for r in [1.0, 2.0, 0.5, 3.0, 1.0 / 3.0]:
      cell.append((s[k] / math.sqrt(r), s[k] * math.sqrt(r)))
      if r == 1.0:
        cell.append((math.sqrt(s[k] * s[k + 1]),) * 2)
    if k == 0:
      cell += [(s[0] / 2 / math.sqrt(r), s[0] / 2 * math.sqrt(r)) for r in [1.0, 2.0, 0.5]]
    for y in range(f):
      for x in range(f):
        rows += [[(y + 0.5) / f, (x + 0.5) / f, h, w] for h, w in cell]
  np.testing.assert_allclose(a, np.asarray(rows), atol=1e-6)
  np.testing.assert_allclose(s[:5], [0.1, 0.3, 0.5, 0.7, 0.9])


def test_dfssd_anchors_per_location_mismatch_raises():
  cfg = config_blocks.dfssd_model(300).anchors
  cfg.anchors_per_location = [6, 6, 6, 6, 6]
  with pytest.raises(ValueError, match='anchors_per_location'):
    anchor_lib.from_config(cfg)
  with pytest.raises(ValueError, match='anchors_per_location'):
    anchor_lib.anchors_per_location(cfg)


def test_refinedet_priors_loop_reference():
  cfg = config_blocks.skipfpn_model(320).anchors
  a = anchor_lib.from_config(cfg)
  rows = []
  for f, stride in zip([40, 20, 10, 5], [8, 16, 32, 64]):
    size = 4 * stride / 320
    for y in range(f):
      for x in range(f):
        for r in [0.5, 1.0, 2.0]:
          rows.append([(y + 0.5) * stride / 320, (x + 0.5) * stride / 320,
                       size / math.sqrt(r), size * math.sqrt(r)])
  np.testing.assert_allclose(a, np.asarray(rows), atol=1e-6)
  assert math.isclose(a[0, 2] * 320, 32 * math.sqrt(2), rel_tol=1e-6)   # 32 px at ratio 1/2


def test_order_is_level_then_row_major_then_location():
  a = anchor_lib.ssd_anchors([2, 1], [[2], []], image_size=2, steps=[1, 2],
                             min_sizes=[1, 2], max_sizes=[2, 2])
  assert a.shape == (2 * 2 * 4 + 1 * 2, 4)
  np.testing.assert_allclose(a[:16:4, :2], [[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]])
  np.testing.assert_allclose(a[16:, :2], [[0.5, 0.5], [0.5, 0.5]])


def test_clip_limits_sizes_not_centres():
  kw = dict(image_size=300, steps=TV_STEPS, scales=TV_SCALES)
  raw = anchor_lib.ssd_anchors(SSD300_MAPS, TV_RATIOS, clip=False, **kw)
  clipped = anchor_lib.ssd_anchors(SSD300_MAPS, TV_RATIOS, clip=True, **kw)
  assert raw[:, 2:].max() > 1 and clipped[:, 2:].max() <= 1
  np.testing.assert_array_equal(raw[:, :2], clipped[:, :2])
  assert clipped[:, :2].max() > 1     # centres are left alone (torchvision)


def test_missing_sizes_raise():
  with pytest.raises(ValueError):
    anchor_lib.ssd_anchors([38], [[2]], steps=[8], min_sizes=[30], max_sizes=[60])
  cfg = config_blocks.ssd_model(300).anchors
  cfg.style = 'nope'
  with pytest.raises(ValueError, match='style'):
    anchor_lib.from_config(cfg)


def test_input_size_inference_refuses_inconsistent_configs():
  cfg = config_blocks.ssd_model(400).anchors    # last map 3x3 with a 400 px step: 1200?
  del cfg['input_size']                   # presets state it; inference is the fallback
  with pytest.raises(ValueError, match='input size'):
    anchor_lib.from_config(cfg)
  assert anchor_lib.from_config(cfg, 400).shape[0] == anchor_lib.prior_count(cfg)
