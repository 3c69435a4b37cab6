"""Orbax checkpoints: model, optimizer and step; checked on every restore.

The data iterator needs no state of its own: its batches are a function of
the config and the global step (`datasets.pipeline`), so a resumed run
rebuilds it at the restored step, with any number of processes or workers.

Resume order: the workdir's newest *intact* checkpoint, else
`config.init_from` (another run's checkpoint directory, or a VGG16 / SSD300
weight file converted on the fly), else the random initialisation.

Integrity: orbax 0.12 writes array chunks (zarr, zstd) without checksums and
has no public switch for tensorstore's crc32c codec, so each save also
writes, as a second orbax item of the same atomic step directory, the CRC-32
of every array (`checksums`). A restore that fails (a missing or truncated
file, missing metadata) or whose arrays do not match their checksums
(corrupted bytes) marks that step damaged: training and evaluation fall
back to the newest intact step with a warning naming the damaged one, and
fail with a clear message when none is intact.

Retention: the last `keep_checkpoints` steps plus the step with the best
mAP among the run's own evaluation records (`eval/step_N/results.json`),
which are written after the checkpoint of their step: a checkpoint is saved
before the evaluation that might fail.

One run per workdir: process 0 holds an exclusive lock on `WORKDIR/.lock`
(released by the OS when the process dies, so a stale lock from a killed run
is simply taken over); a second run fails at once naming the holder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import socket
import time
import zlib
from typing import Any, Sequence

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from smallssd_jax import errors

STATE_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'bad_step')
STATE, CHECKSUMS = 'state', 'checksums'


# ------------------------------------------------------------------ lock ---


class WorkdirLock:
  """An exclusive `flock` on WORKDIR/.lock for one training run (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, '.lock')
    self.enabled = enabled
    self._fd = None

  def __enter__(self):
    if not self.enabled:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 4096).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise errors.WorkdirBusy(
          f'{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to '
          'finish, stop it, or use another --workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, f'pid {os.getpid()} on {socket.gethostname()} since '
                 f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n'.encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


# ------------------------------------------------------------- retention ---


@dataclasses.dataclass
class BestEvaluated(checkpoint_managers.PreservationPolicy):
  """Keeps the step with the highest mAP among `workdir/eval/step_N/results.json`."""
  workdir: str

  def best_step(self) -> int | None:
    best = None
    for path in pathlib.Path(self.workdir, 'eval').glob('step_*/results.json'):
      try:
        record = json.loads(path.read_text())
        value = float(record['results']['mAP'])
      except (OSError, ValueError, KeyError, TypeError):
        continue
      if np.isfinite(value) and (best is None or (value, record['step']) > best):
        best = (value, int(record['step']))
    return None if best is None else best[1]

  def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
    del context
    best = self.best_step()
    return [info.step == best for info in checkpoints]


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  if config.keep_checkpoints < 1:
    raise errors.ConfigError(f'keep_checkpoints must be >= 1 (got {config.keep_checkpoints}): '
                             'with 0 every checkpoint would be deleted as soon as it is written')
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=config.keep_checkpoints), BestEvaluated(workdir)])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options,
      item_handlers={STATE: ocp.StandardCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()})


# -------------------------------------------------------------- checksums ---


def flat_arrays(tree) -> dict[str, Any]:
  """`{'a/b/c': leaf}` of nested dicts (parameters, batch statistics, array metadata)."""
  flat = flax.traverse_util.flatten_dict(tree, sep='/') if isinstance(tree, dict) else {'': tree}
  return {k: v for k, v in flat.items() if v is not None}


def _host(x) -> np.ndarray:
  # Replicated arrays: the first local copy is the whole array.
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_shards[0].data
  return np.ascontiguousarray(np.asarray(x))


def checksums(tree) -> dict[str, str]:
  """`{path: 'crc32:dtype:shape'}` of every array of a (replicated) pytree."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(tree):
    a = _host(value)
    out[jax.tree_util.keystr(path)] = (f'{zlib.crc32(a.tobytes()) & 0xFFFFFFFF:08x}:{a.dtype}:'
                                       f'{list(a.shape)}')
  return out


def _state_dict(state) -> dict[str, Any]:
  return {k: getattr(state, k) for k in STATE_FIELDS}


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
  """Writes `state` at `step` (the state and its checksums, one atomic step directory)."""
  tree = _state_dict(state)
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(tree), CHECKSUMS: ocp.args.JsonSave(checksums(tree))}),
      force=True)


class DamagedCheckpoint(Exception):
  """A step that cannot be restored intact (the message says which file or array)."""


def _step_dir(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
  return pathlib.Path(str(manager.directory)) / str(step)


def _recorded_checksums(manager: ocp.CheckpointManager, step: int) -> dict[str, str] | None:
  if not (_step_dir(manager, step) / CHECKSUMS).exists():
    return None           # written before checksums were recorded
  try:
    return manager.restore(step, args=ocp.args.Composite(**{CHECKSUMS: ocp.args.JsonRestore()}))[
        CHECKSUMS]
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(f'its checksum record cannot be read ({type(e).__name__}: {e})') from e


def _verify(tree: dict[str, Any], recorded: dict[str, str] | None) -> None:
  """Raises DamagedCheckpoint when a restored array differs from its recorded checksum."""
  if recorded is None:
    return
  got = checksums(tree)
  bad = [k for k, v in got.items() if recorded.get(k) not in (None, v)]
  if bad:
    raise DamagedCheckpoint(f'{len(bad)} array(s) do not match the checksums written with them '
                            f'(corrupted bytes), e.g. {bad[0]}')


def _shapes(manager: ocp.CheckpointManager, step: int) -> dict[str, tuple]:
  """`{path: shape}` of the arrays stored at `step`, from its metadata alone."""
  try:
    meta = manager.item_metadata(step)[STATE]
    tree = getattr(meta, 'tree', meta)
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(f'its metadata cannot be read ({type(e).__name__}: {e})') from e
  if tree is None:
    raise DamagedCheckpoint(f'its array metadata ({STATE}/_METADATA) is missing')
  return {k: tuple(getattr(v, 'shape', ())) for k, v in flat_arrays(tree).items()}


def check_shapes(stored: dict[str, tuple], wanted, where: str, prefix: str = '',
                 source: str = 'the checkpoint') -> None:
  """Raises CheckpointError naming every array whose stored shape differs from `wanted`'s."""
  problems = []
  for path, value in flat_arrays(wanted).items():
    shape = tuple(getattr(value, 'shape', ()))
    have = stored.get(prefix + path)
    if have is None:
      problems.append(f'{prefix + path} is missing from {source}')
    elif have != shape:
      problems.append(f'{prefix + path} is {list(have)} in {source}, {list(shape)} in the model')
  if problems:
    raise errors.CheckpointError(
        f'{where} does not match the config (model width, classes, priors or architecture): '
        + '; '.join(problems[:5]) + (f'; and {len(problems) - 5} more' if len(problems) > 5 else ''))


def _restore(manager: ocp.CheckpointManager, step: int, target: dict[str, Any],
             partial: bool) -> dict[str, Any]:
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  if partial:
    args = ocp.args.PyTreeRestore(abstract,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                  partial_restore=True)
  else:
    args = ocp.args.StandardRestore(abstract)
  try:
    return manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
  except errors.RunError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(f'{type(e).__name__}: {str(e).splitlines()[0][:300]}') from e


def restore_intact(manager: ocp.CheckpointManager, target: dict[str, Any], what: str,
                   partial: bool = False, steps: Sequence[int] | None = None
                   ) -> tuple[dict[str, Any], int]:
  """Restores `target`'s fields from the newest intact step (of `steps`, default all).

  A damaged step is skipped with a warning naming it; a shape that differs
  from the model is an error (the config, not the disk, is wrong).
  """
  candidates = sorted(manager.all_steps() if steps is None else steps, reverse=True)
  model = {k: target[k] for k in ('params', 'batch_stats') if k in target}
  damaged = []
  for step in candidates:
    try:
      stored = _shapes(manager, step)
      check_shapes(stored, model, f'{what} (step {step})')
      restored = _restore(manager, step, target, partial)
      _verify(restored, _recorded_checksums(manager, step))
    except DamagedCheckpoint as e:
      logging.warning('Checkpoint step %d in %s is damaged (%s); trying the previous one.', step,
                      manager.directory, e)
      damaged.append(f'step {step}: {e}')
      continue
    if damaged:
      logging.warning('Restored step %d from %s; damaged and skipped: %s', step,
                      manager.directory, '; '.join(damaged))
    return restored, step
  if not candidates:
    raise errors.CheckpointError(f'no checkpoint found in {manager.directory}')
  raise errors.CheckpointError(
      f'every checkpoint in {manager.directory} is damaged ({"; ".join(damaged)}); move them '
      'away to start again from scratch')


def restore_state(manager: ocp.CheckpointManager, state, step: int | None = None):
  """`state` from `step`, or from the newest intact step (training resume)."""
  restored, _ = restore_intact(manager, _state_dict(state), str(manager.directory),
                               steps=None if step is None else [step])
  return state.replace(**restored)


def checkpoint_location(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, step or None) for a workdir, its `checkpoints/`, or one step's folder."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise errors.CheckpointError(f'{path} does not exist')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), None
  name = os.path.basename(path.rstrip('/'))
  if name.isdigit() and os.path.isdir(os.path.join(path, STATE)):
    return os.path.dirname(path), int(name)
  return path, None


def read_only_manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                      save_interval_steps=0),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()})


def restore_variables(source: str, state, step: int | None = None):
  """Only params and batch statistics, from a workdir, its checkpoints or one step folder.

  A partial restore: the other run's optimizer may differ from this one's
  (another momentum, gradient clipping on or off), and only the model is read.
  Without a step, the newest intact one.
  """
  directory, named = checkpoint_location(source)
  manager = read_only_manager(directory)
  step = named if step is None else step
  if step is not None and step not in manager.all_steps():
    raise errors.CheckpointError(f'no checkpoint of step {step} in {directory} (steps: '
                                 f'{manager.all_steps()})')
  target = {'params': state.params, 'batch_stats': state.batch_stats}
  restored, step = restore_intact(manager, target, directory, partial=True,
                                  steps=None if step is None else [step])
  return state.replace(params=restored['params'],
                       batch_stats=restored.get('batch_stats', state.batch_stats)), step


# ------------------------------------------------------------ init_from ---

# Head modules whose output width depends on the classes / on the priors per location.
CLASS_HEADS = ('classification', 'odm_classification')
BOX_HEADS = ('regression', 'arm_regression', 'arm_classification', 'odm_regression')


def merge_for_finetuning(source: dict, target: dict, what: str) -> tuple[dict, list[str]]:
  """`target` with every array of `source` that fits; heads that do not fit stay initialised.

  A class head whose width differs (another number of classes) or a box /
  step-one head whose width differs (another prior scheme) keeps its fresh
  initialisation; a shape mismatch anywhere else is an error naming the array
  and both shapes. Returns (merged tree, report lines).
  """
  src, dst = flat_arrays(source), flat_arrays(target)
  merged, notes, errors_ = {}, [], []
  reinit = {'class heads': [], 'box heads': []}
  for path, value in dst.items():
    if path not in src:
      merged[path] = value
      notes.append(f'{path}: not in {what}, initialised')
      continue
    have, want = tuple(np.shape(src[path])), tuple(np.shape(value))
    if have == want:
      merged[path] = src[path]
      continue
    parts = path.split('/')
    module = parts[2] if len(parts) > 2 and parts[1] == 'head' else None
    if module in CLASS_HEADS:
      reinit['class heads'].append(path)
    elif module in BOX_HEADS:
      reinit['box heads'].append(path)
    else:
      errors_.append(f'{path} is {list(have)} in {what}, {list(want)} in the model')
      continue
    merged[path] = value
  if errors_:
    raise errors.CheckpointError('init_from: ' + '; '.join(errors_[:5])
                                 + (f'; and {len(errors_) - 5} more' if len(errors_) > 5 else ''))
  why = {'class heads': 'another number of classes', 'box heads': 'another prior scheme'}
  report = [f'{kind} re-initialised ({why[kind]}): ' + ', '.join(paths)
            for kind, paths in reinit.items() if paths]
  unused = sorted(set(src) - set(dst))
  if unused:
    notes.append(f'{len(unused)} arrays of {what} not in the model, unused (e.g. {unused[0]})')
  return flax.traverse_util.unflatten_dict(merged, sep='/'), report + notes


def _init_from_run(path: str, state) -> tuple[Any, str]:
  directory, step = checkpoint_location(path)
  manager = read_only_manager(directory)
  steps = [step] if step is not None else None
  if not manager.all_steps():
    raise errors.CheckpointError(f'init_from {path}: no checkpoint in {directory}')
  # The other run's own shapes: read without a target, then fit into this model.
  candidates = sorted(steps or manager.all_steps(), reverse=True)
  damaged = []
  for s in candidates:
    try:
      stored = _shapes(manager, s)
      target = {k: {p: np.zeros(shape, np.float32) for p, shape in stored.items()
                    if p.startswith(k + '/')} for k in ('params', 'batch_stats')}
      target = {k: flax.traverse_util.unflatten_dict(
          {p[len(k) + 1:]: v for p, v in t.items()}, sep='/') for k, t in target.items() if t}
      restored = _restore(manager, s, target, partial=True)
      _verify(restored, _recorded_checksums(manager, s))
    except DamagedCheckpoint as e:
      damaged.append(f'step {s}: {e}')
      logging.warning('init_from %s: step %d is damaged (%s)', path, s, e)
      continue
    where = f'{directory} step {s}'
    host = lambda tree: jax.tree.map(np.asarray, tree)
    params, report = merge_for_finetuning(
        {'params': host(restored['params'])}, {'params': host(state.params)}, where)
    new = {'params': params['params']}
    if state.batch_stats:
      stats, stats_report = merge_for_finetuning(
          {'batch_stats': host(restored.get('batch_stats', {}))},
          {'batch_stats': host(state.batch_stats)}, where)
      new['batch_stats'] = stats['batch_stats']
      report += stats_report
    shardings = jax.tree.map(lambda x: x.sharding, {'params': state.params,
                                                    'batch_stats': state.batch_stats})
    new = jax.device_put({'params': new['params'],
                          'batch_stats': new.get('batch_stats', state.batch_stats)}, shardings)
    for line in report:
      logging.info('init_from %s: %s', where, line)
    how = f'initialised from {path} step {s}'
    if report and 're-initialised' in report[0]:
      how += f'; {report[0]}'
    return state.replace(params=new['params'], batch_stats=new['batch_stats']), how
  raise errors.CheckpointError(f'init_from {path}: every checkpoint is damaged ({"; ".join(damaged)})')


def restore_or_initialize(manager: ocp.CheckpointManager, state,
                          config: ml_collections.ConfigDict) -> tuple[Any, str]:
  """The workdir's newest intact checkpoint, else `init_from`, else `state` as it is."""
  if manager.all_steps():
    state = restore_state(manager, state)
    return state, f'resumed from step {int(state.step)}'
  if config.init_from:
    path = config.init_from
    if not os.path.exists(path):
      raise errors.ConfigError(f'init_from {path} does not exist (a run\'s workdir, its '
                               'checkpoints/ or a step folder, or a .pth / .npz weight file)')
    if os.path.isdir(path):
      state, how = _init_from_run(path, state)
      return state.replace(opt_state=state.tx.init(state.params)), how
    from smallssd_jax import weights  # pylint: disable=g-import-not-at-top
    params, report = weights.load_pretrained(path, state.params, config.model,
                                             bgr_input=bool(config.data.bgr))
    params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
    logging.info('init_from %s: %s', path, report)
    return state.replace(params=params, opt_state=state.tx.init(params)), f'initialised from {path}'
  return state, 'from scratch'
