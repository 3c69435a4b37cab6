"""Data parallelism (docs/design.md §7): 8 CPU devices in one process, and 2 processes over gloo.

The device count and `jax.distributed` must be fixed before JAX starts, so
every case runs in fresh subprocesses, and this file is also their script:
`python tests/test_distributed.py <role> ...` (the roles are at the bottom).

Which examples a step trains on. The global batch of step k is the same
whatever the number of processes: `pipeline.make_train_iterator(config, p, n)`
gives process p the p-th slice of it, and `sharding.to_global_batch` stacks the
local batches in process order. So the single-process reference here is a
plain one-process run of the same config.

* `single` (one process, `XLA_FLAGS=--xla_force_host_platform_device_count=8`)
  trains on those batches on a mesh of 1 device, saves and evaluates that
  checkpoint, and trains again from the same initial state on a mesh of all 8
  devices. The DF-SSD neck has BatchNorm, whose batch statistics are a mean
  over the global batch whatever the mesh.
* `worker` x 2 (`jax.distributed` on the CPU collectives backend, gloo, on a
  free port of 127.0.0.1): `runner.run(config, workdir, 'train')` trains,
  checkpoints and evaluates (detections gathered from both processes, the
  metric computed once, on process 0, and its results broadcast); then
  `runner.run(..., 'eval')` with `eval.checkpoint` set evaluates the
  1-process checkpoint.
* `restore` (one process): restores the 2-process checkpoint and evaluates
  it, and resumes the 2-process run's step-1 checkpoint on one process for the
  last step.

Runs are compared after one step to rounding, and after the last step within a
small fraction of the update (`assert_same_training`); the same checkpoint
must give exactly the same detections, image by image, and exactly the same
metrics on 1 and on 2 processes.

Compile time dominates on a small CPU: XLA's backend optimisation is lowered
for every subprocess, and the single-process ones share a persistent
compilation cache (the 2-process workers do not use it: with
JAX_SHARE_BINARY_BETWEEN_HOSTS one process waited forever for a binary the
other never published).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

# End-to-end runs: left out of the fast subset (pytest -m "not slow").
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / 'configs' / 'default.py') + ':model=dfssd,runlocal'
STEPS = 2
GLOBAL_BATCH = 8
EVAL_EXAMPLES = 5          # < the eval batch: both sides pad, 2 processes unevenly (3 + 2)
EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'
PACKAGE_CPU_FLAG = '--xla_disable_hlo_passes=dot-library-rewriter'
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true'
TIMEOUT = 900
TIMING_KEYS = ('predict_seconds', 'metric_seconds')
EVAL_RECORD = 'of_the_one_process_run'   # --mode=eval's record folder


def tiny_config():
  """runlocal with deterministic data, a constant learning rate and a small evaluation."""
  from smallssd_jax.config_blocks import load_config  # pylint: disable=g-import-not-at-top
  cfg = load_config(CONFIG)
  # The model these tests were calibrated on: DF-SSD, plain VGG16, Xavier heads.
  cfg.model.backbone_batch_norm = False
  cfg.model.head_init = 'xavier'
  cfg.batch_size = GLOBAL_BATCH
  cfg.num_train_steps = STEPS
  cfg.log_every_steps = 1
  cfg.checkpoint_every_steps = 1         # the 2-process run's first step is compared too
  cfg.eval_every_steps = 0               # evaluate once, after the last step
  cfg.optim.boundaries = [1000, 2000]
  cfg.optim.warmup_steps = 0
  cfg.data.augment = []                  # resize + normalize only: the same pixels in every run
  # Every eligible anchor is a negative: hard-negative mining ranks anchors by
  # their background loss, which an untrained detector makes nearly equal, so
  # rounding differences between meshes would otherwise flip which of the tied
  # anchors are picked and move the parameters by more than rounding.
  cfg.loss.neg_pos_ratio = 100_000
  cfg.data.builtin.num_test = EVAL_EXAMPLES
  cfg.eval.num_examples = EVAL_EXAMPLES
  cfg.eval.batch_size = GLOBAL_BATCH
  cfg.eval.pr_curves = False
  # Many detections per image: the untrained detector's best-scored boxes are
  # its large priors, and the evaluations compared need some true positives
  # among the small objects (a handful here) for the metric to compare anything.
  cfg.post.score_threshold = 0.0
  cfg.post.pre_nms_top_k = 2000
  cfg.post.max_detections = 2000
  cfg.detect.max_images = 0
  return cfg


# ------------------------------------------------------------ the driver ---


def subprocess_env(xla_flags: str = '', **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if 'proxy' not in k.lower() and not k.startswith(('JAX_', 'XLA_', 'SMALLSSD_JAX_'))}
  env.update(
      JAX_PLATFORMS='cpu',
      # Set without the package's own flag: the entry point must add it.
      XLA_FLAGS=' '.join(f for f in (xla_flags, FAST_COMPILE_FLAGS) if f),
      PYTHONUNBUFFERED='1',
  )
  env.update(extra)
  return env


def cached_env(cache_dir: pathlib.Path, xla_flags: str = '') -> dict[str, str]:
  return subprocess_env(xla_flags, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _tail(path: pathlib.Path, n: int = 6000) -> str:
  return path.read_text(errors='replace')[-n:] if path.exists() else ''


def run_processes(log_dir: pathlib.Path, name: str, args: list[str],
                  envs: list[dict[str, str]]) -> None:
  """Runs this file as `len(envs)` processes with `args`; fails with their logs."""
  procs, logs = [], []
  with contextlib.ExitStack() as stack:
    for i, env in enumerate(envs):
      log = log_dir / f'{name}_{i}.log'
      f = stack.enter_context(open(log, 'w'))
      procs.append(subprocess.Popen([sys.executable, __file__, *args], env=env, cwd=str(REPO),
                                    stdout=f, stderr=subprocess.STDOUT))
      logs.append(log)
    try:
      codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
  if any(codes):
    report = '\n'.join(f'--- {name} process {i} (exit {c}) ---\n{_tail(log)}'
                       for i, (c, log) in enumerate(zip(codes, logs)))
    pytest.fail(f'{name} failed:\n{report}')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def load_npz(path) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def assert_same_training(run_dir: pathlib.Path, reference_dir: pathlib.Path,
                         steps: tuple[str, ...] = ('step1', 'final')) -> None:
  """Parameters and BN statistics (`step1.npz`, `final.npz`) of a run against the reference.

  After one step (the same starting point, one gradient) they agree to
  rounding. Later steps start from points that differ by that rounding, which
  the detector's ReLUs and max-pools and the large steps of an untrained
  detector can amplify (three steps moved a few values by up to 0.4% of their
  update), so the last step is compared within 1% of each array's update:
  still far from what a wrong data-parallel step does (per-device BatchNorm
  statistics, or gradients not averaged over devices, are off by the update).
  """
  init = load_npz(reference_dir / 'init.npz')
  for name in steps:
    got, want = load_npz(run_dir / f'{name}.npz'), load_npz(reference_dir / f'{name}.npz')
    assert sorted(got) == sorted(want) == sorted(init)
    for k in want:
      if name == 'step1':
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=f'{name}: {k}')
      else:
        update = float(np.abs(want[k] - init[k]).max())
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-2 * update + 1e-6,
                                   err_msg=f'{name}: {k}')


def eval_results(workdir: pathlib.Path, record: str = '') -> dict:
  """A run's own evaluation record of its last step, or that of `--mode=eval` named `record`."""
  folder = workdir / 'eval' / record if record else workdir / 'eval'
  results = json.loads((folder / f'step_{STEPS}' / 'results.json').read_text())
  return {k: v for k, v in results['results'].items() if k not in TIMING_KEYS}


def assert_same_detections(got: pathlib.Path, want: pathlib.Path) -> None:
  """The evaluator's ground truth and detections, image by image (the order may differ)."""
  a, b = load_npz(got), load_npz(want)
  assert sorted(a) == sorted(b)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
  return tmp_path_factory.mktemp('distributed')


@pytest.fixture(scope='module')
def single(work):
  """The `single` role's folder: meshes of 1 and 8 devices, and the 1-process checkpoint."""
  out = work / 'single'
  run_processes(work, 'single', ['single', str(out)], [cached_env(work / 'xla_cache', EIGHT_DEVICES)])
  return out


# ----------------------------------------------------------------- tests ---


def test_eight_devices_match_one_device(single):
  info = json.loads((single / 'info.json').read_text())
  flags = info['xla_flags'].split()
  assert EIGHT_DEVICES in flags and PACKAGE_CPU_FLAG in flags, (
      'the entry point adds the package\'s CPU flag to an XLA_FLAGS that is already set')
  assert info['device_count'] == 8
  assert info['batch_shards'] == [[1, 300, 300, 3]] * 8       # one example per device
  assert info['params_replicated_on_8']
  assert info['has_batch_stats'] and info['batch_stats_moved']
  np.testing.assert_allclose(info['losses_8'], info['losses_1'], rtol=1e-5)
  assert_same_training(single / '8', single / '1')


def test_two_processes_match_one_process(single, work):
  w1 = single / 'one_process'
  w2 = work / 'two_processes'
  w3 = work / 'two_processes_eval_of_one_process'
  port = free_port()
  envs = [subprocess_env(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                         JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}',
                         JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)) for i in range(2)]
  run_processes(work, 'worker', ['worker', str(w1), str(w2), str(w3)], envs)
  run_processes(work, 'restore', ['restore', str(w2)],
                [cached_env(work / 'xla_cache', EIGHT_DEVICES)])

  for i in range(2):
    info = json.loads((w2 / f'worker_{i}.json').read_text())
    assert info == {'process_index': i, 'process_count': 2, 'device_count': 2,
                    'local_device_count': 1, 'collectives': 'gloo'}
  # The metric ran once per evaluation, on process 0, and every process got its results.
  scored = [json.loads((w2 / f'scored_{i}.json').read_text()) for i in range(2)]
  assert [s['metric_calls'] for s in scored] == [2, 0]
  assert scored[0]['results'] == scored[1]['results'] and len(scored[0]['results']) == 2
  assert scored[0]['results'][0]['mAP'] == eval_results(w2)['mAP']

  # The same global batches: the same losses, parameters and BN statistics.
  losses = [r['loss'] for r in map(json.loads, (w2 / 'metrics.jsonl').read_text().splitlines())
            if 'loss' in r]
  reference = json.loads((single / 'info.json').read_text())
  np.testing.assert_allclose(losses, reference['losses_1'], rtol=1e-5)
  assert_same_training(w2 / 'restored', single / '1')
  # The 2-process run, resumed on one process at step 1, takes the same last step.
  assert_same_training(w2 / 'resumed_on_one_process', single / '1', steps=('final',))

  # Each side restores what the other wrote, and a checkpoint detects and scores
  # exactly the same on 1 and on 2 processes: the 1-process checkpoint ...
  one_process_final = load_npz(single / '1' / 'final.npz')
  for i in range(2):
    restored = load_npz(w2 / f'restored_w1_process{i}.npz')
    assert sorted(restored) == sorted(one_process_final)
    for k, v in one_process_final.items():
      np.testing.assert_array_equal(restored[k], v, err_msg=k)
  assert_same_detections(w3 / 'detections.npz', w1 / 'detections.npz')
  assert eval_results(w3, EVAL_RECORD) == eval_results(w1)
  # ... and the 2-process one.
  assert_same_detections(w2 / 'restored' / 'detections.npz', w2 / 'detections.npz')
  two, one = eval_results(w2), eval_results(w2 / 'restored')
  assert one == two
  for results in (two, eval_results(w1)):
    assert results['num_images'] == EVAL_EXAMPLES
    assert results['mAP'] > 0, 'an evaluation without true positives would compare nothing'


# ------------------------------------------------- the subprocess roles ---


@contextlib.contextmanager
def _timed(what: str):
  """Seconds per phase, in the subprocess's log (where to look when the test is slow)."""
  import time  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  yield
  print(f'[timing] {what}: {time.perf_counter() - start:.1f}s', flush=True)


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  # Replicated arrays: every process holds the whole value.
  return {prefix + jax.tree_util.keystr(path):
          np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _state_arrays(state) -> dict[str, np.ndarray]:
  return {**_flat(state.params, 'params'), **_flat(state.batch_stats, 'batch_stats')}


def record_detections(path: pathlib.Path) -> None:
  """Makes `Evaluator.collect` also save what it gathered (process 0), keyed by image id."""
  import jax  # pylint: disable=g-import-not-at-top
  from smallssd_jax import evaluation as eval_lib  # pylint: disable=g-import-not-at-top
  collect = getattr(eval_lib.Evaluator.collect, 'unrecorded', eval_lib.Evaluator.collect)

  def collect_and_save(self, variables):
    gts, dets = collect(self, variables)
    if jax.process_index() == 0:
      arrays = {}
      for gt, det in zip(gts, dets):
        image = gt['image_id']
        arrays.update({f'{image}/gt_{k}': np.asarray(gt[k]) for k in ('boxes', 'labels', 'ignore')})
        arrays.update({f'{image}/{k}': np.asarray(v) for k, v in det.items()})
      np.savez(path, **arrays)
    return gts, dets

  collect_and_save.unrecorded = collect
  eval_lib.Evaluator.collect = collect_and_save


def one_process_batches(cfg, start_step: int = 0) -> list[dict[str, np.ndarray]]:
  """The global batches of steps start_step.. of the run, read by one process."""
  from smallssd_jax.datasets import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_iterator(cfg, start_step=start_step)
  return [next(it) for _ in range(start_step, cfg.num_train_steps)]


def count_metric_calls():
  """Counts this process's calls of the metric; returns the counter."""
  from smallssd_jax import evaluation as eval_lib  # pylint: disable=g-import-not-at-top
  calls = []
  evaluate = eval_lib.metrics_lib.evaluate

  def counted(*args, **kwargs):
    calls.append(1)
    return evaluate(*args, **kwargs)

  eval_lib.metrics_lib.evaluate = counted
  return calls


def role_single(out_dir: str) -> None:
  """One process, 8 CPU devices: the reference on 1 device (saved, evaluated), then 8 devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from smallssd_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import evaluation as eval_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import sharding  # pylint: disable=g-import-not-at-top
  from smallssd_jax import task as task_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import train  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True)
  info = {'xla_flags': os.environ.get('XLA_FLAGS', ''), 'device_count': jax.device_count()}
  cfg = tiny_config()
  detector = task_lib.build_task(cfg)
  batches = one_process_batches(cfg)

  mesh1 = sharding.make_mesh(jax.devices()[:1])
  with _timed('init'):
    state = task_lib.create_train_state(detector, cfg, task_lib.init_rng(cfg.seed), mesh1)
  initial = jax.device_get(state)

  for n, mesh in ((1, mesh1), (8, sharding.make_mesh(jax.devices()))):
    run_dir = out / str(n)
    run_dir.mkdir()
    # The same starting point on both meshes, whatever the initialiser does.
    state = jax.device_put(initial, sharding.replicated(mesh))
    np.savez(run_dir / 'init.npz', **_state_arrays(state))
    step_fn = train.jit_train_step(detector, cfg, mesh, state)
    losses = []
    for i, local in enumerate(batches):
      batch = sharding.to_global_batch(local, mesh)
      if n == 8:
        info['batch_shards'] = [list(s.data.shape) for s in batch['image'].addressable_shards]
      with _timed(f'{n} devices: step {i + 1}'):
        state, metrics = step_fn(state, batch, jax.random.key(i))
        losses.append(float(metrics['loss']))
      if i == 0:
        np.savez(run_dir / 'step1.npz', **_state_arrays(state))
    info[f'losses_{n}'] = losses
    np.savez(run_dir / 'final.npz', **_state_arrays(state))

    if n == 1:
      workdir = str(out / 'one_process')
      manager = ckpt_lib.make_manager(workdir, cfg)
      ckpt_lib.save(manager, STEPS, state)
      manager.wait_until_finished()
      record_detections(pathlib.Path(workdir, 'detections.npz'))
      with _timed('1 device: evaluate'):
        eval_lib.Evaluator(cfg, task_lib.make_predict_fn(detector, cfg, mesh), mesh).run(
            task_lib.variables_of(state), step=STEPS, out_dir=f'{workdir}/eval/step_{STEPS}')
    else:
      info['params_replicated_on_8'] = all(
          len(leaf.addressable_shards) == 8 and all(
              np.array_equal(np.asarray(s.data), np.asarray(leaf.addressable_shards[0].data))
              for s in leaf.addressable_shards)
          for leaf in jax.tree.leaves(state.params))
      stats, initial_stats = _flat(state.batch_stats, ''), _flat(initial.batch_stats, '')
      info['has_batch_stats'] = bool(stats)
      info['batch_stats_moved'] = all(not np.array_equal(stats[k], initial_stats[k])
                                      for k in stats)
  (out / 'info.json').write_text(json.dumps(info))


def role_worker(w1: str, w2: str, w3: str) -> None:
  """One of 2 processes: train and evaluate (w2), evaluate the 1-process checkpoint w1 (w3)."""
  import jax  # pylint: disable=g-import-not-at-top
  from smallssd_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import runner  # pylint: disable=g-import-not-at-top
  from smallssd_jax import sharding  # pylint: disable=g-import-not-at-top
  from smallssd_jax import task as task_lib  # pylint: disable=g-import-not-at-top

  calls = count_metric_calls()
  results = []
  record_detections(pathlib.Path(w2, 'detections.npz'))
  with _timed('train + evaluate'):
    results.append(runner.run(tiny_config(), w2, 'train'))
  # `--mode=eval --config.eval.checkpoint=w1`, in the same processes (a second run).
  record_detections(pathlib.Path(w3, 'detections.npz'))
  cfg = tiny_config()
  cfg.eval.checkpoint = w1
  cfg.eval.name = EVAL_RECORD
  with _timed('evaluate the 1-process checkpoint'):
    results.append(runner.run(cfg, w3, 'eval'))
  results = [{k: None if v != v else v for k, v in r.items()} for r in results]  # NaN: no AP
  pathlib.Path(w2, f'scored_{jax.process_index()}.json').write_text(json.dumps(
      {'metric_calls': len(calls), 'results': results}))
  # The raw restore, for an exact comparison of the variables.
  cfg = tiny_config()
  mesh = sharding.make_mesh()
  abstract = task_lib.abstract_train_state(task_lib.build_task(cfg), cfg, mesh)
  state, step = ckpt_lib.restore_variables(w1, abstract)
  assert step == STEPS
  pid = jax.process_index()
  np.savez(pathlib.Path(w2, f'restored_w1_process{pid}.npz'), **_state_arrays(state))
  info = {'process_index': pid, 'process_count': jax.process_count(),
          'device_count': jax.device_count(), 'local_device_count': jax.local_device_count(),
          'collectives': jax.config.jax_cpu_collectives_implementation}
  pathlib.Path(w2, f'worker_{pid}.json').write_text(json.dumps(info))


def role_restore(w2: str) -> None:
  """One process restores the 2-process checkpoint (steps 1 and last) and evaluates it."""
  import jax  # pylint: disable=g-import-not-at-top
  from smallssd_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import evaluation as eval_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import sharding  # pylint: disable=g-import-not-at-top
  from smallssd_jax import task as task_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import train  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == 1
  out = pathlib.Path(w2, 'restored')
  out.mkdir()
  cfg = tiny_config()
  # One device, as the `single` role evaluated on: its compiled programs are reused.
  mesh = sharding.make_mesh(jax.devices()[:1])
  detector = task_lib.build_task(cfg)
  abstract = task_lib.abstract_train_state(detector, cfg, mesh)
  state, step = ckpt_lib.restore_variables(w2, abstract)
  assert step == STEPS
  np.savez(out / 'final.npz', **_state_arrays(state))
  np.savez(out / 'step1.npz', **_state_arrays(ckpt_lib.restore_variables(w2, abstract, 1)[0]))
  record_detections(out / 'detections.npz')
  with _timed('evaluate'):
    eval_lib.Evaluator(cfg, task_lib.make_predict_fn(detector, cfg, mesh), mesh).run(
        task_lib.variables_of(state), step=step, out_dir=f'{out}/eval/step_{step}')

  # Resume the 2-process run at step 1 on one process: the full state, and the
  # data iterator rebuilt at that step.
  out = pathlib.Path(w2, 'resumed_on_one_process')
  out.mkdir()
  state = ckpt_lib.restore_state(ckpt_lib.make_manager(w2, cfg), abstract, 1)
  assert int(state.step) == 1
  step_fn = train.jit_train_step(detector, cfg, mesh, state)
  for i, local in enumerate(one_process_batches(cfg, start_step=1), start=1):
    state, _ = step_fn(state, sharding.to_global_batch(local, mesh), jax.random.key(i))
  np.savez(out / 'final.npz', **_state_arrays(state))


ROLES = {'single': role_single, 'worker': role_worker, 'restore': role_restore}


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  import smallssd_jax  # pylint: disable=g-import-not-at-top
  smallssd_jax.apply_cpu_xla_defaults()     # as the command-line entry points do
  flags.FLAGS.mark_as_parsed()
  ROLES[argv[0]](*argv[1:])


if __name__ == '__main__':
  main(sys.argv[1:])
