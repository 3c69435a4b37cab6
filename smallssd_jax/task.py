"""What training, evaluation, detection and export share about a detector.

`Task` is everything static the jitted functions need: the Flax module, its
priors, whether the head is two-step, and how uint8 batches become the
model's input. `TrainState` is everything that changes. `predict` is the
whole inference path (input -> network -> decode -> per-class NMS) that the
evaluator, detect mode, the predictor and the exported models all run.

Nothing here imports the trainer or the evaluator; both import this.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from smallssd_jax import anchors as anchors_lib
from smallssd_jax import batch_layout
from smallssd_jax import models
from smallssd_jax import optim as optim_lib
from smallssd_jax import pixels as pixels_lib
from smallssd_jax import postprocess
from smallssd_jax import sharding

PyTree = Any


@struct.dataclass
class Task:
  """The static description of a detector, built once per config."""
  module: models.Detector = struct.field(pytree_node=False)
  anchors: np.ndarray = struct.field(pytree_node=False)      # [A, 4] cy, cx, h, w
  two_step: bool = struct.field(pytree_node=False)
  # The batch layouts, and how the step turns their images into model input.
  inputs: batch_layout.InputSpec = struct.field(pytree_node=False)


def build_task(config: ml_collections.ConfigDict, backend: str | None = None) -> Task:
  """Model module + priors, checking that the heads predict one output per prior.

  `backend`: the platform the layers are built for (models.layer_kinds; default
  JAX's default backend); every choice has the same variables.
  """
  priors = anchors_lib.from_config(config.anchors)
  module = models.build_detector(config.model, anchors_lib.anchors_per_location(config.anchors),
                                 backend=backend)
  models.check_anchor_count(module, config.model, priors.shape[0])
  return Task(module=module, anchors=priors, two_step=config.model.head == 'two_step',
              inputs=batch_layout.InputSpec.from_config(config.data,
                                                        int(config.model.input_size)))


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


def variables_of(state: TrainState) -> dict[str, Any]:
  """The Flax variables (`params`, and `batch_stats` when the model has BatchNorm)."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def init_variables(task: Task, config: ml_collections.ConfigDict, rng: jax.Array) -> PyTree:
  size = config.model.input_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  return task.module.init(rng, images, train=False)


def init_rng(seed: int) -> jax.Array:
  """The key that initialises the parameters (and only that).

  XLA's RngBitGenerator ('rbg') rather than JAX's default threefry: threefry's
  hash is inlined once per parameter tensor, and XLA's CPU compiler then takes
  over a minute to compile the init of even a tiny detector; 'rbg' compiles in
  seconds. Deterministic for a seed on a given backend (not bit-equal across
  CPU / GPU / TPU, which a random init does not need).
  """
  return jax.random.key(seed, impl='rbg')


def _state_initializer(task: Task, config: ml_collections.ConfigDict) -> Callable:
  tx = optim_lib.make_optimizer(config.optim, config.num_train_steps)

  def init(rng):
    variables = init_variables(task, config, rng)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32), tx=tx)

  return init


def create_train_state(task: Task, config: ml_collections.ConfigDict, rng: jax.Array,
                       mesh: jax.sharding.Mesh) -> TrainState:
  """Shapes first (`eval_shape`), then one jit that writes replicated arrays."""
  init = _state_initializer(task, config)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(rng)


def abstract_train_state(task: Task, config: ml_collections.ConfigDict,
                         mesh: jax.sharding.Mesh) -> TrainState:
  """The state's shapes, dtypes and (replicated) shardings, computing nothing.

  A restore target for evaluation and detection, which would otherwise compile
  and run a random initialisation only to overwrite it.
  """
  abstract = jax.eval_shape(_state_initializer(task, config), init_rng(config.seed))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
      abstract)


# --------------------------------------------------------------- predict ---


def predict(variables: PyTree, images: jax.Array, *, task: Task, post_cfg,
            variances) -> dict[str, jax.Array]:
  """Forward + decode + per-class NMS for a batch.

  Args:
    variables: the model's Flax variables.
    images: an evaluation batch's `image` field (`task.inputs.eval_layout`):
      uint8 RGB `[B, S, S, 3]`, normalised here, or the host's float input.

  Returns:
    `boxes [B, K, 4]` `[ymin, xmin, ymax, xmax]` normalised to the model
    input, `scores [B, K]`, `labels [B, K]` (1..C-1), `valid [B, K]`.
  """
  images = pixels_lib.model_input({'image': images}, task.inputs, train=False)
  outputs = task.module.apply(variables, images, train=False)
  return postprocess.detect(outputs, task.anchors, post_cfg, variances=tuple(variances),
                            two_step=task.two_step)


def make_predict_fn(task: Task, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> Callable:
  """`predict` jitted over the mesh: `fn(variables, images)` with the batch sharded."""
  fn = functools.partial(predict, task=task, post_cfg=config.post,
                         variances=config.loss.variances)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
