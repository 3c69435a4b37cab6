"""End to end: train, checkpoint, resume, evaluate, detect; NaN stop, SIGTERM, init_from, retention.

Every run uses the tiny `configs/default.py:runlocal` detector with one set of
model / loss / optimiser settings, so that the train step, the init and the
prediction function each compile once: XLA's persistent compilation cache (in
a temporary folder, for this module only) serves every later
`train_and_evaluate` call, each of which builds its own jitted functions.
"""

import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import optax
import pytest
from PIL import Image

from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import errors
from smallssd_jax import runner
from smallssd_jax import train
from smallssd_jax import config_blocks
from smallssd_jax.config_blocks import load_config
from smallssd_jax.datasets import pipeline
from smallssd_jax import sharding
from smallssd_jax import task as task_lib
from smallssd_jax import optim as optim_lib

# End-to-end runs: left out of the fast subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

CONFIG = str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py') + ':model=dfssd,runlocal'
STEPS = 4


@pytest.fixture(scope='module', autouse=True)
def compilation_cache_dir(tmp_path_factory):
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  saved = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  compilation_cache.reset_cache()
  yield
  for n, v in saved.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


def tiny_config():
  """runlocal, smaller still; what reaches the compiled functions is the same for every test."""
  cfg = load_config(CONFIG)
  # The model these tests were calibrated on: DF-SSD read literally (kernel-4
  # deconvolution, one projection over the concatenation, equal scales),
  # plain VGG16, Xavier heads.
  cfg.model.backbone_batch_norm = False
  cfg.model.head_init = 'xavier'
  cfg.model.dfssd.update(deconv_kernel=4, deconv_padding=1, source_norm='none', context_init=1.0)
  # The library's default (the papers' Caffe augmentation), so a run goes through every
  # train-time path (and the NaN tests can poison the photometric draw the step applies).
  cfg.data.augment = list(config_blocks.data().augment)
  cfg.num_train_steps = STEPS
  cfg.log_every_steps = 1
  cfg.checkpoint_every_steps = 2
  cfg.eval_every_steps = 0
  # A warm-up across the resume point: a resumed run that restarted the
  # optimizer's count (or dropped its momentum) would take different steps.
  cfg.optim.warmup_steps = 3
  cfg.optim.boundaries = [1000, 2000]
  cfg.data.builtin.num_test = 2
  cfg.eval.num_examples = 2
  cfg.eval.batch_size = 1     # the same prediction shapes as detect mode: one compile for both
  cfg.eval.pr_curves = False
  cfg.detect.max_images = 2
  cfg.detect.score_threshold = 0.0
  return cfg


@pytest.fixture(scope='module')
def template():
  """A TrainState of the right structure, to restore checkpoints into."""
  cfg = tiny_config()
  mesh = sharding.make_mesh()
  detector = task_lib.build_task(cfg)
  return cfg, detector, mesh, task_lib.create_train_state(detector, cfg, task_lib.init_rng(cfg.seed), mesh)


def saved_steps(workdir):
  return ckpt_lib.make_manager(str(workdir), tiny_config()).all_steps()


def load_state(workdir, step, template_state):
  manager = ckpt_lib.make_manager(str(workdir), tiny_config())
  return ckpt_lib.restore_state(manager, template_state, step)


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def metric_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """`--mode=train` for STEPS steps without a stop: the reference of the other runs."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  cfg = tiny_config()
  cfg.eval.pr_curves = True
  results = runner.run(cfg, workdir, 'train')
  return workdir, results


# ------------------------------------------------------------ end to end ---


def test_train_eval_detect_end_to_end(straight_run, template, tmp_path):
  workdir, train_results = straight_run
  _, _, _, state0 = template
  wd = pathlib.Path(workdir)

  rows = [r for r in metric_rows(workdir) if 'loss' in r]
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  for r in rows:
    assert np.isfinite(r['loss']) and r['loss'] > 0
    assert {'grad_norm', 'learning_rate', 'images_per_sec'} <= set(r)
  assert any('eval/mAP' in r and r['step'] == STEPS for r in metric_rows(workdir))
  assert json.loads((wd / 'config.json').read_text())['num_train_steps'] == STEPS

  assert saved_steps(workdir) == [2, STEPS]
  final = load_state(workdir, STEPS, state0)
  assert int(final.step) == STEPS and int(final.bad_step) == -1
  assert not np.array_equal(np.asarray(jax.tree.leaves(final.params)[0]),
                            np.asarray(jax.tree.leaves(state0.params)[0]))

  # The evaluation at the end of training, then `--mode=eval` on its checkpoint.
  step_dir = wd / 'eval' / f'step_{STEPS}'
  trained = json.loads((step_dir / 'results.json').read_text())
  assert trained['step'] == STEPS and trained['metric'] == 'voc07'
  assert list(step_dir.glob('pr*')), 'pr_curves=True draws precision-recall curves'
  eval_results = runner.run(tiny_config(), workdir, 'eval')
  assert isinstance(eval_results['mAP'], float) and 0.0 <= eval_results['mAP'] <= 1.0
  assert eval_results['num_images'] == 2
  assert eval_results['mAP'] == pytest.approx(train_results['mAP'], abs=1e-9)
  reread = json.loads((step_dir / 'results.json').read_text())['results']
  assert reread['mAP'] == pytest.approx(eval_results['mAP'])

  # Training drew its detections on the first test images; `--mode=detect` on a
  # folder holding two of them as PNGs must find the same boxes.
  drawn = json.loads((wd / 'detect' / 'detections.json').read_text())
  assert [r['image'] for r in drawn] == ['builtin_small_test_0', 'builtin_small_test_1']
  source = pipeline.get_source(tiny_config().data, 'test')
  folder = tmp_path / 'images'
  folder.mkdir()
  for i in range(2):
    Image.fromarray(source[i]['image']).save(folder / f'img{i}.png')
  (folder / 'notes.txt').write_text('not an image')
  cfg = tiny_config()
  cfg.detect.input = str(folder)
  detected = runner.run(cfg, workdir, 'detect')
  records, out = detected['detections'], pathlib.Path(detected['out_dir'])
  assert out.parent == wd / 'detect' and out != wd / 'detect'   # its own record folder
  assert [pathlib.Path(r['image']).name for r in records] == ['img0.png', 'img1.png']
  assert json.loads((out / 'detections.json').read_text()) == records
  for i, record in enumerate(records):
    picture = Image.open(out / f'img{i}.png')
    h, w = source[i]['image'].shape[:2]
    assert picture.size == (w, h)
    assert record['detections'], 'score_threshold=0 keeps every valid detection'
    assert record['detections'] == drawn[i]['detections']
    boxes = np.array([d['box_yxyx_px'] for d in record['detections']])
    assert np.all(boxes >= -0.01) and np.all(boxes[:, [0, 2]] <= h + 0.01)
    assert np.all(boxes[:, [1, 3]] <= w + 0.01)


# ---------------------------------------------------------------- resume ---


def test_stopped_and_resumed_run_equals_a_straight_run(straight_run, template, tmp_path):
  workdir, _ = straight_run
  _, _, _, state0 = template
  cfg = tiny_config()
  cfg.num_train_steps = STEPS // 2
  train.train_and_evaluate(cfg, str(tmp_path))
  assert saved_steps(tmp_path) == [STEPS // 2]
  train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert saved_steps(tmp_path) == [STEPS // 2, STEPS]

  # Model, optimizer (momentum and schedule count) and step, bit for bit.
  resumed, straight = load_state(tmp_path, STEPS, state0), load_state(workdir, STEPS, state0)
  assert_trees_equal(resumed.params, straight.params)
  assert_trees_equal(resumed.batch_stats, straight.batch_stats)
  assert_trees_equal(resumed.opt_state, straight.opt_state)
  assert int(resumed.step) == STEPS
  # The data iterator resumed too: the same batches, hence the same losses.
  losses = lambda wd: {r['step']: r['loss'] for r in metric_rows(wd) if 'loss' in r}
  assert losses(tmp_path) == losses(workdir)


# -------------------------------------------------------------- overfit ---


def test_loss_decreases_when_overfitting_a_few_images(template):
  _, detector, mesh, state0 = template
  cfg = tiny_config()
  cfg.data.builtin.num_train = 8
  cfg.data.augment = []
  state = jax.tree.map(jnp.copy, state0)   # the step donates its input
  step_fn = train.jit_train_step(detector, cfg, mesh, state)
  batches = pipeline.make_train_iterator(cfg)
  rng = jax.random.key(0)
  history = []
  for _ in range(20):
    state, metrics = step_fn(state, sharding.to_global_batch(next(batches), mesh), rng)
    history.append(float(metrics['loss']))
  assert np.all(np.isfinite(history)) and int(state.bad_step) == -1
  first, last = np.mean(history[:5]), np.mean(history[-5:])
  assert last < 0.5 * first, history
  # Past the first steps' fall from the random init's large loss, it keeps falling.
  assert last < 0.75 * np.mean(history[5:10]), history


# ------------------------------------------------------------- stopping ---


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    straight_run, template, tmp_path, monkeypatch):
  workdir, _ = straight_run
  _, _, _, state0 = template
  calls = []
  to_global_batch = sharding.to_global_batch

  def poison_third_batch(local, mesh):
    calls.append(1)
    if len(calls) == 3:
      # uint8 images cannot hold a NaN; the photometric draw the step applies can.
      local = dict(local, photometric=np.full(local['photometric'].shape, np.nan, np.float32))
    return to_global_batch(local, mesh)

  monkeypatch.setattr(sharding, 'to_global_batch', poison_third_batch)
  cfg = tiny_config()
  cfg.num_train_steps = 6
  cfg.log_every_steps = 4   # found late: the steps after the bad one must not have moved the state
  with pytest.raises(train.NonFiniteLossError, match=r'at step 3\b'):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert len(calls) == 4
  assert saved_steps(tmp_path) == [2]
  good = load_state(tmp_path, 2, state0)
  assert int(good.bad_step) == -1 and int(good.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(good.params))
  assert_trees_equal(good.params, load_state(workdir, 2, state0).params)


def test_sigterm_saves_a_checkpoint_and_stops_with_its_status(straight_run, template, tmp_path,
                                                              monkeypatch):
  workdir, _ = straight_run
  _, _, _, state0 = template
  unhandled = []
  calls = []
  to_global_batch = sharding.to_global_batch

  def terminate_during_second_step(local, mesh):
    calls.append(1)
    if len(calls) == 2:
      signal.raise_signal(signal.SIGTERM)
    return to_global_batch(local, mesh)

  monkeypatch.setattr(sharding, 'to_global_batch', terminate_during_second_step)
  fallback = lambda signum, frame: unhandled.append(signum)
  previous = signal.signal(signal.SIGTERM, fallback)
  try:
    # Not a finished run: no evaluation, and an error with the "stopped" exit status.
    with pytest.raises(errors.StoppedOnRequest, match='stopped at step 2 of'):
      train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is fallback, 'the previous handler is restored'
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert not unhandled
  assert errors.StoppedOnRequest.exit_code == 4
  assert not (tmp_path / 'eval').exists()
  assert len(calls) == 2
  assert saved_steps(tmp_path) == [2]
  stopped = load_state(tmp_path, 2, state0)
  assert int(stopped.step) == 2
  assert_trees_equal(stopped.params, load_state(workdir, 2, state0).params)


# ------------------------------------------------------------ init_from ---


def test_init_from_another_run_starts_at_step_zero_with_its_params(straight_run, template,
                                                                   tmp_path):
  workdir, _ = straight_run
  _, detector, _, state0 = template
  cfg = tiny_config()
  cfg.init_from = workdir
  # Fine-tuning with another optimizer: only the model may be read from the other run.
  cfg.optim.grad_clip_norm = 0.0
  tx = optim_lib.make_optimizer(cfg.optim, cfg.num_train_steps)
  fresh = state0.replace(opt_state=tx.init(state0.params), tx=tx)
  assert jax.tree.structure(fresh.opt_state) != jax.tree.structure(state0.opt_state)
  manager = ckpt_lib.make_manager(str(tmp_path), cfg)
  state, how = ckpt_lib.restore_or_initialize(manager, fresh, cfg)
  assert how == f'initialised from {workdir} step {STEPS}'
  assert int(state.step) == 0 and int(state.bad_step) == -1
  source = load_state(workdir, STEPS, state0)
  assert_trees_equal(state.params, source.params)
  assert_trees_equal(state.batch_stats, source.batch_stats)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(fresh.opt_state)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state)), \
      'a fresh optimizer: no momentum carried over from the other run'

  # Once this workdir has its own checkpoint, resuming wins over init_from.
  ckpt_lib.save(manager, 1, state.replace(step=state.step + 1))
  again, how = ckpt_lib.restore_or_initialize(manager, fresh, cfg)
  assert how == 'resumed from step 1' and int(again.step) == 1


# ------------------------------------------------------------ retention ---


def test_keeps_the_last_n_and_the_best_map(tmp_path):
  cfg = tiny_config()
  cfg.keep_checkpoints = 2
  tx = optax.sgd(0.1, momentum=0.9)

  def state_at(step):
    p = {'w': jnp.full((3,), step, jnp.float32)}
    return train.TrainState(step=jnp.int32(step), params=p, batch_stats={'m': jnp.ones(2)},
                            opt_state=tx.init(p), bad_step=jnp.int32(-1), tx=tx)

  def save_then_evaluate(manager, step, m=None):
    # As the trainer does: the checkpoint first, then the evaluation's record.
    ckpt_lib.save(manager, step, state_at(step))
    if m is not None:
      record = tmp_path / 'eval' / f'step_{step}'
      record.mkdir(parents=True)
      (record / 'results.json').write_text(json.dumps({'step': step, 'results': {'mAP': m}}))

  maps = {1: 0.10, 2: 0.70, 3: 0.30, 4: 0.05, 5: 0.40, 6: 0.50}
  manager = ckpt_lib.make_manager(str(tmp_path), cfg)
  for step, m in maps.items():
    save_then_evaluate(manager, step, m)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 5, 6]   # the highest mAP, not the lowest (step 4)

  # A restarted run (a new manager) still knows the metrics of the old checkpoints;
  # checkpoints without an evaluation only count towards the last N.
  manager = ckpt_lib.make_manager(str(tmp_path), cfg)
  save_then_evaluate(manager, 7, 0.60)
  save_then_evaluate(manager, 8)
  save_then_evaluate(manager, 9)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 8, 9]
  template_state = state_at(0)
  best = ckpt_lib.restore_state(manager, template_state, 2)
  np.testing.assert_array_equal(best.params['w'], [2, 2, 2])
  assert int(ckpt_lib.restore_state(manager, template_state).step) == 9


# ------------------------------------------------- never losing a run ---


def test_a_failing_final_evaluation_keeps_the_trained_model(template, tmp_path, monkeypatch):
  """The checkpoint is written before the evaluation; the run says what failed, and a
  second run evaluates without training again."""
  from smallssd_jax import evaluation  # pylint: disable=g-import-not-at-top
  broken = lambda *a, **k: (_ for _ in ()).throw(OSError('a corrupt test image'))
  monkeypatch.setattr(evaluation.metrics_lib, 'evaluate', broken)
  with pytest.raises(errors.EvaluationFailed, match=r'training finished at step 4 and the '
                     r'checkpoint is saved.*corrupt test image'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert errors.EvaluationFailed.exit_code == 3
  assert saved_steps(tmp_path) == [2, STEPS]
  monkeypatch.undo()
  rows = len(metric_rows(tmp_path))
  results = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert 0.0 <= results['mAP'] <= 1.0
  assert [r for r in metric_rows(tmp_path)[rows:] if 'loss' in r] == []   # nothing retrained


def test_a_finished_run_says_so_and_reports_its_evaluation(straight_run, capsys):
  workdir, train_results = straight_run
  before = metric_rows(workdir)
  results = runner.run(tiny_config(), workdir, 'train')
  assert 'nothing to train (final evaluation on record)' in capsys.readouterr().out
  assert results['mAP'] == pytest.approx(train_results['mAP'])
  assert len([r for r in metric_rows(workdir) if 'loss' in r]) == len(
      [r for r in before if 'loss' in r])


def test_nan_at_the_first_step_says_no_checkpoint_exists(tmp_path, monkeypatch):
  to_global_batch = sharding.to_global_batch

  def poison(local, mesh):
    return to_global_batch(dict(local, photometric=np.full(local['photometric'].shape, np.nan,
                                                           np.float32)), mesh)

  monkeypatch.setattr(sharding, 'to_global_batch', poison)
  cfg = tiny_config()
  cfg.log_every_steps = 1
  with pytest.raises(errors.NonFiniteLossError, match='no checkpoint had been written'):
    train.train_and_evaluate(cfg, str(tmp_path))


def test_eval_and_detect_leave_the_training_records_alone(straight_run, tmp_path):
  workdir, _ = straight_run
  wd = pathlib.Path(workdir)
  config_json = (wd / 'config.json').read_bytes()
  record = (wd / 'eval' / f'step_{STEPS}' / 'results.json').read_bytes()
  cfg = tiny_config()
  cfg.eval.num_examples = 1                # other options than the training run's
  cfg.eval.name = 'one_image'
  results = runner.run(cfg, workdir, 'eval')
  assert results['num_images'] == 1
  assert (wd / 'eval' / 'one_image' / f'step_{STEPS}' / 'results.json').exists()
  assert json.loads((wd / 'eval' / 'one_image' / 'config.json').read_text())['eval'][
      'num_examples'] == 1
  with pytest.raises(errors.ConfigError, match='exists: choose another'):
    runner.run(cfg, workdir, 'eval')      # a record is never overwritten either
  # A folder with two images of the same name and a broken one.
  folder = tmp_path / 'mixed'
  folder.mkdir()
  image = pipeline.get_source(tiny_config().data, 'test')[0]['image']
  Image.fromarray(image).save(folder / 'a.png')
  Image.fromarray(image).save(folder / 'a.jpg')
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  cfg = tiny_config()
  cfg.detect.input = str(folder)
  cfg.detect.name = 'mixed'
  detected = runner.run(cfg, workdir, 'detect')
  out = pathlib.Path(detected['out_dir'])
  assert out == wd / 'detect' / 'mixed'
  assert sorted(p.name for p in out.glob('*.png')) == ['a_jpg.png', 'a_png.png']
  broken = [r for r in detected['detections'] if r['image'].endswith('broken.jpg')]
  assert len(broken) == 1 and broken[0]['error'] and broken[0]['detections'] == []
  assert (wd / 'config.json').read_bytes() == config_json
  assert (wd / 'eval' / f'step_{STEPS}' / 'results.json').read_bytes() == record


def test_the_log_counts_repaired_boxes(straight_run):
  workdir, _ = straight_run
  rows = [r for r in metric_rows(workdir) if 'loss' in r]
  assert all({'boxes_clipped', 'boxes_dropped', 'boxes_cropped'} <= set(r) for r in rows)
  # The built-in data needs no repairs; its augmentation crops objects out now and then.
  assert all(r['boxes_clipped'] == 0 and r['boxes_dropped'] == 0 for r in rows)


def test_init_from_a_run_with_other_classes_reinitialises_the_class_heads(straight_run,
                                                                          tmp_path, caplog):
  workdir, _ = straight_run
  cfg = tiny_config()
  cfg.data.builtin.num_classes = 4                 # 6 classes there, 4 here
  cfg.model.num_classes = 5
  cfg.init_from = workdir
  cfg.num_train_steps = 1
  task = task_lib.build_task(cfg)
  mesh = sharding.make_mesh()
  fresh = task_lib.create_train_state(task, cfg, task_lib.init_rng(1), mesh)
  manager = ckpt_lib.make_manager(str(tmp_path), cfg)
  with caplog.at_level('INFO'):
    state, how = ckpt_lib.restore_or_initialize(manager, fresh, cfg)
  assert how.startswith(f'initialised from {workdir} step {STEPS}; class heads re-initialised')
  assert any('head/classification/level0/kernel' in r.getMessage() for r in caplog.records)
  other = ckpt_lib.restore_variables(workdir, task_lib.abstract_train_state(
      task_lib.build_task(tiny_config()), tiny_config(), mesh))[0]
  np.testing.assert_array_equal(state.params['backbone']['conv1_1']['kernel'],
                                other.params['backbone']['conv1_1']['kernel'])
  np.testing.assert_array_equal(state.params['head']['classification']['level0']['kernel'],
                                fresh.params['head']['classification']['level0']['kernel'])
  np.testing.assert_array_equal(state.params['head']['regression']['level0']['kernel'],
                                other.params['head']['regression']['level0']['kernel'])
