"""Training: mesh -> data -> model -> state -> step -> checkpoint -> loop -> eval.

`train_and_evaluate(config, workdir)` is the whole job. The train step is one
pure module-level function, jitted with explicit shardings over a `Mesh` whose
single `data` axis spans every device of every process: the batch is sharded
on it and parameters are replicated, so BatchNorm statistics (a mean over the
batch axis of a global array) are averaged across all devices by XLA itself.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
import flax
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from smallssd_jax import anchors as anchors_lib
from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import losses
from smallssd_jax import models
from smallssd_jax import pixels as pixels_lib
from smallssd_jax import writers
from smallssd_jax.datasets import pipeline

PyTree = Any
DATA_AXIS = 'data'


# ------------------------------------------------------------------ mesh ---


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis `data`."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(devices.reshape(-1), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Each process contributes its own rows; the result is one global array per field."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ----------------------------------------------------------------- model ---


@struct.dataclass
class Detector:
  """What the step functions need to know about the model, all static."""
  module: Any = struct.field(pytree_node=False)
  anchors: np.ndarray = struct.field(pytree_node=False)
  two_step: bool = struct.field(pytree_node=False)
  # Normalisation of uint8 input batches (data.pixels_on_device; pixels.py).
  pixels: pixels_lib.PixelConfig = struct.field(pytree_node=False)


def build(config: ml_collections.ConfigDict) -> Detector:
  """Model module + priors, checking that the heads predict one output per prior."""
  priors = anchors_lib.from_config(config.anchors)
  module = models.build_detector(config.model, anchors_lib.anchors_per_location(config.anchors))
  models.check_anchor_count(module, config.model, priors.shape[0])
  return Detector(module=module, anchors=priors, two_step=config.model.head == 'two_step',
                  pixels=pixels_lib.PixelConfig.from_data_config(
                      config.data, int(config.model.input_size)))


# ----------------------------------------------------------------- state ---


@struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  # The step at which the loss first went non-finite, or -1. Once set, the
  # step function stops applying updates, so the state stays the last good
  # one and the host can stop without a per-step device sync.
  bad_step: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """Piecewise constant (the papers' steps), after an optional linear warm-up."""
  decay = optim.decay
  factors = optim.get('factors') or [decay ** (i + 1) for i in range(len(optim.boundaries))]
  values = [optim.lr] + [optim.lr * f for f in factors]
  piecewise = optax.piecewise_constant_schedule(
      optim.lr, {int(b): v / values[i] for i, (b, v) in enumerate(zip(optim.boundaries, values[1:]))})
  if not optim.warmup_steps:
    return piecewise
  warmup = optax.linear_schedule(optim.lr * 0.1, optim.lr, optim.warmup_steps)
  return optax.join_schedules([warmup, lambda s: piecewise(s + optim.warmup_steps)],
                              [optim.warmup_steps])


def weight_decay_mask(params: PyTree) -> PyTree:
  """Decay convolution and dense kernels only: no biases, BN scales, L2Norm scales, fusion weights."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`sgd` (the papers') or `adamw` (handy for short from-scratch runs), decay on kernels only."""
  parts = []
  if optim.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  schedule = learning_rate_schedule(optim)
  if optim.name == 'sgd':
    # Caffe / the papers: the decay term is added to the gradient before
    # momentum, which is optax's add_decayed_weights followed by sgd.
    parts.append(optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask))
    parts.append(optax.sgd(schedule, momentum=optim.momentum))
  elif optim.name == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay, mask=weight_decay_mask))
  else:
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {optim.name!r}")
  return optax.chain(*parts)


def init_variables(detector: Detector, config: ml_collections.ConfigDict, rng: jax.Array) -> PyTree:
  size = config.model.input_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  return detector.module.init(rng, images, train=False)


def init_rng(seed: int) -> jax.Array:
  """The key that initialises the parameters (and only that).

  XLA's RngBitGenerator ('rbg') rather than JAX's default threefry: threefry's
  hash is inlined once per parameter tensor, and XLA's CPU compiler then takes
  over a minute to compile the init of even a tiny detector; 'rbg' compiles in
  seconds. Deterministic for a seed on a given backend (not bit-equal across
  CPU / GPU / TPU, which a random init does not need).
  """
  return jax.random.key(seed, impl='rbg')


def _state_initializer(detector: Detector, config: ml_collections.ConfigDict) -> Callable:
  tx = make_optimizer(config.optim)

  def init(rng):
    variables = init_variables(detector, config, rng)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32), tx=tx)

  return init


def create_train_state(detector: Detector, config: ml_collections.ConfigDict, rng: jax.Array,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """Shapes first (`eval_shape`), then one jit that writes replicated arrays."""
  init = _state_initializer(detector, config)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(rng)


def abstract_train_state(detector: Detector, config: ml_collections.ConfigDict,
                         mesh: jax.sharding.Mesh) -> TrainState:
  """The state's shapes, dtypes and (replicated) shardings, computing nothing.

  A restore target for evaluation and detection, which would otherwise compile
  and run a random initialisation only to overwrite it.
  """
  abstract = jax.eval_shape(_state_initializer(detector, config), init_rng(config.seed))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                      abstract)


# ------------------------------------------------------------------ step ---


def loss_fn(detector: Detector, loss_cfg, params, batch_stats, batch, train: bool = True):
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  images = pixels_lib.model_input(batch, detector.pixels)
  if train and batch_stats:
    outputs, updates = detector.module.apply(variables, images, train=True,
                                             mutable=['batch_stats'])
    new_stats = updates['batch_stats']
  else:
    outputs = detector.module.apply(variables, images, train=train)
    new_stats = batch_stats
  objective = losses.two_step_loss if detector.two_step else losses.multibox_loss
  loss, metrics = objective(outputs, jnp.asarray(detector.anchors), batch, loss_cfg)
  return loss, (metrics, new_stats)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               detector: Detector, loss_cfg, schedule: optax.Schedule) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; pure (jit it with shardings and donation)."""
  del rng  # The detectors are deterministic; augmentation runs in the input pipeline.
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, detector, loss_cfg), has_aux=True)
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
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step))
  return new_state, metrics


def jit_train_step(detector: Detector, config, mesh, state: TrainState) -> Callable:
  state_shardings = jax.tree.map(lambda _: replicated(mesh), state)
  step = functools.partial(train_step, detector=detector, loss_cfg=config.loss,
                           schedule=learning_rate_schedule(config.optim))
  return jax.jit(step,
                 in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=(0,))


# ------------------------------------------------------------- stopping ---


class NonFiniteLossError(RuntimeError):
  pass


class _StopRequest:
  """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint and exits cleanly."""

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains, checkpointing and evaluating periodically; returns the last eval results."""
  from smallssd_jax import evaluation as eval_lib  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # Mesh.
  mesh = make_mesh()
  if config.batch_size % mesh.size:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the '
                     f'{mesh.size} devices of the mesh')
  if config.batch_size % jax.process_count():
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the '
                     f'{jax.process_count()} processes')

  # Model and state.
  detector = build(config)
  state = create_train_state(detector, config, init_rng(config.seed), mesh)
  step_fn = jit_train_step(detector, config, mesh, state)

  # Checkpoint: the workdir's latest, else config.init_from, else scratch.
  manager = ckpt_lib.make_manager(workdir, config)
  state, resumed = ckpt_lib.restore_or_initialize(manager, state, config, detector)
  start_step = int(state.step)
  if is_main:
    logging.info('Starting at step %d (%s).', start_step, resumed)

  # Data: the batches of steps start_step, start_step + 1, ... (this process's slice).
  train_iter = pipeline.make_train_iterator(config, jax.process_index(), jax.process_count(),
                                            start_step)

  writer = writers.MetricWriter(workdir, enabled=is_main)
  eval_results: dict[str, float] = {}
  evaluator = eval_lib.Evaluator(config, detector, mesh)

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
      raise NonFiniteLossError(
          f'non-finite loss or gradient at step {bad + 1}; the run stopped there and the last '
          f'good checkpoint in {workdir} was left as it was (lower optim.lr, set '
          f'optim.warmup_steps or optim.grad_clip_norm)')

  with _StopRequest() as stop:
    step = start_step
    while step < config.num_train_steps:
      batch = to_global_batch(next(train_iter), mesh)
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
        progress.postfix(loss=summary['loss'], img_s=summary['images_per_sec'])
        pending, t_last, n_last = [], time.perf_counter(), 0

      eval_now = (config.eval_every_steps and step % config.eval_every_steps == 0) or last
      if eval_now:
        check_finite()
        eval_results = evaluator.run(state, step=step, workdir=workdir, writer=writer)
        t_last = time.perf_counter()
      if step % config.checkpoint_every_steps == 0 or last or eval_now or stop.requested:
        check_finite()
        ckpt_lib.save(manager, step, state, eval_results if eval_now else None)
      if stop.requested:
        logging.warning('Stopped at step %d on request; resume with the same command.', step)
        break

  manager.wait_until_finished()
  progress.close()
  writer.close()
  return eval_results


def dump_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
