"""The optimiser and its learning-rate schedule, from `config.optim` (docs/design.md §3, §9).

Schedule positions (`optim.boundaries`, `optim.warmup_steps`) are step
numbers, or fractions of `num_train_steps` when written as floats below 1
(`[0.7, 0.9]`): those follow a changed `num_train_steps`, so a command-line
override of the run's length cannot leave a schedule made for another length.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax
import ml_collections
import optax

PyTree = Any


def schedule_step(value: float | int, total_steps: int, field: str) -> int:
  """A step number, or a fraction (a float in (0, 1)) of `total_steps`, as a step."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'{field} must be a step number or a fraction of num_train_steps, '
                     f'got {value!r}')
  if isinstance(value, float) and 0.0 < value < 1.0:
    return int(value * total_steps + 1e-6)     # floor (0.7 of 200 is 140), float error aside
  if value < 0 or value != int(value):
    raise ValueError(f'{field} must be a step number >= 0 or a fraction in (0, 1), got {value!r}')
  return int(value)


def boundaries(optim: ml_collections.ConfigDict, total_steps: int) -> list[int]:
  """`optim.boundaries` as increasing step numbers (a warning for any past the run)."""
  steps = [schedule_step(b, total_steps, 'optim.boundaries') for b in optim.boundaries]
  if steps != sorted(steps):
    raise ValueError(f'optim.boundaries must increase, got {list(optim.boundaries)} '
                     f'(steps {steps})')
  late = [s for s in steps if s >= total_steps]
  if late:
    logging.warning('optim.boundaries %s: step %d is at or past num_train_steps=%d, so the '
                    'learning rate does not decay there in this run (fractions of the run, '
                    'e.g. [0.7, 0.9], follow its length)', list(optim.boundaries), late[0],
                    total_steps)
  return steps


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Piecewise constant (the papers' steps, each multiplying by `decay`), after an
  optional linear warm-up from lr / 10."""
  # Each boundary multiplies the rate by `decay` (boundaries at the same step count once).
  piecewise = optax.piecewise_constant_schedule(
      optim.lr, {b: optim.decay for b in boundaries(optim, total_steps)})
  warmup_steps = schedule_step(optim.warmup_steps, total_steps, 'optim.warmup_steps')
  if not warmup_steps:
    return piecewise
  warmup = optax.linear_schedule(optim.lr * 0.1, optim.lr, warmup_steps)
  return optax.join_schedules([warmup, lambda s: piecewise(s + warmup_steps)], [warmup_steps])


def weight_decay_mask(params: PyTree) -> PyTree:
  """Decay convolution and dense kernels only: no biases, BN scales, L2Norm scales, fusion weights."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """`sgd` (the papers') or `adamw`, weight decay on kernels only, optional global clip."""
  parts = []
  if optim.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  schedule = learning_rate_schedule(optim, total_steps)
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
