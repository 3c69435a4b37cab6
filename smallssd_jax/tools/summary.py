r"""Prints a detector's feature maps, priors, parameter count and GFLOPs per image.

  python -m smallssd_jax.tools.summary --config=configs/dfssd300_voc0712.py [--config.model.width=0.5]
  python -m smallssd_jax.tools.summary --preset=skipfpn320 [--noflops]

Shapes and parameter counts come from `jax.eval_shape` (nothing is
computed); GFLOPs from XLA's cost analysis of the compiled single-image
forward pass (one multiply-add counts as two FLOPs), which compiles the full
model once on the default device.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from smallssd_jax import _xla
from smallssd_jax import anchors as anchors_lib
from smallssd_jax import models
from smallssd_jax import config_blocks

PRESETS = {
    'ssd300': lambda: config_blocks.ssd_model(300),
    'ssd512': lambda: config_blocks.ssd_model(512),
    'dfssd300': lambda: config_blocks.dfssd_model(300),
    'dfssd512': lambda: config_blocks.dfssd_model(512),
    'skipfpn320': lambda: config_blocks.skipfpn_model(320),
    'skipfpn512': lambda: config_blocks.skipfpn_model(512),
}



def define_flags() -> None:
  """The command line's flags; defined on demand so importing `summarize` defines none."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:arg]).')
  flags.DEFINE_enum('preset', None, sorted(PRESETS), 'A paper model preset, instead of --config.')
  flags.DEFINE_bool('flops', True, 'Compile the forward pass for an XLA FLOP count.')


def forward_flops(module: models.Detector, variables) -> float:
  """FLOPs of one `[1, S, S, 3]` forward pass, from XLA's cost analysis."""
  images = jax.ShapeDtypeStruct((1, module.input_size, module.input_size, 3), jnp.float32)
  forward = jax.jit(lambda v, x: module.apply(v, x, train=False))
  compiled = forward.lower(variables, images).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def summarize(config: ml_collections.ConfigDict, flops: bool = True) -> str:
  """The summary table of `config.model` with the priors of `config.anchors`."""
  model_cfg, anchor_cfg = config.model, config.anchors
  per_location = anchors_lib.anchors_per_location(anchor_cfg)
  module = models.build_detector(model_cfg, per_location)
  shapes = models.feature_map_shapes(module)
  variables = models.abstract_variables(module)
  priors = anchors_lib.from_config(anchor_cfg, model_cfg.input_size)
  predictions = models.output_shapes(module)['cls_logits'].shape[1]

  names = list(model_cfg.sources)
  lines = [f'{model_cfg.get("name", "model")}: backbone {model_cfg.backbone}, neck '
           f'{model_cfg.get("neck", "none")}, head {model_cfg.head}, input '
           f'{model_cfg.input_size}, {model_cfg.num_classes} classes, width {model_cfg.width}, '
           f'{model_cfg.get("dtype", "float32")}',
           f'{"level":>5}  {"source":<10} {"H x W x C":>16} {"priors/loc":>10} {"priors":>8}']
  total = 0
  for level, (shape, per) in enumerate(zip(shapes['pyramid'], per_location)):
    h, w, c = shape
    total += h * w * per
    source = names[level] if level < len(names) else '?'
    lines.append(f'{level:>5}  {source:<10} {f"{h} x {w} x {c}":>16} {per:>10} {h * w * per:>8}')
  if shapes['lateral']:
    lateral = ', '.join(f'{h}x{w}x{c}' for h, w, c in shapes['lateral'])
    lines.append(f'two-step head: ARM on the lateral sources {lateral}')
  lines.append(f'priors: {priors.shape[0]} from the prior generator, {total} from the feature '
               f'maps, {predictions} model predictions'
               + ('' if priors.shape[0] == total == predictions else '   <-- MISMATCH'))
  params = models.count_params(variables['params'])
  stats = models.count_params(variables.get('batch_stats', {}))
  lines.append(f'parameters: {params:,}' + (f' (+ {stats:,} batch statistics)' if stats else ''))
  if flops:
    lines.append(f'GFLOPs per image: {forward_flops(module, variables) / 1e9:.2f} '
                 '(XLA cost analysis, multiply-add = 2)')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  config, preset = flags.FLAGS.config, flags.FLAGS.preset
  if (config is None) == (preset is None):
    raise app.UsageError('give exactly one of --config and --preset')
  print(summarize(config if config is not None else PRESETS[preset](), flops=flags.FLAGS.flops))


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()     # before any JAX backend starts
  define_flags()
  app.run(main)
