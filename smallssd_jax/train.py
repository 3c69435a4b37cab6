"""Training: mesh -> data -> model -> state -> step -> checkpoint -> loop -> eval.

`train_and_evaluate(config, workdir)` is the whole job. The train step is one
pure module-level function, jitted with explicit shardings over a `Mesh` whose
single `data` axis spans every device of every process: the batch is sharded
on it and parameters are replicated, so BatchNorm statistics (a mean over the
batch axis of a global array) are averaged across all devices by XLA itself.
Checkpoints are written before any evaluation of the same step, so a failing
evaluation never costs the trained model.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import errors
from smallssd_jax import evaluation
from smallssd_jax import losses
from smallssd_jax import optim as optim_lib
from smallssd_jax import pixels as pixels_lib
from smallssd_jax import sharding
from smallssd_jax import task as task_lib
from smallssd_jax import writers
from smallssd_jax.datasets import pipeline

TrainState = task_lib.TrainState


# ------------------------------------------------------------------ step ---


def loss_fn(task: task_lib.Task, loss_cfg, params, batch_stats, batch, train: bool = True,
            train_batch: bool = True):
  """(loss, (metrics, new batch statistics)) of one batch.

  `train`: BatchNorm on batch statistics (updating the running ones);
  `train_batch`: the batch has the train layout (batch_layout.py).
  """
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  images = pixels_lib.model_input(batch, task.inputs, train=train_batch)
  if train and batch_stats:
    outputs, updates = task.module.apply(variables, images, train=True, mutable=['batch_stats'])
    new_stats = updates['batch_stats']
  else:
    outputs = task.module.apply(variables, images, train=train)
    new_stats = batch_stats
  objective = losses.two_step_loss if task.two_step else losses.multibox_loss
  loss, metrics = objective(outputs, jnp.asarray(task.anchors), batch, loss_cfg)
  return loss, (metrics, new_stats)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               task: task_lib.Task, loss_cfg, schedule: optax.Schedule
               ) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; pure (jit it with shardings and donation)."""
  del rng  # The detectors are deterministic; augmentation runs in the input pipeline.
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, task, loss_cfg), has_aux=True)
  (loss, (metrics, new_stats)), grads = grad_fn(state.params, state.batch_stats, batch)
  grad_norm = optax.tree.norm(grads)
  updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.bad_step < 0)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_state = state.replace(
      step=jnp.where(ok, state.step + 1, state.step),
      params=keep(new_params, state.params),
      batch_stats=keep(new_stats, state.batch_stats),
      opt_state=keep(new_opt_state, state.opt_state),
      bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
  )
  # Boxes the readers clipped or dropped, and the augmentation cropped out, in this batch.
  repairs = jnp.sum(batch['box_repairs'], axis=0)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                 boxes_clipped=repairs[0], boxes_dropped=repairs[1], boxes_cropped=repairs[2])
  return new_state, metrics


def jit_train_step(task: task_lib.Task, config, mesh, state: TrainState) -> Callable:
  replicated = sharding.replicated(mesh)
  state_shardings = jax.tree.map(lambda _: replicated, state)
  step = functools.partial(
      train_step, task=task, loss_cfg=config.loss,
      schedule=optim_lib.learning_rate_schedule(config.optim, config.num_train_steps))
  return jax.jit(step,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))


# ------------------------------------------------------------- stopping ---


NonFiniteLossError = errors.NonFiniteLossError


class _StopRequest:
  """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint and stops."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # a second Ctrl-C / SIGTERM: stop now, without the checkpoint
      raise KeyboardInterrupt
    logging.warning('Signal %d received: saving a checkpoint and stopping '
                    '(send it again to stop at once).', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ------------------------------------------------------------------ loop ---


def eval_dir(workdir: str, step: int) -> str:
  """Where the training run records its own evaluation of `step`."""
  return os.path.join(workdir, 'eval', f'step_{step}')


def recorded_results(workdir: str, step: int) -> dict[str, float] | None:
  path = pathlib.Path(eval_dir(workdir, step), 'results.json')
  if not path.exists():
    return None
  return {k: (float('nan') if v is None else v)
          for k, v in json.loads(path.read_text())['results'].items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains, checkpointing then evaluating periodically; returns the last eval results.

  Raises:
    errors.StoppedOnRequest: after SIGTERM / Ctrl-C, once the checkpoint is saved.
    errors.NonFiniteLossError: the loss went non-finite (the last good checkpoint stays).
    errors.EvaluationFailed: training finished and is saved, but an evaluation failed.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # Mesh.
  mesh = sharding.make_mesh()

  # Model and state.
  task = task_lib.build_task(config)
  state = task_lib.create_train_state(task, config, task_lib.init_rng(config.seed), mesh)
  step_fn = jit_train_step(task, config, mesh, state)

  # Checkpoint: the workdir's latest intact one, else config.init_from, else scratch.
  manager = ckpt_lib.make_manager(workdir, config)
  state, resumed = ckpt_lib.restore_or_initialize(manager, state, config)
  start_step = int(state.step)
  if is_main:
    logging.info('Starting at step %d (%s).', start_step, resumed)

  writer = writers.MetricWriter(workdir, enabled=is_main)
  evaluator = evaluation.Evaluator(config, task_lib.make_predict_fn(task, config, mesh), mesh)
  failures: list[str] = []

  def evaluate(step: int) -> dict[str, float]:
    try:
      return evaluator.run(task_lib.variables_of(state), step=step,
                           out_dir=eval_dir(workdir, step), writer=writer)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('Evaluation at step %d failed; the checkpoint of step %d is saved in '
                        '%s', step, step, workdir)
      failures.append(f'step {step}: {type(e).__name__}: {e}')
      return {}

  if start_step >= config.num_train_steps:
    # Nothing to train: report the run's final evaluation (made now if it is missing).
    results = recorded_results(workdir, start_step)
    print(f'{workdir} is at step {start_step}, num_train_steps={config.num_train_steps}: '
          f'nothing to train' + ('' if results is None else ' (final evaluation on record)'),
          flush=True)
    if results is None:
      results = evaluate(start_step)
    writer.close()
    if failures:
      raise errors.EvaluationFailed('; '.join(failures))
    return results

  # Data: the batches of steps start_step, start_step + 1, ... (this process's slice).
  train_iter = pipeline.make_train_iterator(config, jax.process_index(), jax.process_count(),
                                            start_step, task.inputs)

  eval_results: dict[str, float] = {}
  local_batch = config.batch_size // jax.process_count()
  step_rng = jax.random.key(config.seed + 1)
  progress = writers.Progress(config.num_train_steps, start_step, enabled=is_main)
  pending: list[dict] = []
  t_last, n_last = time.perf_counter(), 0

  def check_finite():
    bad = int(state.bad_step)
    if bad >= 0:
      # state.bad_step counts the updates done before the bad one; the log rows
      # and checkpoints count the updates done, so the bad step is bad + 1.
      kept = manager.latest_step()
      where = (f'the last good checkpoint (step {kept}) in {workdir} was left as it was'
               if kept is not None else f'no checkpoint had been written in {workdir} yet')
      raise errors.NonFiniteLossError(
          f'non-finite loss or gradient at step {bad + 1}; the run stopped there and {where} '
          '(lower optim.lr, set optim.warmup_steps or optim.grad_clip_norm)')

  with _StopRequest() as stop:
    step = start_step
    while step < config.num_train_steps:
      batch = sharding.to_global_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
      step += 1
      n_last += local_batch
      pending.append(metrics)
      progress.update(step)

      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last:
        check_finite()
        summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
        elapsed = time.perf_counter() - t_last
        summary['images_per_sec'] = n_last * jax.process_count() / max(elapsed, 1e-9)
        writer.write(step, summary)
        progress.log(step, summary)
        pending, t_last, n_last = [], time.perf_counter(), 0

      eval_now = bool(config.eval_every_steps and step % config.eval_every_steps == 0) or last
      if step % config.checkpoint_every_steps == 0 or eval_now or stop.requested:
        check_finite()
        ckpt_lib.save(manager, step, state)     # before the evaluation that may fail
      if eval_now and not stop.requested:
        eval_results = evaluate(step)
        t_last = time.perf_counter()
      if stop.requested:
        break

  manager.wait_until_finished()
  progress.close()
  writer.close()
  if stop.requested:
    raise errors.StoppedOnRequest(
        f'stopped at step {step} of {config.num_train_steps} on request; the checkpoint is '
        f'saved in {workdir}: run the same command to resume (or to evaluate a finished run)')
  if failures:
    raise errors.EvaluationFailed(
        f'training finished at step {step} and the checkpoint is saved in {workdir}, but '
        f'evaluation failed ({"; ".join(failures)}); fix the cause and run --mode=eval')
  return eval_results


def dump_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The training run's config, `config.json`, and its data's class names,
  `classes.json` (what a deployed model names its classes by), in the workdir."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
    with open(os.path.join(workdir, 'classes.json'), 'w') as f:
      json.dump(list(pipeline.class_names(config.data)), f, indent=1)
