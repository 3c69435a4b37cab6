"""From a checkpoint to detections: the model restored for inference."""

from __future__ import annotations

import ml_collections

from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import sharding
from smallssd_jax import task as task_lib


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str):
  """(task, state, step, mesh): the model of `config.eval.checkpoint`, else the workdir's latest.

  Only parameters and BatchNorm statistics are restored, into an abstract
  state (nothing is initialised only to be overwritten).
  """
  mesh = sharding.make_mesh()
  task = task_lib.build_task(config)
  state = task_lib.abstract_train_state(task, config, mesh)
  source = config.eval.checkpoint or workdir
  state, step = ckpt_lib.restore_variables(source, state)
  return task, state, step, mesh
