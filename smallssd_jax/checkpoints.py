"""Orbax checkpoints: model, optimizer and step.

The data iterator needs no state of its own: its batches are a function of
the config and the global step (`datasets.pipeline`), so a resumed run
rebuilds it at the restored step, with any number of processes or workers.

Resume order (STYLE 8): the workdir's latest checkpoint, else
`config.init_from` (another run's checkpoint directory, or a VGG16 / SSD300
weight file converted on the fly), else the random initialisation.
The manager keeps the last `keep_checkpoints` steps plus the best one by
validation mAP.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'bad_step')


def make_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  best_metric = lambda metrics: metrics['mAP']
  # BestN sorts ascending and keeps the last n: reverse=False keeps the highest mAP.
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=config.keep_checkpoints),
      checkpoint_managers.BestN(get_metric_fn=best_metric, reverse=False, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  # best_fn is what makes orbax write each step's metrics to disk; without it
  # they live in memory only, and a resumed run would delete the best checkpoint
  # of the runs before it. Deletion itself follows `policy` alone.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=best_metric,
                                         best_mode='max', create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler()})


def _state_dict(state) -> dict[str, Any]:
  return {k: getattr(state, k) for k in STATE_FIELDS}


def save(manager: ocp.CheckpointManager, step: int, state,
         eval_results: dict[str, float] | None = None) -> None:
  metrics = None
  if eval_results and 'mAP' in eval_results:
    metrics = {'mAP': float(eval_results['mAP'])}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state))),
               metrics=metrics, force=True)


def restore_state(manager: ocp.CheckpointManager, state, step: int | None = None):
  """Restores `state` from `step` or the latest."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_dict(state))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return state.replace(**restored['state'])


def restore_variables(directory: str, state, step: int | None = None):
  """Only params and batch statistics from another run (`init_from`, eval).

  A partial restore: the other run's optimizer may differ from this one's
  (another momentum, gradient clipping on or off), and only the model is read.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  manager = ocp.CheckpointManager(directory, item_handlers={'state': ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  if step is None:
    step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint found in {directory}')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {'params': state.params, 'batch_stats': state.batch_stats})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)))
  return state.replace(params=restored['state']['params'],
                       batch_stats=restored['state'].get('batch_stats', state.batch_stats)), step


def restore_or_initialize(manager: ocp.CheckpointManager, state,
                          config: ml_collections.ConfigDict, detector) -> tuple[Any, str]:
  latest = manager.latest_step()
  if latest is not None:
    return restore_state(manager, state, latest), f'resumed from step {latest}'
  if config.init_from:
    path = config.init_from
    if os.path.isdir(path):
      state, step = restore_variables(path, state)
      return state.replace(opt_state=state.tx.init(state.params)), f'initialised from {path} step {step}'
    from smallssd_jax import weights  # pylint: disable=g-import-not-at-top
    params, report = weights.load_pretrained(path, state.params, config.model)
    params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
    logging.info('init_from %s: %s', path, report)
    return state.replace(params=params, opt_state=state.tx.init(params)), f'initialised from {path}'
  return state, 'from scratch'
