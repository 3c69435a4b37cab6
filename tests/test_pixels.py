"""Photometric distortion and normalisation in the jitted step (pixels.py) against the host path."""

import colorsys

import jax
import numpy as np
import pytest

from smallssd_jax import pixels
from smallssd_jax import config_blocks
from smallssd_jax import batch_layout
from smallssd_jax.datasets import ops as ops_lib
from smallssd_jax.datasets import photometric
from smallssd_jax.datasets import resize as resize_lib
from smallssd_jax.datasets import pipeline

SIZE = 48


def _device(images, stages, region=None):
  b, h, w, _ = images.shape
  if region is None:
    region = np.tile(np.array([0, h, 0, w], np.int32), (b, 1))
  fn = jax.jit(pixels.photometric)
  return np.asarray(fn(images.astype(np.float32), np.asarray(stages, np.float32), region))


def _host(image, ops):
  return photometric.apply_pixel_ops(image, ops).astype(np.float32)


def test_brightness_and_contrast_match_the_host_exactly():
  # Values exact in float32 and float64, so ties (x * gain = k + 0.5) round
  # the same way in both; other draws can differ by one level at a tie.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 9, 11, 3), dtype=np.uint8)
  cases = [[('brightness', 20.25)], [('brightness', -31.5)], [('contrast', 1.375)],
           [('brightness', -10.0), ('contrast', 0.75)], [('contrast', 0.5)], []]
  stages = [[photometric.stage_vector(ops)] for ops in cases]
  out = _device(images, stages)
  for image, ops, got in zip(images, cases, out):
    np.testing.assert_array_equal(got, _host(image, ops), err_msg=str(ops))


def test_hsv_matches_a_colorsys_reference():
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (40, 40, 3)).astype(np.float64)
  image[:4] = image[:4, :, :1]  # greys, black included
  image[0, 0] = 0
  for sat, hue in [(1.4, 0.0), (0.6, 0.0), (1.0, 17.0), (1.3, -11.5), (0.5, 90.0)]:
    got = np.asarray(pixels.adjust_hsv(image.astype(np.float32), sat, hue))
    exact = np.empty_like(image)
    for i, j in np.ndindex(image.shape[:2]):
      h, s, v = colorsys.rgb_to_hsv(*(image[i, j] / 255.0))
      # OpenCV 8-bit hue units are 2 degrees: hue / 180 of a turn.
      exact[i, j] = np.asarray(colorsys.hsv_to_rgb((h + hue / 180.0) % 1.0, min(s * sat, 1.0),
                                                   v)) * 255.0
    want = np.clip(np.floor(exact + 0.5), 0, 255)
    diff = np.abs(got - want)
    # Equal but where the exact value is a tie (k + 1/2, common with rational
    # hue shifts), which float32 and float64 may round either way.
    tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
    assert diff.max() <= 1.0 and not np.any((diff > 0) & ~tie), (sat, hue)


def test_random_caffe_draws_match_the_host_path():
  # The host looks hue up in a table (within half a level of exact, so a few
  # per cent of the rounded values move by one level); a later contrast gain
  # of up to 1.5 can make that two.
  rng = np.random.default_rng(1)
  n = 64
  images = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
  images[:4] = images[:4, :, :, :1]  # greys (chroma 0) too
  draws = [photometric.sample_photometric(rng, prob=0.8) for _ in range(n)]
  out = _device(images, [[photometric.stage_vector(ops)] for ops in draws])
  worst, differing = 0.0, 0
  for image, ops, got in zip(images, draws, out):
    diff = np.abs(got - _host(image, ops))
    worst = max(worst, float(diff.max()))
    differing += int((diff > 0).sum())
  assert worst <= 2.0
  assert differing < 0.05 * images.size
  # Each op really acts: the distorted batch is not the input.
  assert np.mean(np.abs(out - images)) > 5.0


def test_two_stages_apply_in_order():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
  first = [('brightness', 12.0), ('saturation', 1.3), ('contrast', 0.8)]
  second = [('contrast', 1.2), ('hue', -7.0)]
  out = _device(images, [[photometric.stage_vector(first), photometric.stage_vector(second)]])
  want = _host(images[0], first + second)
  assert np.abs(out[0] - want).max() <= 1.0


def test_stage_vector_slots():
  np.testing.assert_array_equal(photometric.stage_vector([]), batch_layout.IDENTITY_STAGE)
  np.testing.assert_allclose(
      photometric.stage_vector([('brightness', 3.0), ('contrast', 0.6), ('hue', 4.0)]),
      [3.0, 0.6, 1.0, 4.0, 1.0])
  np.testing.assert_allclose(
      photometric.stage_vector([('saturation', 1.2), ('contrast', 1.4)]), [0.0, 1.0, 1.2, 0.0, 1.4])
  with pytest.raises(ValueError, match='unknown pixel op'):
    photometric.stage_vector([('gamma', 2.0)])


def test_only_the_image_region_is_distorted():
  images = np.full((2, 10, 10, 3), 100, np.uint8)
  stage = [photometric.stage_vector([('brightness', 30.0)])]
  region = np.array([[2, 7, 3, 10], [0, 0, 0, 0]], np.int32)
  out = _device(images, [stage, stage], region)
  want = np.full((2, 10, 10, 3), 100.0)
  want[0, 2:7, 3:10] = 130.0
  np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize('bgr,std', [(False, (1.0, 1.0, 1.0)), (True, (58.0, 57.0, 57.5))])
def test_normalize_matches_the_host(bgr, std):
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
  mean = (104.0, 117.0, 123.0)
  spec = lambda layout: batch_layout.InputSpec(layout, layout, 7, mean, std, bgr, (0.0,) * 3,
                                               (0, 0))
  got = np.asarray(pixels.model_input({'image': image[None]},
                                      spec(batch_layout.Layout.PIXELS), False))[0]
  want = resize_lib.normalize({'image': image}, mean=mean, std=std, bgr=bgr)['image']
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
  # Float batches of the host layout are the model input already.
  floats = want[None]
  assert pixels.model_input({'image': floats}, spec(batch_layout.Layout.HOST), False) is floats


def _config(on_device):
  cfg = config_blocks.base_config(config_blocks.ssd_model(300, num_classes=7))
  cfg.model.input_size = SIZE
  cfg.batch_size = 8
  cfg.data.builtin.image_size = 64
  cfg.data.builtin.num_train = 16
  cfg.data.builtin.num_test = 8
  cfg.data.read_threads = 0
  cfg.data.pixels_on_device = on_device
  cfg.data.bgr = True
  cfg.data.mean = [104.0, 117.0, 123.0]
  return cfg


def test_train_batches_on_device_equal_the_host_path():
  """Same seed, same draws: the step's input from uint8 batches is the host path's float input."""
  device_batch = next(pipeline.make_train_iterator(_config(True)))
  host_batch = next(pipeline.make_train_iterator(_config(False)))
  for key in ('boxes', 'labels', 'mask', 'ignore', 'image_id'):
    np.testing.assert_array_equal(device_batch[key], host_batch[key], err_msg=key)
  assert device_batch['image'].dtype == np.uint8
  spec = batch_layout.InputSpec.from_config(_config(True).data, SIZE)
  got = np.asarray(jax.jit(pixels.model_input, static_argnums=(1, 2))(device_batch, spec, True))
  diff = np.abs(got - host_batch['image'])
  assert diff.max() <= 2.0  # the host's hue table (test_random_caffe_draws_match_the_host_path)
  assert np.mean(diff > 0) < 0.05
  # Some images were distorted, and some zoomed out (region smaller than the frame).
  assert np.any(device_batch['photometric'] != np.asarray(batch_layout.IDENTITY_STAGE))
  r0, r1, c0, c1 = device_batch['image_region'].T
  assert np.any((r1 - r0) * (c1 - c0) < SIZE * SIZE)


def test_eval_batches_on_device_equal_the_host_path():
  device_batch = next(iter(pipeline.make_eval_batches(_config(True))))
  host_batch = next(iter(pipeline.make_eval_batches(_config(False))))
  assert device_batch['image'].dtype == np.uint8 and 'photometric' not in device_batch
  spec = batch_layout.InputSpec.from_config(_config(True).data, SIZE)
  real = host_batch['example_mask']
  assert real.sum() == 8 and np.array_equal(device_batch['example_mask'], real)
  np.testing.assert_allclose(np.asarray(pixels.model_input(device_batch, spec, False))[real],
                             host_batch['image'][real], atol=1e-5)


def test_normalize_listed_with_pixels_on_device_is_an_error():
  cfg = _config(True)
  cfg.data.augment = ['flip', 'normalize']
  with pytest.raises(ValueError, match='pixels_on_device'):
    ops_lib.train_ops(cfg.data, batch_layout.InputSpec.from_config(cfg.data, SIZE))
  cfg.data.pixels_on_device = False
  assert len(ops_lib.train_ops(cfg.data, batch_layout.InputSpec.from_config(cfg.data, SIZE))) == 3
