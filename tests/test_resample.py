"""The train resample in the step (data.resample_on_device, pixels.resample) against PIL and the host path."""

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from smallssd_jax import pixels
from smallssd_jax import config_blocks
from smallssd_jax import train
from smallssd_jax.config_blocks import load_config
from smallssd_jax import batch_layout
from smallssd_jax.datasets import resize as resize_lib
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import records
from smallssd_jax import task as task_lib

FILL = (123.0, 117.0, 104.0)


def _pil_coefficients(lo, hi, length, size, canvas, mirrored):
  """PIL's precompute_coeffs (bilinear filter) as a loop, for output pixels of the window."""
  step = (hi - lo) / size
  scale = length * step
  support = max(scale, 1.0)
  k = np.zeros((size, canvas))
  for out in range(size):
    i = size - 1 - out if mirrored else out
    centre = length * (lo + (i + 0.5) * step)
    xmin = max(int(np.floor(centre - support + 0.5)), 0)
    xmax = min(int(np.floor(centre + support + 0.5)), int(length))
    for x in range(xmin, xmax):
      k[out, x] = max(0.0, 1.0 - abs((x - centre + 0.5) / support))
    total = k[out].sum()
    if total > 0:
      k[out] /= total
  return k


@pytest.mark.parametrize('lo,hi,length,mirrored', [
    (0.0, 1.0, 110, False),    # shrink 110 -> 40
    (0.0, 1.0, 110, True),
    (0.1, 0.3, 75, False),     # enlarge
    (-0.5, 1.5, 90, False),    # zoom-out: the ends of the output are off the image
    (0.25, 0.9, 400, True),    # shrink by more than 6
    (0.0, 1.0, 40, False),     # the same size: identity
])
def test_weights_are_pils_coefficients(lo, hi, length, mirrored):
  got = np.asarray(pixels.resample_weights(np.array([lo]), np.array([hi]), np.array([mirrored]),
                                           np.array([length]), 416, 40))[0]
  want = _pil_coefficients(lo, hi, length, 40, 416, mirrored)
  np.testing.assert_allclose(got, want, atol=2e-5)
  if (lo, hi, length) == (0.0, 1.0, 40):
    np.testing.assert_allclose(got[:, :40], np.eye(40), atol=1e-6)


def _photo(h, w, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([yy * 200 / h, xx * 255 / w, (xx + yy) * 120 / (h + w)], -1)
  return np.clip(image + rng.normal(0, 30, image.shape), 0, 255).astype(np.uint8)


def _example(image, window):
  h, w = image.shape[:2]
  ex = records.make_example(image=image, boxes=np.zeros((0, 4), np.float32), labels=[],
                            ignore=[], image_id=0, orig_size=(h, w), key='test')
  ex['window'] = np.asarray(window, np.float64)
  return ex


def _device_resize(image, window, size, canvas):
  ex = resize_lib.resize(_example(image, window), size=size, fill=FILL, source_canvas=canvas)
  out = jax.jit(pixels.resample, static_argnums=(4, 5))(
      ex['image'][None], ex['source_size'][None], ex['window'][None],
      ex['image_region'][None], size, FILL)
  return ex, np.asarray(out[0])


WINDOWS = [
    [0.0, 0.0, 1.0, 1.0],          # shrink to the frame
    [0.0, 1.0, 1.0, 0.0],          # mirrored
    [1.0, 0.0, 0.0, 1.0],          # upside down
    [0.2, 0.7, 0.6, 0.1],          # a mirrored crop, enlarged
    [-0.5, -1.0, 1.5, 2.0],        # zoom-out: the image in the middle of the fill
    [-0.3, 0.4, 0.8, 1.6],         # a crop across the image's edge
    [-3.0, -3.0, 4.0, 4.0],        # a tiny image in a large frame
]


@pytest.mark.parametrize('window', WINDOWS)
def test_device_resample_is_the_host_resize(window):
  image = _photo(75, 110)
  size = 60
  host = resize_lib.resize(_example(image, window), size=size, fill=FILL)
  ex, got = _device_resize(image, window, size, (80, 128))
  assert ex['image'].shape == (80, 128, 3) and ex['image'].dtype == np.uint8
  np.testing.assert_array_equal(ex['source_size'], (75, 110))
  np.testing.assert_array_equal(ex['image'][:75, :110], image)
  assert not ex['image'][75:].any() and not ex['image'][:, 110:].any()
  np.testing.assert_array_equal(ex['image_region'], host['image_region'])
  r0, r1, c0, c1 = host['image_region']
  outside = np.ones((size, size), bool)
  outside[r0:r1, c0:c1] = False
  np.testing.assert_array_equal(got[outside], np.broadcast_to(FILL, got[outside].shape))
  # PIL rounds 22-bit fixed-point sums after each pass, the step float32 ones:
  # one level apart where the exact value is a tie, which rational scales make
  # common (at a 2x enlargement a quarter of the values are ties), rarely two
  # where both passes' ties meet.
  diff = np.abs(got - host['image'].astype(np.float32))
  assert diff.max() <= 2.0
  assert np.mean(diff > 0) < 0.15
  assert np.mean(diff > 1) < 1e-3
  # And far from a plain nearest-neighbour picture: the resample is the PIL one.
  nearest = resize_lib.resize(_example(image, window), size=size, fill=FILL, method='nearest')
  on_image = ~outside
  assert np.abs(got - nearest['image'])[on_image].mean() > 2 * diff[on_image].mean() + 1.0


def test_a_source_larger_than_the_canvas_is_shrunk_to_fit(caplog):
  image = _photo(100, 160, seed=1)
  window = [0.1, 0.0, 0.9, 0.8]
  with caplog.at_level('WARNING'):
    ex, got = _device_resize(image, window, 48, (64, 64))
  assert 'larger than data.source_canvas' in caplog.text  # said, not silent
  np.testing.assert_array_equal(ex['source_size'], (40, 64))
  # The same as the host path on the source shrunk by PIL to fit...
  shrunk = np.asarray(Image.fromarray(image).resize((64, 40), Image.BILINEAR))
  host = resize_lib.resize(_example(shrunk, window), size=48, fill=FILL)['image']
  diff = np.abs(got - host)
  assert diff.max() <= 2.0 and np.mean(diff > 0) < 0.15
  # ...which is near the full-resolution result (one more antialiasing pass).
  direct = resize_lib.resize(_example(image, window), size=48, fill=FILL)['image']
  assert np.abs(got - direct).mean() < 8.0


def _config(resample_on_device, **builtin):
  cfg = config_blocks.base_config(config_blocks.ssd_model(300, num_classes=7))
  cfg.model.input_size = 48
  cfg.batch_size = 8
  cfg.data.builtin.image_size = 64
  cfg.data.builtin.num_train = 16
  cfg.data.read_threads = 0
  cfg.data.resample_on_device = str(resample_on_device)
  cfg.data.builtin.update(builtin)
  return cfg


def test_train_batches_resampled_in_the_step_equal_the_host_path():
  cfg = _config(True)
  device_batch = next(pipeline.make_train_iterator(cfg))
  host_batch = next(pipeline.make_train_iterator(_config(False)))
  for key in ('boxes', 'labels', 'mask', 'ignore', 'image_id', 'photometric', 'image_region'):
    np.testing.assert_array_equal(device_batch[key], host_batch[key], err_msg=key)
  # The builtin dataset's canvas is its image size: the sources travel whole.
  assert device_batch['image'].shape == (8, 64, 64, 3)
  np.testing.assert_array_equal(device_batch['source_size'], np.full((8, 2), 64))
  assert 'window' not in host_batch
  device_spec = batch_layout.InputSpec.from_config(cfg.data, 48)
  host_spec = batch_layout.InputSpec.from_config(_config(False).data, 48)
  model_input = jax.jit(pixels.model_input, static_argnums=(1, 2))
  got = np.asarray(model_input(device_batch, device_spec, True))
  want = np.asarray(model_input(host_batch, host_spec, True))
  diff = np.abs(got - want)
  # A one-level resample difference grows by the photometric gains (up to 1.5 twice).
  assert diff.max() <= 3.0
  assert np.mean(diff > 0) < 0.15
  # Some images were zoomed out and some mirrored, so the window really moved.
  windows = device_batch['window']
  assert np.any(windows[:, 1] > windows[:, 3]) and np.any(windows[:, 0] < 0)


@pytest.mark.slow
def test_the_train_step_takes_source_batches():
  """The loss of the same draws resampled in the step and on the host (fed as an
  identity window, so both batches share one compiled function): equal."""
  cfg = load_config(str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py') +
                    ':runlocal')
  cfg.batch_size = 2
  batches = {}
  for on_device in (True, False):
    cfg.data.resample_on_device = str(on_device)
    batches[on_device] = next(pipeline.make_train_iterator(cfg))
  source, host = batches[True], dict(batches[False])
  size = cfg.model.input_size
  assert 'window' not in host and source['image'].shape == host['image'].shape
  host['window'] = np.tile(np.array([0, 0, 1, 1], np.float32), (2, 1))
  host['source_size'] = np.full((2, 2), size, np.int32)
  cfg.data.resample_on_device = 'True'      # both batches in the source layout
  detector = task_lib.build_task(cfg)
  variables = detector.module.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32),
                                   train=False)
  loss_fn = jax.jit(lambda b: train.loss_fn(detector, cfg.loss, variables['params'],
                                            variables.get('batch_stats', {}), b, False)[0])
  losses = [float(loss_fn(source)), float(loss_fn(host))]
  assert np.isfinite(losses).all()
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-2)
  assert np.any(source['window'] != host['window'])  # the step really resampled


def resamples(data_cfg) -> bool:
  """Whether train batches carry the sources for the step to resample."""
  layout = batch_layout.InputSpec.from_config(data_cfg, 48).train_layout
  return layout == batch_layout.Layout.RESAMPLE


def test_config_choices():
  cfg = _config('auto')
  assert resamples(cfg.data) is (jax.default_backend() != 'cpu')
  cfg.data.resample_on_device = 'True'
  assert resamples(cfg.data)
  assert batch_layout.source_canvas(cfg.data) == (64, 64)
  for name, canvas in [('voc', (512, 512)), ('kitti', (384, 1248)), ('coco', (640, 640)),
                       ('tfds:voc/2007', (512, 512))]:
    cfg.data.name = name
    assert batch_layout.source_canvas(cfg.data) == canvas, name
  cfg.data.source_canvas = [600, 1000]
  assert batch_layout.source_canvas(cfg.data) == (600, 1000)
  for bad in ([600], [0, 512]):
    cfg.data.source_canvas = bad
    with pytest.raises(ValueError, match='source_canvas'):
      batch_layout.source_canvas(cfg.data)
  cfg.data.source_canvas = [0, 0]
  cfg.data.resize_method = 'nearest'
  with pytest.raises(ValueError, match="resize_method is 'nearest'"):
    resamples(cfg.data)
  cfg.data.resample_on_device = 'auto'
  assert not resamples(cfg.data)  # 'auto' falls back to the host
  cfg.data.resize_method = 'bilinear'
  cfg.data.pixels_on_device = False
  cfg.data.resample_on_device = 'True'
  with pytest.raises(ValueError, match='needs data.pixels_on_device'):
    resamples(cfg.data)
  # The field holds 'auto', so the command line sets it as a string.
  cfg.data.pixels_on_device = True
  cfg.data.resample_on_device = 'False'
  assert resamples(cfg.data) is False
  cfg.data.resample_on_device = 'true'
  assert resamples(cfg.data) is True
  cfg.data.resample_on_device = 'maybe'
  with pytest.raises(ValueError, match="data.resample_on_device must be True, False or 'auto'"):
    resamples(cfg.data)
