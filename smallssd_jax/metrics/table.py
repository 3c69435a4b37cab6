"""A readable text table of `evaluate()` results."""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

_COLUMNS = ('AP', 'APs', 'APm', 'APl')


def _cell(value: float | None) -> str:
  # NaN (no ground truth) and pycocotools' -1 (nothing to average) both mean "no value".
  if value is None or math.isnan(value) or value < 0:
    return '-'
  return f'{100 * value:.1f}'


def _is_metric(key: str) -> bool:
  return key.startswith(('AP', 'AR', 'mAP'))


def format_table(results: Mapping[str, float],
                 class_names: Sequence[str] | None = None) -> str:
  """Per-class AP (and APs / APm / APl) in percent, then the summary numbers.

  Args:
    results: a dict from `evaluate()`.
    class_names: names of classes 1..K, shown beside the ids.

  Returns:
    Multi-line text: one row per class id found as 'AP/<id>', a 'mean' row
    ('mAP', 'APs', 'APm', 'APl'), then every other summary entry (COCO's
    AP50 / AR..., 'mAP_small_classes') as `name value` lines, and other
    entries (say 'num_images') unscaled. '-' marks a class or bucket without
    ground truth.
  """
  ids = sorted(int(m.group(1)) for k in results if (m := re.fullmatch(r'AP/(\d+)', k)))
  names = [class_names[c - 1] if class_names is not None and c <= len(class_names) else ''
           for c in ids]
  width = max([len('class')] + [len(f'{c} {n}'.rstrip()) for c, n in zip(ids, names)])
  lines = [f'{"class":<{width}}' + ''.join(f'{col:>8}' for col in _COLUMNS)]
  lines.append('-' * len(lines[0]))
  for c, name in zip(ids, names):
    label = f'{c} {name}'.rstrip()
    lines.append(f'{label:<{width}}' + ''.join(
        f'{_cell(results.get(f"{col}/{c}")):>8}' for col in _COLUMNS))
  lines.append('-' * len(lines[0]))
  means = [results.get('mAP')] + [results.get(col) for col in _COLUMNS[1:]]
  lines.append(f'{"mean":<{width}}' + ''.join(f'{_cell(v):>8}' for v in means))
  others = [k for k in results if '/' not in k and k not in ('mAP', 'APs', 'APm', 'APl')]
  if others:
    lines.append('')
    key_width = max(len(k) for k in others)
    # Metric entries in percent like the table; anything else the caller
    # added (image counts, timings) as it is.
    lines.extend(f'{k:<{key_width}} {_cell(results[k]):>6}' if _is_metric(k)
                 else f'{k:<{key_width}} {results[k]:>6.4g}' for k in others)
  return '\n'.join(lines)
