"""Augmentation ops on hand-made examples with known answers."""

import io
import sys

import numpy as np
from PIL import Image
import pytest

from smallssd_jax import config_blocks
from smallssd_jax import batch_layout
from smallssd_jax.datasets import geometry
from smallssd_jax.datasets import ops as ops_lib
from smallssd_jax.datasets import photometric
from smallssd_jax.datasets import resize as resize_lib
from smallssd_jax.datasets import records

MEAN = (123, 117, 104)


def _example(image, boxes, labels=None, ignore=None):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  n = len(boxes)
  return records.make_example(
      image=image, boxes=boxes,
      labels=np.arange(1, n + 1) if labels is None else labels,
      ignore=np.zeros(n, bool) if ignore is None else ignore,
      image_id=0, orig_size=image.shape[:2] if isinstance(image, np.ndarray) else (0, 0),
      key='test')


def _random_boxes(rng, n):
  yx0 = rng.uniform(0, 0.8, (n, 2))
  hw = rng.uniform(0.02, 0.3, (n, 2))
  return np.concatenate([yx0, np.minimum(yx0 + hw, 1.0)], 1).astype(np.float32)


def test_flip_twice_is_identity():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
  ex = _example(image, _random_boxes(rng, 5))
  twice = geometry.hflip(geometry.hflip(ex))
  np.testing.assert_allclose(twice['boxes'], ex['boxes'], atol=1e-6)
  np.testing.assert_array_equal(resize_lib.resize(twice, size=48)['image'], image)
  once = resize_lib.resize(geometry.hflip(ex), size=48)
  np.testing.assert_array_equal(once['image'], image[:, ::-1])
  b = ex['boxes']
  mirrored = np.stack([b[:, 0], 1 - b[:, 3], b[:, 2], 1 - b[:, 1]], 1)
  np.testing.assert_allclose(once['boxes'], mirrored, atol=1e-6)


def _reference_crop(boxes, labels, region):
  """Independent NumPy reference of Caffe's centre rule + clip."""
  y0, x0, y1, x1 = region
  out_b, out_l = [], []
  for b, l in zip(boxes, labels):
    cy, cx = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    if not (y0 <= cy <= y1 and x0 <= cx <= x1):
      continue
    nb = np.array([(b[0] - y0) / (y1 - y0), (b[1] - x0) / (x1 - x0),
                   (b[2] - y0) / (y1 - y0), (b[3] - x0) / (x1 - x0)])
    nb = np.clip(nb, 0, 1)
    if nb[2] > nb[0] and nb[3] > nb[1]:
      out_b.append(nb)
      out_l.append(l)
  return np.array(out_b).reshape(-1, 4), np.array(out_l, np.int32)


def test_crop_keeps_exactly_boxes_with_centres_inside():
  rng = np.random.default_rng(1)
  image = np.zeros((20, 20, 3), np.uint8)
  for trial in range(50):
    boxes = _random_boxes(rng, 12)
    ex = _example(image, boxes)
    y0, x0 = rng.uniform(0, 0.6, 2)
    region = (y0, x0, y0 + rng.uniform(0.2, 0.4), x0 + rng.uniform(0.2, 0.4))
    out = geometry.crop(ex, region)
    ref_b, ref_l = _reference_crop(boxes, ex['labels'], region)
    np.testing.assert_array_equal(out['labels'], ref_l, err_msg=f'trial {trial}')
    np.testing.assert_allclose(out['boxes'], ref_b, atol=1e-5)
    assert len(out['ignore']) == len(out['labels'])
    assert np.all(out['boxes'][:, 2] > out['boxes'][:, 0])
    assert np.all(out['boxes'][:, 3] > out['boxes'][:, 1])


def test_min_iou_crop_matches_its_sampled_region():
  rng = np.random.default_rng(2)
  image = np.zeros((20, 20, 3), np.uint8)
  for seed in range(20):
    ex = _example(image, _random_boxes(rng, 6))
    region = geometry.sample_min_iou_crop(ex['boxes'], np.random.default_rng(seed))
    out = geometry.min_iou_crop(ex, np.random.default_rng(seed))
    ref_b, ref_l = _reference_crop(ex['boxes'], ex['labels'], region)
    np.testing.assert_array_equal(out['labels'], ref_l)
    np.testing.assert_allclose(out['boxes'], ref_b, atol=1e-5)
    np.testing.assert_allclose(out.get('window', geometry.IDENTITY_WINDOW), region, atol=1e-9)


def test_min_iou_sampler_any_box_semantics_and_shape_limits():
  # A large box and a tiny one far away: a crop with IoU >= 0.7 to the large
  # box is valid although the tiny box has IoU 0 (Caffe's "any" rule).
  boxes = np.array([[0.1, 0.1, 0.9, 0.9], [0.95, 0.95, 0.97, 0.97]], np.float32)
  rng = np.random.default_rng(3)
  found = []
  for _ in range(300):
    crop = geometry.sample_min_iou_crop(boxes, rng, min_ious=(0.7,), max_trials=50)
    if not np.array_equal(crop, geometry.IDENTITY_WINDOW):
      found.append(crop)
  found = np.array(found)
  assert len(found) > 100
  ious = geometry.iou_yxyx(found, boxes)
  # Either the 0.7 sampler (IoU >= 0.7 with some box) or the unconstrained one.
  h, w = found[:, 2] - found[:, 0], found[:, 3] - found[:, 1]
  assert np.all(h * w >= 0.3 ** 2 - 1e-9) and np.all(h * w <= 1 + 1e-9)
  assert np.all(w / h >= 0.5 - 1e-9) and np.all(w / h <= 2 + 1e-9)
  assert np.all(found >= -1e-9) and np.all(found <= 1 + 1e-9)
  assert np.mean(ious.max(1) >= 0.7) > 0.3
  # Only the whole image qualifies without boxes.
  for _ in range(5):
    np.testing.assert_array_equal(
        geometry.sample_min_iou_crop(np.zeros((0, 4)), rng), geometry.IDENTITY_WINDOW)


def test_min_iou_sampler_rejects_crops_below_every_bound():
  # Bounds all above what any crop can reach: only the whole image and the
  # unconstrained sampler can fire.
  boxes = np.array([[0.0, 0.0, 0.05, 0.05]], np.float32)
  rng = np.random.default_rng(4)
  for _ in range(50):
    crop = geometry.sample_min_iou_crop(boxes, rng, min_ious=(0.95,), max_trials=20)
    assert geometry.iou_yxyx(crop[None], boxes).max() < 0.95 or np.array_equal(
        crop, geometry.IDENTITY_WINDOW)


def _red_square_example(encoded: bool):
  image = np.full((60, 80, 3), 200, np.uint8)
  image[20:36, 10:30] = (255, 0, 0)
  box = np.array([[20 / 60, 10 / 80, 36 / 60, 30 / 80]], np.float32)
  if not encoded:
    return _example(image, box)
  big = np.asarray(Image.fromarray(image).resize((640, 480), Image.NEAREST))
  buf = io.BytesIO()
  Image.fromarray(big).save(buf, 'JPEG', quality=95)
  ex = _example(big, box)
  ex['image'] = records.EncodedImage(name='red.jpg', data=buf.getvalue())
  return ex


def _check_red_box(out, size):
  img = out['image'].astype(int)
  (y0, x0, y1, x1), = out['boxes'] * size
  inner = img[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
  assert inner.size > 0
  assert np.all(inner[..., 0] > 200) and np.all(inner[..., 1] < 60), inner.mean((0, 1))
  # Just outside the box: not red.
  ring = np.concatenate([img[max(int(y0) - 2, 0), int(x0):int(x1)],
                         img[min(int(y1) + 2, size - 1), int(x0):int(x1)]])
  assert np.all(ring[:, 1] > 90)


@pytest.mark.parametrize('encoded', [False, True])
def test_zoom_out_keeps_boxes_on_their_pixels(encoded):
  size = 120
  for seed in range(6):
    ex = _red_square_example(encoded)
    out = geometry.zoom_out(ex, np.random.default_rng(seed), max_ratio=3.0, prob=1.0)
    assert 'window' in out
    out = resize_lib.resize(out, size=size, fill=MEAN)
    _check_red_box(out, size)
    # The canvas around the image is the mean colour.
    img = out['image']
    corners = [img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]]
    assert any(np.array_equal(c, MEAN) for c in corners)


def test_zoom_out_crop_flip_compose_into_one_resample():
  size = 96
  for seed in range(10):
    rng = np.random.default_rng(seed)
    ex = _red_square_example(encoded=False)
    ex = geometry.zoom_out(ex, rng, max_ratio=2.0, prob=1.0)
    ex = geometry.min_iou_crop(ex, rng, min_ious=(0.5,))
    ex = geometry.hflip(ex)
    if len(ex['boxes']) == 0:
      continue
    out = resize_lib.resize(ex, size=size, fill=MEAN)
    _check_red_box(out, size)


def test_photometric_draws_are_caffe_distributed():
  rng = np.random.default_rng(5)
  counts = {'brightness': 0, 'contrast': 0, 'saturation': 0, 'hue': 0}
  contrast_first = 0
  n = 2000
  for _ in range(n):
    ops = photometric.sample_photometric(rng)
    names = [o[0] for o in ops]
    for name, value in ops:
      counts[name] += 1
      lo, hi = {'brightness': (-32, 32), 'contrast': (0.5, 1.5), 'saturation': (0.5, 1.5),
                'hue': (-18, 18)}[name]
      assert lo <= value <= hi
    if 'brightness' in names:
      assert names[0] == 'brightness'
    if 'contrast' in names and len(names) > 1:
      contrast_first += names.index('contrast') == int('brightness' in names)
  for name, c in counts.items():
    assert abs(c / n - 0.5) < 0.05, (name, c)
  assert 0 < contrast_first < counts['contrast']


def test_photometric_pixel_ops_have_caffe_arithmetic():
  rng = np.random.default_rng(6)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  x = image.astype(np.float64)
  bright = photometric.apply_pixel_ops(image, [('brightness', 20.4)])
  np.testing.assert_array_equal(bright, np.clip(np.floor(x + 20.4 + 0.5), 0, 255))
  contrast = photometric.apply_pixel_ops(image, [('contrast', 1.3)])
  np.testing.assert_array_equal(contrast, np.clip(np.floor(x * 1.3 + 0.5), 0, 255))
  both = photometric.apply_pixel_ops(image, [('brightness', -10.0), ('contrast', 0.7)])
  step = np.clip(np.floor(x - 10 + 0.5), 0, 255)
  np.testing.assert_array_equal(both, np.clip(np.floor(step * 0.7 + 0.5), 0, 255))
  # Hue: +30 OpenCV units = 60 degrees turns pure red into yellow.
  red = np.zeros((2, 2, 3), np.uint8)
  red[..., 0] = 255
  np.testing.assert_array_equal(photometric.apply_pixel_ops(red, [('hue', 30.0)])[0, 0], (255, 255, 0))
  np.testing.assert_array_equal(photometric.apply_pixel_ops(red, [('hue', -30.0)])[0, 0], (255, 0, 255))
  # Saturation: grey stays grey, 0.5 halves the chroma, values stay in range.
  grey = np.full((2, 2, 3), 77, np.uint8)
  grey[0, 0] = 0  # black: 0 / 0 inside HSV
  with np.errstate(all='raise'):
    np.testing.assert_array_equal(photometric.apply_pixel_ops(grey, [('saturation', 1.5)]), grey)
    np.testing.assert_array_equal(photometric.apply_pixel_ops(grey, [('hue', 5.0)]), grey)
  colour = np.array([[[200, 100, 50]]], np.uint8)
  np.testing.assert_array_equal(photometric.apply_pixel_ops(colour, [('saturation', 0.5)])[0, 0],
                                (200, 150, 125))
  strong = photometric.apply_pixel_ops(image, [('saturation', 1.5), ('hue', 17.0), ('contrast', 1.5)])
  assert strong.dtype == np.uint8 and strong.shape == image.shape


def test_photometric_leaves_zoom_out_fill_alone():
  image = np.full((40, 40, 3), 100, np.uint8)
  ex = _example(image, [[0.2, 0.2, 0.5, 0.5]])
  ex = geometry.zoom_out(ex, np.random.default_rng(0), max_ratio=3.0, prob=1.0)
  ex['pixel_ops'] = [('brightness', 30.0)]
  out = resize_lib.resize(ex, size=90, fill=MEAN)['image']
  values = {tuple(int(c) for c in v) for v in out.reshape(-1, 3)}
  # Image pixels are brightened to exactly 130; the canvas stays the mean.
  assert values == {tuple(MEAN), (130, 130, 130)}


def test_resize_and_normalize():
  image = np.zeros((30, 60, 3), np.uint8)
  image[..., 0] = 10
  image[..., 2] = 250
  ex = resize_lib.resize(_example(image, [[0, 0, 1, 1]]), size=20)
  assert ex['image'].shape == (20, 20, 3)
  rgb = resize_lib.normalize(ex, mean=(10, 0, 250), std=(2, 1, 1))['image']
  assert rgb.dtype == np.float32
  np.testing.assert_allclose(rgb, 0.0, atol=1e-6)
  bgr = resize_lib.normalize(ex, mean=(250, 0, 10), std=(1, 1, 1), bgr=True)['image']
  np.testing.assert_allclose(bgr, 0.0, atol=1e-6)


@pytest.mark.parametrize('on_device', [True, False])
def test_ops_from_config(on_device):
  cfg = config_blocks.data(pixels_on_device=on_device)
  ops = ops_lib.train_ops(cfg, batch_layout.InputSpec.from_config(cfg, 64))
  # + resize, and normalize on the host path
  assert len(ops) == len(cfg.augment) + (1 if on_device else 2)
  rng = np.random.default_rng(7)
  image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  for seed in range(10):
    out = ops_lib.apply(ops, _example(image, _random_boxes(rng, 5)), np.random.default_rng(seed))
    assert out['image'].shape == (64, 64, 3)
    assert out['image'].dtype == (np.uint8 if on_device else np.float32)
    assert ('photometric_stages' in out) == on_device and 'pixel_ops' not in out
    b = out['boxes']
    assert np.all((b >= 0) & (b <= 1)) and np.all(b[:, 2:] > b[:, :2])
    assert len(out['labels']) == len(b) == len(out['ignore'])
  out = ops_lib.apply(ops_lib.eval_ops(cfg, batch_layout.InputSpec.from_config(cfg, 32)), _example(image, [[0, 0, 1, 1]]), None)
  assert out['image'].shape == (32, 32, 3)
  cfg.resize_method = 'random'   # Caffe's per-image interpolation choice
  out = ops_lib.apply(ops_lib.train_ops(cfg, batch_layout.InputSpec.from_config(cfg, 64)), _example(image, [[0, 0, 1, 1]]),
                      np.random.default_rng(0))
  assert out['image'].shape == (64, 64, 3)
  cfg.augment = ['photometric', 'rotate']
  with pytest.raises(ValueError, match='rotate'):
    ops_lib.train_ops(cfg, batch_layout.InputSpec.from_config(cfg, 64))


@pytest.mark.parametrize('method, atol', [('bilinear', 1.5), ('nearest', 2.6), ('opencv', 1.5)])
def test_resample_follows_the_window_exactly(method, atol):
  # R encodes the source column, G the source row (2 levels per pixel):
  # bilinear resampling preserves a linear ramp, so every output pixel tells
  # where in the source it was sampled.
  h, w = 100, 120
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([xx * 2, yy * 2, np.zeros_like(xx)], -1).astype(np.uint8)
  size = 64
  for seed in range(8):
    rng = np.random.default_rng(seed)
    ex = _example(image, [[0.4, 0.4, 0.6, 0.6]])
    ex = geometry.zoom_out(ex, rng, max_ratio=2.5, prob=1.0)
    ex = geometry.min_iou_crop(ex, rng, min_ious=(0.1,))
    if seed % 2:
      ex = geometry.hflip(ex)
    wy0, wx0, wy1, wx1 = ex.get('window', geometry.IDENTITY_WINDOW)
    out = resize_lib.resize(ex, size=size, fill=MEAN, method=method)['image'].astype(float)
    u = (np.arange(size) + 0.5) / size
    src_x = (wx0 + u * (wx1 - wx0)) * w - 0.5   # source pixel-centre coordinates
    src_y = (wy0 + u * (wy1 - wy0)) * h - 0.5
    cols = (src_x > 2) & (src_x < w - 3)
    rows = (src_y > 2) & (src_y < h - 3)
    assert cols.sum() > 5 and rows.sum() > 5
    inner = out[rows][:, cols]
    np.testing.assert_allclose(inner[..., 0], np.broadcast_to(2 * src_x[cols], inner.shape[:2]),
                               atol=atol)
    np.testing.assert_allclose(inner[..., 1],
                               np.broadcast_to(2 * src_y[rows, None], inner.shape[:2]), atol=atol)


def test_opencv_resample_matches_pil_on_smooth_images():
  # Same window, same output grid: on a smooth image OpenCV's (unfiltered)
  # bilinear and PIL's antialiased one agree; on noise they differ.
  rng = np.random.default_rng(5)
  yy, xx = np.mgrid[0:90, 0:130]
  smooth = np.stack([xx * 1.5, yy * 2.0, 100 + 50 * np.sin(xx / 9.0)], -1).astype(np.uint8)
  ex = geometry.reframe(_example(smooth, [[0.2, 0.2, 0.5, 0.5]]), (0.1, 0.05, 0.93, 0.88))
  pil = resize_lib.resize(ex, size=70, fill=MEAN, method='bilinear')['image'].astype(float)
  cv = resize_lib.resize(ex, size=70, fill=MEAN, method='opencv')['image'].astype(float)
  assert np.abs(pil - cv)[2:-2, 2:-2].max() <= 2.0
  noise = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
  ex = geometry.reframe(_example(noise, [[0.2, 0.2, 0.5, 0.5]]), (0.1, 0.05, 0.93, 0.88))
  pil = resize_lib.resize(ex, size=70, fill=MEAN, method='bilinear')['image'].astype(float)
  cv = resize_lib.resize(ex, size=70, fill=MEAN, method='opencv')['image'].astype(float)
  assert np.abs(pil - cv).mean() > 3.0
  with pytest.raises(ValueError, match='resize method'):
    resize_lib.resize(ex, size=70, fill=MEAN, method='cubic')


def test_opencv_resample_without_opencv_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'cv2', None)   # import cv2 -> ImportError
  resize_lib._cv2.cache_clear()
  try:
    ex = _example(np.zeros((20, 30, 3), np.uint8), [[0.2, 0.2, 0.5, 0.5]])
    ex = geometry.reframe(ex, (0.1, 0.1, 0.9, 0.9))
    with pytest.raises(ImportError, match=r'smallssd_jax\[opencv\]'):
      resize_lib.resize(ex, size=16, fill=MEAN, method='opencv')
  finally:
    resize_lib._cv2.cache_clear()
