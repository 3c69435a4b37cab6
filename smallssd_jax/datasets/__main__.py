r"""Dataset audit: what a config's data split holds, and what is wrong with it.

  python -m smallssd_jax.datasets --config=configs/NAME.py[:arg] [--split=train] \
      [--check] [--suggest-priors] [--config.data.root=DIR ...]

Prints the number of images, objects per class, object sizes (COCO buckets
small < 32^2, medium < 96^2, large, by box area in original pixels and at the
model input size, plus a finer histogram of sqrt(area)), ignored objects,
images without objects, every repaired box and every bad example with its
file and reason. Without --check only the annotations (and image headers)
are read; with --check every image is decoded too, and the exit status is 1
when any example is bad and data.on_bad_example is 'error'.
"""

from __future__ import annotations

import collections
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from smallssd_jax import _xla
from smallssd_jax import anchors as anchors_lib
from smallssd_jax import batch_layout
from smallssd_jax import config_blocks
from smallssd_jax import config_lib
from smallssd_jax import coverage
from smallssd_jax.datasets import resize as resize_lib
from smallssd_jax.datasets import records
from smallssd_jax.datasets import sources

config_lib.register_flag_parsers()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run config file.', lock_config=True)
_SPLIT = flags.DEFINE_string('split', None, 'Split to audit (default: data.train_split).')
_CHECK = flags.DEFINE_bool('check', False, 'Decode every image and fail on bad examples.')
_MAX = flags.DEFINE_integer('max_examples', 0, 'Audit only the first N examples (0 = all).')
_SUGGEST = flags.DEFINE_bool('suggest-priors', False,
                             'Search prior scales that cover more objects; print the overrides.')
_PNG = flags.DEFINE_string('coverage_png', 'prior_coverage.png',
                           "With --check: where to draw the object sizes and the priors' coverage.")

_COCO_BUCKETS = (('small', 32 ** 2), ('medium', 96 ** 2), ('large', float('inf')))
_SIDE_BINS = (8, 16, 32, 64, 128, 256)


def _bucket_counts(areas: np.ndarray) -> dict[str, int]:
  out, lo = {}, 0.0
  for name, hi in _COCO_BUCKETS:
    out[name] = int(((areas >= lo) & (areas < hi)).sum())
    lo = hi
  return out


def _side_histogram(areas: np.ndarray) -> list[tuple[str, int]]:
  sides = np.sqrt(areas)
  edges = (0,) + _SIDE_BINS + (float('inf'),)
  return [(f'{lo}-{hi}' if hi != float('inf') else f'>={lo}',
           int(((sides >= lo) & (sides < hi)).sum())) for lo, hi in zip(edges[:-1], edges[1:])]


def audit(config, split: str, check: bool, max_examples: int = 0, out=sys.stdout,
          suggest: bool = False, png: str = '') -> dict[str, object]:
  """Reads the split and prints the report; returns the numbers (for tests).

  With `check` (or `suggest`) also the prior coverage of the split's boxes
  (coverage.py), a PNG of it at `png`; with `suggest` the prior scales that
  cover more of them, as command-line overrides.
  """
  data_cfg = config.data
  source = sources.get_source(data_cfg, split)
  input_size = int(config.model.input_size)
  max_boxes = int(data_cfg.max_boxes)
  n = len(source) if max_examples <= 0 else min(len(source), max_examples)
  per_class = collections.Counter()
  ignored = 0
  empty = 0
  areas_orig, areas_input, kept_boxes = [], [], []
  bad: list[str] = []
  repairs: list[str] = []
  images = 0
  for index in range(n):
    try:
      example = source.record(index)
      if check:
        # The same decode + size check the pipeline runs.
        resize_lib.resize(example, size=input_size, fill=batch_layout.fill_colour(data_cfg))
      if len(example['boxes']) > max_boxes:
        raise records.BadExampleError(
            example['key'],
            f'{len(example["boxes"])} objects, more than data.max_boxes={max_boxes}')
    except records.BadExampleError as e:
      bad.append(str(e))
      continue
    images += 1
    repairs.extend(f'{example["key"]}: {p}' for p in example['problems'])
    boxes, labels, ign = example['boxes'], example['labels'], example['ignore']
    if not np.any(~ign):
      empty += 1
    ignored += int(ign.sum())
    h, w = (int(v) for v in example['orig_size'])
    bh, bw = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    real = ~ign
    areas_orig.append((bh * h * bw * w)[real])
    areas_input.append((bh * bw * input_size ** 2)[real])
    kept_boxes.append(boxes[real])
    per_class.update(labels[real].tolist())
  areas_orig = np.concatenate(areas_orig) if areas_orig else np.zeros(0)
  areas_input = np.concatenate(areas_input) if areas_input else np.zeros(0)
  names = source.class_names

  def p(*args):
    print(*args, file=out)

  p(f'dataset {data_cfg.name} split {split}: {source!r}')
  p(f'images read: {images} of {n}   bad: {len(bad)}   '
    f'without (non-ignored) objects: {empty}')
  p(f'objects: {int(sum(per_class.values()))}   ignored (difficult/crowd/DontCare): {ignored}')
  p('objects per class:')
  for k, name in enumerate(names, 1):
    p(f'  {k:3d} {name:20s} {per_class.get(k, 0)}')
  p(f'object sizes, COCO buckets (original pixels):  {_bucket_counts(areas_orig)}')
  p(f'object sizes, COCO buckets (at input {input_size}):  {_bucket_counts(areas_input)}')
  p(f'sqrt(area) histogram at input {input_size}: ' +
    ', '.join(f'{k}: {v}' for k, v in _side_histogram(areas_input)))
  if repairs:
    p(f'repaired boxes ({len(repairs)} examples):')
    for line in repairs:
      p(f'  {line}')
  if bad:
    p(f'bad examples ({len(bad)}):')
    for line in bad:
      p(f'  {line}')
  boxes = np.concatenate(kept_boxes) if kept_boxes else np.zeros((0, 4), np.float32)
  result = {'images': images, 'bad': bad, 'empty': empty, 'ignored': ignored,
            'per_class': dict(per_class), 'repairs': repairs, 'boxes': boxes}
  if check or suggest:
    threshold = float(config.loss.iou_threshold)
    priors = anchors_lib.from_config(config.anchors)
    report = coverage.coverage(boxes, priors, input_size, threshold)
    p(coverage.format_coverage(report, f'\n{config.model.name} priors ({len(priors)}):'))
    result['coverage'] = report
    if check and png:
      coverage.plot(boxes, report, coverage.level_prior_sizes(config.anchors, input_size),
                    input_size, png, f'{config.model.name}: {data_cfg.name} {split}')
      p(f'wrote {png}')
  if suggest:
    found = coverage.suggest(boxes, config.anchors, input_size, threshold)
    result['suggestion'] = found
    if found['overrides']:
      p(f'\nsuggested priors: objects covered {100 * found["before"]["covered"]:.1f}% -> '
        f'{100 * found["after"]["covered"]:.1f}% (same priors per location and aspect ratios):')
      p(f'  {coverage.command_line(found["overrides"])}')
      p(coverage.format_coverage(found['after'], 'with them:'))
    else:
      p('\nsuggested priors: none of the searched scales covers more objects than the config\'s')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # After the command line, as main.py does: `:runlocal --config.data.root=DIR` audits DIR.
  config = config_blocks.finalize(_CONFIG.value)
  split = _SPLIT.value or config.data.train_split
  result = audit(config, split, _CHECK.value, _MAX.value, suggest=_SUGGEST.value,
                 png=_PNG.value)
  if _CHECK.value and result['bad'] and config.data.on_bad_example == 'error':
    sys.exit(1)


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()     # before any JAX backend starts
  flags.mark_flag_as_required('config')
  app.run(main)
