"""grain pipelines: batch contract, determinism, resume, sharding, bad input, audit CLI."""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from smallssd_jax import config_blocks
from smallssd_jax.datasets import __main__ as audit_tool
from smallssd_jax.tools import bench_data as bench
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import records

SIZE = 64


def _config(seed=0, batch_size=4, **data):
  cfg = config_blocks.base_config(config_blocks.dfssd_model(300, num_classes=7))
  cfg.model.input_size = SIZE   # the pipeline only needs the input size
  cfg.seed = seed
  cfg.batch_size = batch_size
  cfg.eval.batch_size = batch_size
  cfg.data.builtin.image_size = SIZE
  cfg.data.builtin.min_size = 4.0
  cfg.data.builtin.max_size = 20.0
  cfg.data.builtin.num_train = 40
  cfg.data.builtin.num_test = 10
  cfg.data.read_threads = 0
  cfg.data.update(data)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize('on_device', [True, False])
def test_train_batch_contract(on_device):
  batch = next(pipeline.make_train_iterator(_config(pixels_on_device=on_device)))
  m = config_blocks.data().max_boxes
  expect = {'image': ((4, SIZE, SIZE, 3), np.uint8 if on_device else np.float32),
            'boxes': ((4, m, 4), np.float32),
            'labels': ((4, m), np.int32), 'mask': ((4, m), np.bool_),
            'ignore': ((4, m), np.bool_), 'image_id': ((4,), np.int32),
            'orig_size': ((4, 2), np.int32), 'box_repairs': ((4, 3), np.int32)}
  if on_device:  # one photometric stage per image, and where the image pixels are
    expect.update(photometric=((4, 1, 5), np.float32), image_region=((4, 4), np.int32))
  assert set(batch) == set(expect)
  for key, (shape, dtype) in expect.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  mask = batch['mask']
  assert mask.any() and not mask.all()
  assert np.all(batch['labels'][~mask] == 0) and np.all(batch['labels'][mask] >= 1)
  assert np.all(batch['boxes'][~mask] == 0) and not batch['ignore'][~mask].any()
  b = batch['boxes'][mask]
  assert np.all((b >= 0) & (b <= 1)) and np.all(b[:, 2:] > b[:, :2])
  np.testing.assert_array_equal(batch['orig_size'], [[SIZE, SIZE]] * 4)
  if on_device:
    r0, r1, c0, c1 = batch['image_region'].T
    assert np.all((0 <= r0) & (r0 <= r1) & (r1 <= SIZE) & (0 <= c0) & (c0 <= c1) & (c1 <= SIZE))
  else:
    assert abs(float(batch['image'].mean())) < 60  # mean-subtracted


def test_same_seed_same_batches_different_seed_different():
  a = _take(pipeline.make_train_iterator(_config(seed=3)), 3)
  b = _take(pipeline.make_train_iterator(_config(seed=3)), 3)
  c = _take(pipeline.make_train_iterator(_config(seed=4)), 3)
  assert _same(a, b)
  assert not np.array_equal(a[0]['image_id'], c[0]['image_id']) or not np.array_equal(
      a[0]['image'], c[0]['image'])
  # Read threads change the speed, not the data.
  d = _take(pipeline.make_train_iterator(_config(seed=3, read_threads=2)), 3)
  assert _same(a, d)


def test_epochs_reshuffle_and_cover_the_split():
  cfg = _config(batch_size=8)   # 40 examples = 5 batches per epoch
  ids = np.concatenate([b['image_id'] for b in _take(pipeline.make_train_iterator(cfg), 10)])
  first, second = ids[:40], ids[40:]
  assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
  assert not np.array_equal(first, second)


def _concat(parts):
  """Local batches of several processes, in process order: one global batch."""
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_batches_are_a_function_of_the_step():
  """A resumed run rebuilds its iterator at the step: the batches it would have seen."""
  cfg = _config(seed=5, read_threads=2)  # prefetching threads run ahead of the consumer
  straight = _take(pipeline.make_train_iterator(cfg), 4)
  assert _same(straight[2:], _take(pipeline.make_train_iterator(cfg, start_step=2), 2))
  assert not _same(straight[:1], straight[1:2])


def test_worker_processes_give_the_same_batches():
  cfg = _config(seed=6, num_workers=2)
  reference = _take(pipeline.make_train_iterator(_config(seed=6)), 3)
  for start in (0, 1):
    it = pipeline.make_train_iterator(cfg, start_step=start)
    try:
      assert _same(reference[start:], _take(it, 3 - start)), start
    finally:
      it.close()


@pytest.mark.parametrize('processes', [2, 4])
def test_processes_split_each_global_batch(processes):
  """Process p holds the p-th slice of the global batch one process would train on."""
  cfg = _config(batch_size=8)
  whole = _take(pipeline.make_train_iterator(cfg), 3)
  parts = [_take(pipeline.make_train_iterator(cfg, p, processes), 3) for p in range(processes)]
  assert all(b['image'].shape[0] == 8 // processes for part in parts for b in part)
  assert _same(whole, [_concat([part[i] for part in parts]) for i in range(3)])
  ids = [set(np.concatenate([b['image_id'] for b in part]).tolist()) for part in parts]
  assert not set.intersection(*ids)
  with pytest.raises(ValueError, match='divisible'):
    pipeline.make_train_iterator(_config(batch_size=5), 0, 2)
  with pytest.raises(ValueError, match='process_index=2'):
    pipeline.make_train_iterator(cfg, 2, 2)


def test_eval_batches_pad_the_last_batch():
  cfg = _config()
  batches = list(pipeline.make_eval_batches(cfg))
  assert len(batches) == 3
  masks = np.concatenate([b['example_mask'] for b in batches])
  ids = np.concatenate([b['image_id'] for b in batches])
  np.testing.assert_array_equal(masks, [True] * 10 + [False] * 2)
  np.testing.assert_array_equal(ids[:10], np.arange(10))
  assert np.all(ids[10:] == -1)
  assert set(batches[0]) == set(pipeline.BATCH_KEYS) | {'example_mask'}
  assert batches[-1]['example_mask'].dtype == np.bool_
  assert not batches[-1]['mask'][2:].any()
  # Deterministic, re-iterable.
  assert _same(batches, list(pipeline.make_eval_batches(cfg)))
  # Every process gets the same number of batches.
  per_process = [list(pipeline.make_eval_batches(cfg, 'test', p, 2)) for p in range(2)]
  assert [len(b) for b in per_process] == [3, 3]   # 5 examples each at batch 2
  got = sorted(np.concatenate([b['image_id'][b['example_mask']] for bs in per_process
                               for b in bs]).tolist())
  assert got == list(range(10))
  cfg.eval.num_examples = 6
  assert sum(b['example_mask'].sum() for b in pipeline.make_eval_batches(cfg)) == 6


def test_num_classes_must_match_the_dataset():
  cfg = _config()
  cfg.model.num_classes = 21
  with pytest.raises(ValueError, match='num_classes'):
    pipeline.make_train_iterator(cfg)


def _voc_with_a_bad_image(tmp_path, how):
  root = bench.write_voc(str(tmp_path), 6)
  path = os.path.join(root, 'VOC2007', 'JPEGImages', '000003.jpg')
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2] if how == 'truncated' else b'garbage')
  return root


def _voc_config(root, **data):
  cfg = config_blocks.base_config(config_blocks.ssd_model(300, num_classes=21))
  cfg.model.input_size = SIZE
  cfg.batch_size = 2
  cfg.eval.batch_size = 2
  cfg.data.update(dict(name='voc', root=root, train_split='VOC2007/trainval',
                       eval_split='VOC2007/trainval', read_threads=0))
  cfg.data.update(data)
  return cfg


def test_bad_image_errors_or_is_skipped(tmp_path):
  root = _voc_with_a_bad_image(tmp_path, 'truncated')
  it = pipeline.make_train_iterator(_voc_config(root, on_bad_example='error'))
  with pytest.raises(records.BadExampleError, match='000003.jpg: image data is corrupt'):
    _take(it, 3)
  before = sum(pipeline.skipped.values())
  cfg = _voc_config(root, on_bad_example='skip')
  batches = _take(pipeline.make_train_iterator(cfg), 5)
  ids = np.concatenate([b['image_id'] for b in batches])
  # The bad example's slots are filled (by the same position one epoch later).
  assert len(ids) == 10 and 3 not in ids and set(ids.tolist()) == {0, 1, 2, 4, 5}
  assert sum(pipeline.skipped.values()) > before
  # ... in the same way whatever the number of processes.
  parts = [_take(pipeline.make_train_iterator(cfg, p, 2), 5) for p in range(2)]
  assert _same(batches, [_concat([part[i] for part in parts]) for i in range(5)])
  batches = list(pipeline.make_eval_batches(_voc_config(root, on_bad_example='skip')))
  masks = np.concatenate([b['example_mask'] for b in batches])
  np.testing.assert_array_equal(masks, [True, True, True, False, True, True])


def test_a_split_of_bad_images_is_an_error_when_skipping(tmp_path):
  root = bench.write_voc(str(tmp_path), 2)
  folder = os.path.join(root, 'VOC2007', 'JPEGImages')
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(b'garbage')
  it = pipeline.make_train_iterator(_voc_config(root, on_bad_example='skip'))
  with pytest.raises(ValueError, match=f'{pipeline.MAX_REPLACEMENTS} examples in a row were bad'):
    next(it)


def test_audit_counts_and_check_flag(tmp_path):
  root = _voc_with_a_bad_image(tmp_path, 'truncated')
  cfg = _voc_config(root)
  result = audit_tool.audit(cfg, 'VOC2007/trainval', check=False, out=open(os.devnull, 'w'))
  assert result['images'] == 6 and not result['bad']   # headers are fine
  result = audit_tool.audit(cfg, 'VOC2007/trainval', check=True, out=open(os.devnull, 'w'))
  assert result['images'] == 5 and len(result['bad']) == 1 and '000003.jpg' in result['bad'][0]
  assert sum(result['per_class'].values()) > 0


def test_audit_command_line(tmp_path):
  root = _voc_with_a_bad_image(tmp_path / 'data', 'truncated')
  config_file = tmp_path / 'voc_config.py'
  config_file.write_text(
      'from smallssd_jax import config_blocks\n\n\n'
      'def get_config():\n'
      '  cfg = config_blocks.base_config(config_blocks.ssd_model(300, num_classes=21))\n'
      "  cfg.data.name = 'voc'\n"
      "  cfg.data.train_split = 'VOC2007/trainval'\n"
      '  return cfg\n')
  cmd = [sys.executable, '-m', 'smallssd_jax.datasets', f'--config={config_file}',
         f'--config.data.root={root}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  # In tmp_path: `--check` draws its coverage figure into the working directory.
  run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
  ok = run(cmd)
  assert ok.returncode == 0, ok.stderr
  assert 'images read: 6 of 6' in ok.stdout and 'objects per class' in ok.stdout
  assert 'small' in ok.stdout and 'ignored' in ok.stdout
  check = run(cmd + ['--check'])
  assert check.returncode == 1
  assert 'bad examples (1)' in check.stdout and '000003.jpg' in check.stdout


def test_data_bench_reports_every_path(tmp_path, capsys):
  root = bench.write_voc(str(tmp_path), 6)
  bench.run(root, workers=[0], batches=1, batch_size=4, read_threads=0)
  lines = capsys.readouterr().out.splitlines()
  rates = {line.split(':')[0].strip(): float(line.rsplit(':', 1)[1].split()[0])
           for line in lines}
  assert all(rate > 0 for rate in rates.values()), lines
  assert any('resample on the step' in k for k in rates), lines
  assert any('resample on host, nearest' in k for k in rates), lines
  assert any("the step's resample" in k and '512x512 canvas' in k for k in rates), lines
  assert any('grain train iterator' in k for k in rates), lines
