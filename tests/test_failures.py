"""Ordinary mistakes and accidents do not cost a run (README "When things go wrong").

Each test names the item of the checklist it covers: the config checked
before training (1, 2, 6, 7), damaged checkpoints (3), retention and the
workdir lock (4), the records of eval and detect (5), and the smaller losses
(8). End-to-end cases (a failing final evaluation, resuming a finished run,
NaN at the first step, detect on a folder with clashes and a broken image)
are in test_train.py.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import config_blocks
from smallssd_jax import config_check
from smallssd_jax import errors
from smallssd_jax import metrics as metrics_lib
from smallssd_jax import optim as optim_lib
from smallssd_jax import task as task_lib
from smallssd_jax.config_blocks import load_config
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import records

REPO = pathlib.Path(__file__).parents[1]
DEFAULT = str(REPO / 'configs' / 'default.py')


def runlocal(arg: str = 'runlocal'):
  return load_config(f'{DEFAULT}:{arg}')


def problems(config, mode='train') -> str:
  with pytest.raises(errors.ConfigError) as e:
    config_check.validate(config, mode=mode)
  return str(e.value)


# ------------------------------------------- 1, 6, 7: checked before training ---


def test_every_shipped_config_passes_the_checks():
  for path in sorted((REPO / 'configs').glob('*.py')):
    for arg in ('', ':runlocal'):
      config = load_config(f'{path}{arg}')
      assert config_check.field_problems(config) == [], f'{path.name}{arg}'


def test_every_field_of_every_config_is_read_or_validated():
  """Each field has a rule that applies to it (its type, range, or choices)."""
  seen = set()
  for path in sorted((REPO / 'configs').glob('*.py')):
    config = load_config(str(path))
    for field in config_check.leaves(config):
      rule = config_check.RULES.get(field)
      assert rule is not None, f'{path.name}: {field} has no rule'
      seen.add(field)
  # A rule for a field no config has would be dead weight; the DF-SSD and
  # SkipFPN-only fields are in their configs.
  assert set(config_check.RULES) <= seen


@pytest.mark.parametrize('field, value, message', [
    ('eval.metric', 'voc2007', r"eval.metric='voc2007': must be one of \['voc07'"),        # 1
    ('model.name', 'retinanet', r"model.name='retinanet': must be one of"),              # 6
    ('log_every_steps', 0, r'log_every_steps=0: must be >= 1'),                           # 6
    ('checkpoint_every_steps', 0, r'checkpoint_every_steps=0: must be >= 1'),             # 6
    ('batch_size', 0, r'batch_size=0: must be >= 1'),                                     # 6
    ('keep_checkpoints', 0, r'keep_checkpoints=0: must be >= 1'),                         # 4
    ('data.on_bad_example', 'ignore', r"data.on_bad_example='ignore': must be one of"),
    ('optim.boundaries', [0.9, 1.5], r'1.5 is neither a step number nor a fraction'),
])
def test_a_bad_value_is_an_error_naming_field_value_and_what_is_allowed(field, value, message):
  config = runlocal()
  node, key = config, field
  while '.' in key:
    head, key = key.split('.', 1)
    node = node[head]
  node[key] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_check.validate(config)


def test_unknown_and_unused_fields_are_errors():
  config = runlocal()
  with config.unlocked():
    config.eval.metirc = 'voc07'
  assert 'eval.metirc' in problems(config) and 'unknown' in problems(config)
  config = runlocal('model=ssd,runlocal')
  with config.unlocked():
    config.model.dfssd = config_blocks.dfssd_model().model.dfssd   # an SSD does not read it
  assert 'model.dfssd.deconv_kernel' in problems(config)
  assert 'not used by this model' in problems(config)


def test_model_name_and_parts_must_agree():
  config = runlocal('model=ssd,runlocal')
  config.model.name = 'dfssd'
  message = problems(config)
  assert "model.name='dfssd' is built as neck 'dfssd'" in message or 'missing' in message


def test_batch_sizes_must_divide_over_the_devices(monkeypatch):                          # 1
  config = runlocal()
  config.eval.batch_size = 6
  monkeypatch.setattr(config_check.jax, 'device_count', lambda: 4)
  message = problems(config)
  assert 'eval.batch_size=6 is not divisible by the 4 devices' in message
  assert 'batch_size=4' not in message.replace('eval.batch_size', '')


def test_unreadable_splits_and_missing_paths_are_found_before_training(tmp_path):         # 1, 7
  config = load_config(str(REPO / 'configs' / 'ssd300_voc0712.py') + ':runlocal')
  config.data.root = str(tmp_path / 'no_such_devkit')
  config.data.name = 'voc'
  message = problems(config)
  assert "data 'voc' split" in message and 'no_such_devkit' in message
  config = runlocal()
  config.init_from = str(tmp_path / 'missing.pth')
  assert f"init_from '{tmp_path / 'missing.pth'}' does not exist" in problems(config)
  config = runlocal()
  assert '--mode=detect needs --config.detect.input' in problems(config, 'detect')
  config.detect.input = str(tmp_path / 'nothing_here')
  assert 'does not exist' in problems(config, 'detect')


def test_runlocal_keeps_a_data_root_given_on_the_command_line(tmp_path):                  # 2
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from smallssd_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.register_flag_parsers()
  path = str(REPO / 'configs' / 'ssd300_voc0712.py') + ':runlocal'

  def parse(*overrides):
    argv = ['prog', f'--config={path}', *overrides]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
    values(argv)
    return config_blocks.finalize(holder.value)

  assert parse().data.name == 'builtin_small'            # no root: the built-in data
  mine = parse(f'--config.data.root={tmp_path}')
  assert mine.data.name == 'voc' and mine.data.root == str(tmp_path)
  assert mine.model.num_classes == 21
  # And the schedule follows a changed run length (fractions of the run).
  longer = parse('--config.num_train_steps=40')
  assert optim_lib.boundaries(longer.optim, longer.num_train_steps) == [26, 33]


def test_resuming_with_another_batch_size_or_model_is_refused(tmp_path):                  # 6
  config = runlocal()
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text(json.dumps(config.to_dict(), default=str))
  config_check.check_resume(config, str(tmp_path))          # the same: fine
  config.num_train_steps = 12                                 # a longer run: fine
  config_check.check_resume(config, str(tmp_path))
  config.batch_size = 8
  with pytest.raises(errors.ConfigError, match=r'batch_size 8 \(the run was trained with 4'):
    config_check.check_resume(config, str(tmp_path))
  config = runlocal()
  config.model.width = 0.25
  with pytest.raises(errors.ConfigError, match=r'model.\{width\} differ'):
    config_check.check_resume(config, str(tmp_path))


# --------------------------------------------------- 3: damaged checkpoints ---


def _config(keep=5):
  config = runlocal()
  config.keep_checkpoints = keep
  return config


def _state(step, width=3):
  tx = optax.sgd(0.1, momentum=0.9)
  # `big`: random, so that its chunk is stored in a data file of its own
  # (small or constant arrays are inlined in the index, which has its own CRC).
  big = np.random.default_rng(step).normal(size=(64, 64)).astype(np.float32)
  p = {'head': {'w': jnp.full((width,), float(step)), 'big': jnp.asarray(big)}}
  return task_lib.TrainState(step=jnp.int32(step), params=p, batch_stats={'m': jnp.ones(2)},
                             opt_state=tx.init(p), bad_step=jnp.int32(-1), tx=tx)


def _saved(tmp_path, steps=(1, 2, 3)):
  manager = ckpt_lib.make_manager(str(tmp_path), _config())
  for s in steps:
    ckpt_lib.save(manager, s, _state(s))
  manager.wait_until_finished()
  return manager


def _data_files(tmp_path, step):
  base = tmp_path / 'checkpoints' / str(step) / 'state'
  return sorted((p for p in base.rglob('*') if p.is_file() and '/d/' in str(p)
                 and 'ocdbt.process' in str(p)), key=lambda p: -p.stat().st_size)


def _damage(tmp_path, step, how):
  if how == 'metadata':
    (tmp_path / 'checkpoints' / str(step) / 'state' / '_METADATA').unlink()
    return
  data = _data_files(tmp_path, step)[0]       # the largest: it holds the arrays' bytes
  if how == 'missing':
    data.unlink()
  elif how == 'truncated':
    data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])
  elif how == 'corrupted':
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize('how', ['missing', 'truncated', 'metadata', 'corrupted'])
def test_a_damaged_latest_step_falls_back_to_the_newest_intact_one(tmp_path, how, caplog):
  manager = _saved(tmp_path)
  _damage(tmp_path, 3, how)
  restored = ckpt_lib.restore_state(manager, _state(0))
  assert int(restored.step) == 2
  np.testing.assert_array_equal(restored.params['head']['big'], _state(2).params['head']['big'])
  assert any('step 3' in r.getMessage() and 'damaged' in r.getMessage() for r in caplog.records)
  # Evaluation (variables only, read-only) falls back the same way.
  _, step = ckpt_lib.restore_variables(str(tmp_path), _state(0))
  assert step == 2


def test_corrupted_bytes_anywhere_in_the_data_are_never_restored_silently(tmp_path):
  """Most flipped bytes inside a zstd chunk decode fine into wrong values: the checksums
  catch them. A flip may also miss the data (framing that no value depends on): then
  the arrays come back exact. Never wrong values from step 2."""
  manager = _saved(tmp_path, steps=(1, 2))
  data = _data_files(tmp_path, 2)[0]
  clean = data.read_bytes()
  want = _state(2).params['head']['big']
  detected = 0
  for position in np.linspace(64, len(clean) - 64, 8).astype(int):
    raw = bytearray(clean)
    raw[position] ^= 0x10
    data.write_bytes(bytes(raw))
    restored = ckpt_lib.restore_state(manager, _state(0))
    if int(restored.step) == 2:
      np.testing.assert_array_equal(restored.params['head']['big'], want, err_msg=str(position))
    else:
      assert int(restored.step) == 1
      detected += 1
  assert detected >= 6
  data.write_bytes(clean)
  assert int(ckpt_lib.restore_state(manager, _state(0)).step) == 2


def test_checksums_see_a_changed_array():
  tree = {'params': {'w': np.arange(6, dtype=np.float32)}}
  recorded = ckpt_lib.checksums(tree)
  ckpt_lib._verify(tree, recorded)   # pylint: disable=protected-access
  changed = {'params': {'w': np.arange(6, dtype=np.float32) + np.float32(1e-3) * (np.arange(6) == 3)}}
  with pytest.raises(ckpt_lib.DamagedCheckpoint, match=r"\['params'\]\['w'\]"):
    ckpt_lib._verify(changed, recorded)   # pylint: disable=protected-access


def test_no_intact_step_is_a_clear_error(tmp_path):
  manager = _saved(tmp_path, steps=(1, 2))
  _damage(tmp_path, 1, 'corrupted')
  _damage(tmp_path, 2, 'missing')
  with pytest.raises(errors.CheckpointError, match=r'every checkpoint in .* is damaged.*step 2'):
    ckpt_lib.restore_state(manager, _state(0))


def test_a_shape_mismatch_names_the_array_and_both_shapes(tmp_path):                      # 7
  _saved(tmp_path, steps=(1,))
  with pytest.raises(errors.CheckpointError,
                     match=r"params/head/w is \[3\] in the checkpoint, \[4\] in the model"):
    ckpt_lib.restore_variables(str(tmp_path), _state(0, width=4))


def test_a_step_folder_is_a_checkpoint(tmp_path):                                         # 7
  _saved(tmp_path)
  _, step = ckpt_lib.restore_variables(str(tmp_path / 'checkpoints' / '2'), _state(0))
  assert step == 2
  with pytest.raises(errors.CheckpointError, match='does not exist'):
    ckpt_lib.restore_variables(str(tmp_path / 'nothing'), _state(0))


# ------------------------------------------------ 4: retention and the lock ---


def test_keep_checkpoints_below_one_is_refused(tmp_path):
  with pytest.raises(errors.ConfigError, match='keep_checkpoints must be >= 1'):
    ckpt_lib.make_manager(str(tmp_path), _config(keep=0))


def test_one_run_per_workdir(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\n'
       'from smallssd_jax import checkpoints as c\n'
       f'with c.WorkdirLock({str(tmp_path)!r}):\n'
       '  print("locked", flush=True)\n  time.sleep(60)\n'],
      stdout=subprocess.PIPE, text=True, cwd=str(REPO))
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(errors.WorkdirBusy, match=rf'in use by another run \(pid {holder.pid} on'):
      with ckpt_lib.WorkdirLock(str(tmp_path)):
        pass
  finally:
    holder.kill()
    holder.wait()
  # The holder died without unlocking: its lock file is stale and taken over.
  assert (tmp_path / '.lock').exists()
  with ckpt_lib.WorkdirLock(str(tmp_path)):
    assert f'pid {os.getpid()}' in (tmp_path / '.lock').read_text()


# ------------------------------------------------------------ 8: the rest ---


def test_detect_pictures_of_clashing_names_are_distinct():
  from smallssd_jax import detect  # pylint: disable=g-import-not-at-top
  names = detect.output_names(['d/a.jpg', 'd/a.png', 'd/b.jpg', 'e/b.JPG'])
  assert names == ['a_jpg.png', 'a_png.png', 'b_jpg.png', 'b_jpg.png'] or len(set(names)) == 4
  assert len(set(names)) == 4
  assert detect.output_names(['x/img0.png', 'x/img1.jpg']) == ['img0.png', 'img1.png']


class _OneExample(records.Source):
  class_names = ('a', 'b')

  def __init__(self, boxes_px):
    self.boxes_px = boxes_px

  def __len__(self):
    return 1

  def record(self, index):
    problems = []
    boxes, keep = records.boxes_from_pixels(np.asarray(self.boxes_px, np.float64), 40, 50,
                                            problems)
    return records.make_example(
        image=np.zeros((40, 50, 3), np.uint8), boxes=boxes, labels=np.ones(int(keep.sum())),
        ignore=np.zeros(int(keep.sum()), bool), image_id=index, orig_size=(40, 50), key='one',
        problems=problems)


def test_boxes_clipped_or_dropped_are_counted_in_the_batch():
  # x0, y0, x1, y1 pixels of a 50 x 40 image: one clean, one reaching out, one empty.
  source = _OneExample([[5, 5, 20, 20], [40, 30, 70, 50], [10, 10, 10, 30]])
  loader = pipeline.ExampleLoader(source, [], 8, 'error')
  assert list(loader(0, None)['box_repairs']) == [1, 1, 0]


def test_empty_evaluation_input_is_nan_for_every_metric():
  for metric in ('voc07', 'voc', 'coco'):
    results = metrics_lib.evaluate([], [], metric, num_classes=3)
    assert np.isnan(results['mAP']), metric
    assert all(np.isnan(v) for v in results.values()), metric


def test_a_huge_label_is_an_error_not_an_allocation():
  gt = [{'boxes': np.array([[0, 0, 10, 10]], np.float32), 'labels': np.array([10 ** 9])}]
  det = [{'boxes': np.zeros((0, 4), np.float32), 'scores': np.zeros(0), 'labels': np.zeros(0)}]
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r'image 0: label 1000000000 would make'):
    metrics_lib.evaluate(gt, det, 'voc07')
  assert time.perf_counter() - start < 5.0
