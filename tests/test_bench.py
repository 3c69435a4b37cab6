"""`python -m smallssd_jax.tools.bench` and `tools.bench_layers` run end to end on the tiny config (no timing is checked)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# End-to-end runs: left out of the fast subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
  out = tmp_path / 'bench.json'
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}
  # Faster compiles: this checks that the tool works, not how fast anything is.
  env.update(JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true')
  result = subprocess.run(
      [sys.executable, '-m', 'smallssd_jax.tools.bench', '--config=configs/default.py:runlocal',
       '--batch', '2', '--steps', '2', '--warmup', '0', '--compare-torchvision', f'--json={out}',
       # The accelerator path (sources resampled in the step) on this CPU.
       '--config.data.resample_on_device=True'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

  results = json.loads(out.read_text())
  assert results['batch'] == 2 and results['steps'] == 2
  assert results['model']['name'] == 'ssd' and results['num_params'] > 0
  measured = ('gflops_per_image', 'train_gflops_per_image', 'compile_seconds_inference',
              'compile_seconds_train', 'inference_images_per_sec', 'train_images_per_sec',
              'peak_memory_bytes', 'data_images_per_sec')
  for key in measured:
    entry = results[key]
    assert entry['value'] > 0 and entry['device'], key
  assert 'cpu' in results['inference_images_per_sec']['device']
  assert results['peak_memory_bytes']['source'].startswith('process max RSS')
  # The backward pass costs more than the forward.
  assert results['train_gflops_per_image']['value'] > results['gflops_per_image']['value']

  for label in ('GFLOPs per image (forward)', 'compile: train step (s)', 'inference (images/s)',
                'training (images/s)', 'peak memory (MiB)', 'data pipeline (images/s)'):
    assert label in result.stdout
  tv = results['torchvision']
  if importlib.util.find_spec('torch') is None or importlib.util.find_spec('torchvision') is None:
    assert tv == {'available': False, 'reason': tv['reason']} and 'not installed' in tv['reason']
    assert 'not installed' in result.stdout
  else:
    assert tv['available'] and set(results['ratios']) == {'inference_images_per_sec',
                                                           'train_images_per_sec'}
    for key, paired in results['paired'].items():
      assert len(paired['per_round_ratios']) == 2 and results['ratios'][key] > 0


def test_paired_seconds_alternates_the_calls():
  from smallssd_jax.tools import timing  # pylint: disable=g-import-not-at-top
  calls = []
  fns = {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}
  times = timing.paired_seconds(fns, 3)
  assert calls == ['a', 'a', 'b', 'b'] * 3   # an untimed call before each timed one
  assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}
  assert all(t >= 0 for v in times.values() for t in v)
  calls.clear()
  timing.paired_seconds(fns, 2, untimed=0)
  assert calls == ['a', 'b'] * 2


def test_synthetic_batch_has_the_pipeline_shapes():
  from smallssd_jax.tools import bench  # pylint: disable=g-import-not-at-top
  from smallssd_jax.config_blocks import load_config  # pylint: disable=g-import-not-at-top
  from smallssd_jax.datasets import pipeline  # pylint: disable=g-import-not-at-top
  cfg = load_config(str(REPO / 'configs' / 'default.py') + ':runlocal')
  cases = ((True, ['photometric'], 'False'), (True, [], 'False'), (False, ['photometric'], 'False'),
           (True, ['photometric'], 'True'), (True, [], 'True'))
  for on_device, augment, resample in cases:
    cfg.data.augment = augment
    cfg.data.pixels_on_device = on_device
    cfg.data.resample_on_device = resample
    real = next(pipeline.make_train_iterator(cfg))
    fake = bench.synthetic_batch(cfg)
    assert {k: (v.shape, v.dtype) for k, v in fake.items()} == {
        k: (v.shape, v.dtype) for k, v in real.items()}, (on_device, augment, resample)
  boxes = fake['boxes'][fake['mask']]
  assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 1).all()
  labels = fake['labels'][fake['mask']]
  assert labels.min() >= 1 and labels.max() < cfg.model.num_classes


def test_report_shows_skipped_data_and_torchvision_ratios():
  from smallssd_jax.tools import bench  # pylint: disable=g-import-not-at-top
  entry = {'value': 2.0, 'device': '1x cpu:cpu'}
  results = {
      'config': 'configs/ssd300_voc0712.py', 'batch': 8, 'steps': 10, 'warmup': 2,
      'num_params': 26_285_486, 'data': 'synthetic', 'weights': 'random init', 'backend': 'cpu',
      'model': {'name': 'ssd', 'backbone': 'vgg16_ssd', 'neck': 'none', 'head': 'ssd',
                'input_size': 300, 'width': 1.0, 'dtype': 'float32', 'num_classes': 21},
      **{key: dict(entry) for key, _, _ in bench.ROWS},
      'torchvision': {'available': True, 'model': 'torchvision ssd300_vgg16',
                      'inference_images_per_sec': {'value': 4.0, 'device': 'torch cpu'},
                      'train_images_per_sec': {'value': 1.0, 'device': 'torch cpu'}},
      'ratios': {'inference_images_per_sec': 0.5, 'train_images_per_sec': 2.0},
      'paired': {'inference_images_per_sec': {'ours_median_seconds': 4.0,
                                              'torchvision_median_seconds': 2.0},
                 'train_images_per_sec': {'ours_median_seconds': 4.0,
                                          'torchvision_median_seconds': 8.0}},
  }
  results['data_images_per_sec'] = {'value': None, 'device': 'not measured (--synthetic)'}
  report = bench.format_report(results)
  assert 'skipped  not measured (--synthetic)' in report
  assert 'ours / torchvision = 0.50' in report and 'ours / torchvision = 2.00' in report
  assert 'inference  ours 2.00 images/s, torchvision 4.00 images/s' in report
  assert 'training   ours 2.00 images/s, torchvision 1.00 images/s' in report
  assert 'not the same network' not in report      # SSD300 at width 1 against SSD300


def _two_convs(x, w1, w2):
  conv = lambda x, w, s: jax.lax.conv_general_dilated(
      x, w, (s, s), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  inner = jax.jit(lambda y: conv(y, w2, 1))   # inside a call: found too
  y = conv(x, w1, 2)
  return inner(inner(y))


def test_bench_layers_finds_and_counts_convolutions():
  from smallssd_jax.tools import bench_layers  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  w1 = jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32)
  w2 = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)
  convs = bench_layers.find_convolutions(_two_convs, x, w1, w2)
  assert [(c['lhs'], c['rhs'], c['count']) for c in convs] == [
      ((2, 16, 16, 3), (3, 3, 3, 8), 1), ((2, 8, 8, 8), (3, 3, 8, 8), 2)]
  # 2 FLOPs per multiply-add: output elements x (in-features x window).
  assert bench_layers.conv_flops(convs[0]) == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)
  assert bench_layers.conv_flops(convs[1]) == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 8)


def test_bench_layers_torch_convolution_is_the_same_convolution():
  torch = pytest.importorskip('torch')
  from smallssd_jax.tools import bench_layers  # pylint: disable=g-import-not-at-top
  cases = [((2, 12, 12, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), (1, 1)),
           ((2, 13, 13, 4), (3, 3, 4, 6), (2, 2), ((0, 1), (0, 1)), (1, 1)),   # asymmetric
           ((1, 19, 19, 8), (3, 3, 8, 16), (1, 1), ((6, 6), (6, 6)), (6, 6))]   # dilated
  for lhs, rhs, stride, padding, dilation in cases:
    fn = lambda x, w, s=stride, p=padding, d=dilation: jax.lax.conv_general_dilated(
        x, w, s, p, rhs_dilation=d, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    (conv,) = bench_layers.find_convolutions(
        fn, jax.ShapeDtypeStruct(lhs, jnp.float32), jax.ShapeDtypeStruct(rhs, jnp.float32))
    x, w, apply = bench_layers.torch_conv(conv)
    with torch.no_grad():
      want = apply().numpy().transpose(0, 2, 3, 1)
    got = fn(x.detach().numpy().transpose(0, 2, 3, 1), w.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_bench_layers_report():
  from smallssd_jax.tools import bench_layers  # pylint: disable=g-import-not-at-top
  from smallssd_jax.config_blocks import load_config  # pylint: disable=g-import-not-at-top
  cfg = load_config(str(REPO / 'configs' / 'default.py') + ':runlocal')
  model = bench_layers.model_convolutions(cfg, batch=2)
  assert len(model) > 10 and sum(c['count'] for c in model) > len(model)  # repeats grouped
  assert model[0]['lhs'] == (2, 300, 300, 3) and all(c['lhs'][0] == 2 for c in model)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  convs = bench_layers.find_convolutions(
      _two_convs, x, jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32),
      jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32))
  results = bench_layers.time_convolutions(convs, steps=1, compare_torch=False, matmul_size=256)
  rows = results['convolutions']
  assert len(rows) == 2 and results['matmul_gflops_per_s'] > 0 and results['batch'] == 2
  for r in rows:
    assert r['forward']['ms'] > 0 and r['train']['ms'] > 0 and 'ratio' not in r['forward']
  assert results['total_ms']['train'] == pytest.approx(
      rows[0]['train']['ms'] + 2 * rows[1]['train']['ms'])
  report = bench_layers.format_report(results)
  assert report.count('\n') == len(rows) + 2 and 'all convolutions' in report


def test_diagnose_sees_which_sources_feed_each_level():
  """DF-SSD's first level reads every source, conv4_3 most at initialisation under the
  default design (docs/results.md); its second level reads fc7 alone, as SSD's does."""
  from smallssd_jax.tools import diagnose  # pylint: disable=g-import-not-at-top
  from smallssd_jax.config_blocks import load_config  # pylint: disable=g-import-not-at-top
  config = str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py')
  cfg = load_config(f'{config}:model=dfssd,runlocal')
  cfg.batch_size = 2
  report = diagnose.diagnose(cfg)
  level0 = {k: v[0] for k, v in report['sensitivity'].items() if v[0] > 0}
  assert {'conv4_3', 'fc7', 'conv8_2', 'conv11_2'} <= set(level0)
  assert max(level0, key=level0.get) == 'conv4_3'
  level1 = {k: v[1] for k, v in report['sensitivity'].items() if v[1] > 0}
  assert set(level1) == {'fc7'}
  assert 'share of level 0: conv4_3' in diagnose.format_report(report)
