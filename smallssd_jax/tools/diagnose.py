"""Why a detector learns or not: where its prediction maps get their information,
where its gradient goes, and what each level's loss is.

  python -m smallssd_jax.tools.diagnose --config=configs/default.py:dfssd
  python -m smallssd_jax.tools.diagnose --config=configs/default.py:dfssd --workdir=runs/x

On a few training batches (train-mode BatchNorm, the training augmentation),
at initialisation or at a workdir's latest checkpoint:

* **source sensitivity**: for each backbone map, the rms change of each
  prediction map when that source alone is swapped between the images of the
  batch (image i gets image i+1's), relative to the prediction map's rms. A
  source whose swap changes a level by ~0 carries no image-specific
  information into it; the fraction of the summed changes is the source's
  share of that level.
* **gradient**: the norm of the loss gradient with respect to each backbone
  map the neck and head read, and with respect to the parameters, grouped by
  module (and their share of the squared total).
* **per-level loss**: per prediction level, the positives, the box loss per
  positive next to the box loss of predicting zero deltas, the
  classification loss per positive and the top-1 accuracy at positives (both
  steps for two-step heads).
* **scales**: every neck parameter named `scale` (L2Norm, BatchNorm) or
  `fusion_weights`, as its mean absolute value: how strongly the trained
  model weighs each fusion input.

Prints a report; `--json=PATH` also writes every number.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from smallssd_jax import anchors as anchors_lib
from smallssd_jax import boxes as box_lib
from smallssd_jax import losses
from smallssd_jax import matching
from smallssd_jax import sharding
from smallssd_jax import task as task_lib

Array = jax.Array


# ------------------------------------------------------------ the model ---


def backbone_features(module, variables, images: Array) -> dict[str, Array]:
  """The backbone's named maps, train-mode BatchNorm."""
  def run(m, x):
    return m.backbone(x, train=True)
  features, _ = module.apply(variables, images, method=run, mutable=['batch_stats'])
  return features


def from_features(module, variables, features: Mapping[str, Array]):
  """(head outputs, prediction maps) from backbone maps, train-mode BatchNorm."""
  def run(m, f):
    maps = list(m.neck(f, train=True))
    if m.head.takes_lateral_sources:
      return m.head(maps, [f[s] for s in m.sources]), maps
    return m.head(maps), maps
  (outputs, maps), _ = module.apply(variables, dict(features), method=run,
                                    mutable=['batch_stats'])
  return outputs, maps


def _rms(x: Array) -> float:
  return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))


def source_sensitivity(forward, variables, features: Mapping[str, Array]) -> dict[str, list[float]]:
  """`{source: [rms change of level l / rms of level l, ...]}` when `source` is swapped.

  `forward(variables, features)`: `from_features` of the model, compiled once by the
  caller for the original and every swapped set (op by op, each pass would cost
  about as much as compiling it).
  """
  _, maps = forward(variables, features)
  out = {}
  for name in features:
    swapped = dict(features)
    swapped[name] = jnp.roll(features[name], 1, axis=0)
    _, maps_swapped = forward(variables, swapped)
    out[name] = [_rms(b - a) / max(_rms(a), 1e-12) for a, b in zip(maps, maps_swapped)]
  return out


def feature_gradient_fn(forward, anchors: np.ndarray, loss_cfg, two_step: bool):
  """Compiled `(features, variables, batch) -> {map: norm of d(loss)/d(map)}`, for every
  backbone map the neck or head reads."""
  objective = losses.two_step_loss if two_step else losses.multibox_loss
  anchors = jnp.asarray(anchors)

  def loss_of(features, variables, batch):
    return objective(forward(variables, features)[0], anchors, batch, loss_cfg)[0]

  def norms(features, variables, batch):
    grads = jax.grad(loss_of)(dict(features), variables, dict(batch))
    return {k: jnp.linalg.norm(g.astype(jnp.float32)) for k, g in grads.items()}

  return jax.jit(norms)


def parameter_gradient_groups(grads: Any, depth: int = 2) -> dict[str, float]:
  """Gradient norms summed over parameter paths truncated to `depth` names."""
  flat = flax.traverse_util.flatten_dict(grads)
  squares: dict[str, float] = {}
  for path, g in flat.items():
    key = '/'.join(str(p) for p in path[:depth])
    squares[key] = squares.get(key, 0.0) + float(jnp.sum(jnp.square(g.astype(jnp.float32))))
  return {k: float(np.sqrt(v)) for k, v in squares.items()}


def neck_scales(params: Any) -> dict[str, float]:
  """Mean |value| of every neck parameter named `scale` or `fusion_weights`."""
  flat = flax.traverse_util.flatten_dict(params.get('neck', {}))
  return {'/'.join(path): float(np.mean(np.abs(np.asarray(v)))) for path, v in flat.items()
          if path[-1] in ('scale', 'fusion_weights')}


# ---------------------------------------------------------- level losses ---


def level_of_anchor(anchor_cfg) -> np.ndarray:
  """int32 [A]: the prediction level of every prior, in the generator's order."""
  counts = [int(np.prod(anchors_lib._pair(f))) * n for f, n in
            zip(anchor_cfg.feature_maps, anchors_lib.anchors_per_location(anchor_cfg))]
  return np.repeat(np.arange(len(counts)), counts).astype(np.int32)


def _level_table(logits: Array, deltas: Array, anchors: Array, m: matching.Match,
                 labels: Array, levels: np.ndarray, variances: Sequence[float]) -> list[dict]:
  logits = logits.astype(jnp.float32)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], -1)[..., 0]
  targets = box_lib.encode_boxes(m.matched_boxes.astype(jnp.float32), anchors, variances)
  l1 = jnp.sum(losses.smooth_l1(deltas.astype(jnp.float32) - targets), -1)
  l1_zero = jnp.sum(losses.smooth_l1(targets), -1)
  correct = jnp.argmax(logits, -1) == labels
  # The best foreground class (what a detection of this prior would be labelled).
  correct_fg = jnp.argmax(logits[..., 1:], -1) + 1 == labels
  rows = []
  for level in range(int(levels.max()) + 1):
    pos = np.asarray(m.positive) & (levels == level)[None]
    n = int(pos.sum())
    mean = lambda v: float(np.asarray(v)[pos].mean()) if n else float('nan')
    rows.append({'level': level, 'positives': n, 'box_loss': mean(l1), 'box_loss_zero': mean(l1_zero),
                 'cls_loss': mean(ce), 'accuracy': mean(correct),
                 'foreground_accuracy': mean(correct_fg)})
  return rows


def level_losses(outputs: Mapping[str, Array], anchors: np.ndarray, batch: Mapping[str, Array],
                 loss_cfg, anchor_cfg, two_step: bool) -> dict[str, list[dict]]:
  """Per-level positives, box / class loss per positive and accuracy; `{'ssd' | 'arm', 'odm': rows}`."""
  variances = tuple(loss_cfg.variances)
  levels = level_of_anchor(anchor_cfg)
  anchors = jnp.asarray(anchors, jnp.float32)
  args = (jnp.asarray(batch['boxes'], jnp.float32), jnp.asarray(batch['labels'], jnp.int32),
          jnp.asarray(batch['mask'], bool), jnp.asarray(batch['ignore'], bool),
          float(loss_cfg.iou_threshold))
  m = matching.match_batch(anchors, *args)
  if not two_step:
    return {'ssd': _level_table(outputs['cls_logits'], outputs['box_deltas'], anchors, m,
                                m.labels, levels, variances)}
  arm = _level_table(outputs['arm_logits'], outputs['arm_deltas'], anchors, m,
                     m.positive.astype(jnp.int32), levels, variances)
  refined = losses.refine_anchors(outputs['arm_deltas'], anchors, variances)
  m2 = matching.match_batch(refined, *args)
  odm = _level_table(outputs['cls_logits'], outputs['box_deltas'], refined, m2, m2.labels,
                     levels, variances)
  return {'arm': arm, 'odm': odm}


# ------------------------------------------------------------- the report ---


def diagnose(config, workdir: str = '', num_batches: int = 1) -> dict[str, Any]:
  """Every measurement above, averaged over `num_batches` training batches."""
  from smallssd_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import pixels as pixels_lib  # pylint: disable=g-import-not-at-top
  from smallssd_jax import train  # pylint: disable=g-import-not-at-top
  from smallssd_jax.datasets import pipeline  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(jax.devices()[:1])
  detector = task_lib.build_task(config)
  state = task_lib.create_train_state(detector, config, task_lib.init_rng(config.seed), mesh)
  step = 0
  if workdir:
    state, step = ckpt_lib.restore_variables(workdir, state)
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  module, anchors = detector.module, detector.anchors
  iterator = pipeline.make_train_iterator(config, 0, 1, 0)
  # Compiled once for every batch.
  forward = jax.jit(functools.partial(from_features, module))
  feature_gradients = feature_gradient_fn(forward, anchors, config.loss, detector.two_step)
  parameter_grads = jax.jit(jax.grad(
      lambda p, stats, b: train.loss_fn(detector, config.loss, p, stats, b)[0]))
  runs = []
  for _ in range(num_batches):
    batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
    images = pixels_lib.model_input(batch, detector.inputs, train=True)
    features = backbone_features(module, variables, images)
    outputs, _ = forward(variables, features)
    grads = parameter_grads(state.params, state.batch_stats, batch)
    runs.append({
        'sensitivity': source_sensitivity(forward, variables, features),
        'feature_gradients': {k: float(v) for k, v in
                              feature_gradients(features, variables, batch).items()},
        'parameter_gradients': parameter_gradient_groups(grads),
        'levels': level_losses(outputs, anchors, batch, config.loss, config.anchors,
                               detector.two_step),
    })
  return {'step': int(step), 'model': config.model.name, 'batch_size': int(config.batch_size),
          'num_batches': num_batches, 'scales': neck_scales(state.params), **_average(runs)}


def _average(runs: list[dict]) -> dict:
  """Mean over batches of every number in the nested structure (positives summed)."""
  first = runs[0]
  if isinstance(first, dict):
    return {k: (sum(r[k] for r in runs) if k == 'positives' else _average([r[k] for r in runs]))
            for k in first}
  if isinstance(first, list):
    return [_average([r[i] for r in runs]) for i in range(len(first))]
  if isinstance(first, (int, float)):
    return float(np.nanmean([r for r in runs])) if len(runs) > 1 else first
  return first


def format_report(report: Mapping[str, Any]) -> str:
  lines = [f"{report['model']} at step {report['step']}, {report['num_batches']} batch(es) of "
           f"{report['batch_size']}", '', 'Source sensitivity (rms change of each prediction level '
           'when the source is swapped between images, / the level\'s rms):']
  # Maps the neck and head do not read (a swap changes nothing) are left out.
  sens = {k: v for k, v in report['sensitivity'].items() if max(v) > 0}
  num_levels = max(len(v) for v in sens.values()) if sens else 0
  lines.append('  source       ' + ''.join(f'  level{l:<3d}' for l in range(num_levels)))
  for name, values in sens.items():
    lines.append(f'  {name:<12s} ' + ''.join(f'  {v:8.3f}' for v in values))
  totals = [sum(v[l] for v in sens.values()) for l in range(num_levels)]
  lines.append('  share of level 0: ' + ', '.join(
      f'{name} {100 * v[0] / max(totals[0], 1e-12):.1f}%' for name, v in sens.items() if v[0] > 0))
  lines += ['', 'Gradient norm w.r.t. backbone maps:']
  lines += [f'  {k:<12s} {v:10.4g}' for k, v in report['feature_gradients'].items() if v > 0]
  groups = report['parameter_gradients']
  total = sum(v * v for v in groups.values())
  lines += ['', f'Parameter gradient norm {np.sqrt(total):.4g}, by module (share of the squared norm):']
  for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
    lines.append(f'  {k:<40s} {v:10.4g}  {100 * v * v / max(total, 1e-30):5.1f}%')
  for part, rows in report['levels'].items():
    lines += ['', f'Per-level loss ({part}): positives, box loss / positive (zero deltas), '
              'class loss / positive, accuracy at positives (of the best foreground class)']
    for r in rows:
      lines.append(f"  level {int(r['level'])}: {r['positives']:6d}  {r['box_loss']:7.3f} "
                   f"({r['box_loss_zero']:6.3f})  {r['cls_loss']:7.3f}  {r['accuracy']:6.3f} "
                   f"({r['foreground_accuracy']:5.3f})")
  if report['scales']:
    lines += ['', 'Neck scales (mean |value|):']
    lines += [f'  {k:<50s} {v:8.4f}' for k, v in report['scales'].items()]
  return '\n'.join(lines)


def define_flags() -> None:
  """The command's flags (defined on demand: the module imports next to other tools)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).')
  flags.DEFINE_string('workdir', '', "Diagnose this run's latest checkpoint (default: the "
                      'initialisation).')
  flags.DEFINE_integer('batches', 2, 'Training batches to average over.')
  flags.DEFINE_string('json', '', 'Also write the numbers here.')


def main(argv):
  del argv
  from smallssd_jax import _xla  # pylint: disable=g-import-not-at-top
  _xla.apply_cpu_xla_defaults()
  f = flags.FLAGS
  report = diagnose(f.config, f.workdir, f.batches)
  print(format_report(report))
  if f.json:
    with open(f.json, 'w') as out:
      json.dump(report, out, indent=1)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)
