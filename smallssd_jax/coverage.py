"""How well a model's priors cover a dataset's objects, and priors that cover them better.

Small objects are missed first of all because no prior overlaps them well
enough to be matched: a 10-pixel object has IoU below 0.5 with every
30-pixel prior, so training only sees it through the forced best-prior match.
`coverage` measures this per object size (sqrt of the box area in pixels at
the model's input size, buckets < 8, 8-16, 16-32, 32-64, 64-128, > 128):
objects, the fraction whose best prior IoU reaches the matching threshold,
the mean number of priors at or above it (the positives a plain threshold
match gives), and the median best IoU.

`suggest` searches the prior scales of the model's style (SSD: the per-level
min / max sizes on a linear scale between smin and smax; DF-SSD: s_min /
s_max; RefineDet: the size factor), keeping the aspect ratios and the number
of priors per location, for the highest fraction covered.

NumPy only; boxes `[ymin, xmin, ymax, xmax]` normalised, priors `[cy, cx, h, w]`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

BUCKETS = ((0.0, 8.0), (8.0, 16.0), (16.0, 32.0), (32.0, 64.0), (64.0, 128.0),
           (128.0, float('inf')))


def bucket_names() -> list[str]:
  return [f'<{hi:g}' if lo == 0 else (f'>{lo:g}' if hi == float('inf') else f'{lo:g}-{hi:g}')
          for lo, hi in BUCKETS]


def best_ious(boxes: np.ndarray, priors: np.ndarray, threshold: float,
              chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(best IoU [N], number of priors with IoU >= threshold [N]) of every box, in chunks."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  p = np.asarray(priors, np.float64)
  py0, px0 = p[:, 0] - p[:, 2] / 2, p[:, 1] - p[:, 3] / 2
  py1, px1 = p[:, 0] + p[:, 2] / 2, p[:, 1] + p[:, 3] / 2
  p_area = p[:, 2] * p[:, 3]
  best = np.zeros(len(boxes))
  count = np.zeros(len(boxes), np.int64)
  for start in range(0, len(boxes), chunk):
    b = boxes[start:start + chunk]
    ih = np.clip(np.minimum(b[:, None, 2], py1) - np.maximum(b[:, None, 0], py0), 0, None)
    iw = np.clip(np.minimum(b[:, None, 3], px1) - np.maximum(b[:, None, 1], px0), 0, None)
    inter = ih * iw
    b_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iou = inter / np.maximum(b_area[:, None] + p_area[None] - inter, 1e-12)
    best[start:start + chunk] = iou.max(1)
    count[start:start + chunk] = (iou >= threshold).sum(1)
  return best, count


def object_sizes(boxes: np.ndarray, input_size: int) -> np.ndarray:
  """sqrt(area) in pixels of the model input (images are resized to a square)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return input_size * np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) *
                              np.clip(boxes[:, 3] - boxes[:, 1], 0, None))


def coverage(boxes: np.ndarray, priors: np.ndarray, input_size: int,
             threshold: float = 0.5) -> dict[str, Any]:
  """Per-bucket and overall coverage of `boxes` [N, 4] by `priors` [A, 4] (module docstring)."""
  best, count = best_ious(boxes, priors, threshold)
  sizes = object_sizes(boxes, input_size)
  rows = []
  for name, (lo, hi) in zip(bucket_names(), BUCKETS):
    sel = (sizes >= lo) & (sizes < hi)
    n = int(sel.sum())
    rows.append({'bucket': name, 'objects': n,
                 'covered': float((best[sel] >= threshold).mean()) if n else float('nan'),
                 'mean_positives': float(count[sel].mean()) if n else float('nan'),
                 'median_best_iou': float(np.median(best[sel])) if n else float('nan')})
  n = len(best)
  return {'threshold': threshold, 'objects': n, 'buckets': rows,
          'covered': float((best >= threshold).mean()) if n else float('nan'),
          'mean_positives': float(count.mean()) if n else float('nan'),
          'median_best_iou': float(np.median(best)) if n else float('nan')}


def format_coverage(report: dict[str, Any], title: str = '') -> str:
  lines = [title] if title else []
  lines.append(f'prior coverage at IoU >= {report["threshold"]:g} (object size = sqrt(area) '
               'in pixels at the model input):')
  lines.append(f'  {"size":>8s} {"objects":>8s} {"covered":>8s} {"positives":>10s} '
               f'{"median IoU":>11s}')
  for r in report['buckets'] + [dict(bucket='all', objects=report['objects'],
                                     covered=report['covered'],
                                     mean_positives=report['mean_positives'],
                                     median_best_iou=report['median_best_iou'])]:
    if not r['objects']:
      lines.append(f'  {r["bucket"]:>8s} {0:8d} {"-":>8s} {"-":>10s} {"-":>11s}')
      continue
    lines.append(f'  {r["bucket"]:>8s} {r["objects"]:8d} {100 * r["covered"]:7.1f}% '
                 f'{r["mean_positives"]:10.2f} {r["median_best_iou"]:11.3f}')
  return '\n'.join(lines)


def level_prior_sizes(anchor_cfg, input_size: int) -> list[list[float]]:
  """The distinct prior sizes (sqrt(h w) in pixels at the input) of each prediction level."""
  from smallssd_jax import anchors as anchors_lib  # pylint: disable=g-import-not-at-top
  priors = anchors_lib.from_config(anchor_cfg)
  out, start = [], 0
  for f, n in zip(anchor_cfg.feature_maps, anchors_lib.anchors_per_location(anchor_cfg)):
    count = int(np.prod(anchors_lib._pair(f))) * n   # pylint: disable=protected-access
    level = priors[start:start + n]                   # one location holds every shape
    out.append(sorted({round(float(input_size * np.sqrt(h * w)), 1) for _, _, h, w in level}))
    start += count
  return out


def plot(boxes: np.ndarray, report: dict[str, Any], prior_sizes: Sequence[Sequence[float]],
         input_size: int, path: str, title: str = '') -> None:
  """The object-size histogram with each level's prior sizes marked, and coverage per bucket."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sizes = object_sizes(boxes, input_size)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), gridspec_kw={'height_ratios': [3, 2]})
  edges = np.geomspace(max(1.0, sizes.min() if len(sizes) else 1.0),
                       max(2.0, sizes.max() * 1.05 if len(sizes) else 2.0), 40)
  top.hist(sizes, bins=edges, color='0.6')
  top.set_xscale('log')
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for level, values in enumerate(prior_sizes):
    for j, v in enumerate(values):
      top.axvline(v, color=colours[level % len(colours)], lw=1.2, ls='-' if j == 0 else ':',
                  label=f'level {level} priors' if j == 0 else None)
  top.set_xlabel('object size: sqrt(area), pixels at the model input')
  top.set_ylabel('objects')
  top.legend(fontsize=7, ncol=2)
  top.set_title(title or 'object sizes and prior sizes')
  names = [r['bucket'] for r in report['buckets']]
  covered = [100 * (r['covered'] if r['objects'] else 0.0) for r in report['buckets']]
  bars = bottom.bar(names, covered, color=colours[0])
  for bar, r in zip(bars, report['buckets']):
    bottom.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, f'n={r["objects"]}',
                ha='center', fontsize=7)
  bottom.set_ylim(0, 110)
  bottom.set_ylabel(f'% with a prior at IoU >= {report["threshold"]:g}')
  bottom.set_xlabel('object size bucket (pixels)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ------------------------------------------------------------- suggest ---


def _ssd_candidates(anchor_cfg, input_size: int):
  levels = len(anchor_cfg.feature_maps)
  for smin, smax in itertools.product(np.linspace(0.02, 0.3, 15), np.linspace(0.3, 1.05, 16)):
    if smax <= smin:
      continue
    # The SSD paper's linear scales (formula 4), one more for the last max size.
    scales = np.linspace(smin, smax, levels + 1) if levels > 1 else np.array([smin, smax])
    mins = [round(float(s * input_size), 2) for s in scales[:-1]]
    maxs = [round(float(s * input_size), 2) for s in scales[1:]]
    yield {'min_sizes': mins, 'max_sizes': maxs}


def _dfssd_candidates(anchor_cfg, input_size: int):
  del input_size
  for smin, smax in itertools.product(np.linspace(0.02, 0.3, 15), np.linspace(0.3, 1.05, 16)):
    if smax > smin:
      yield {'s_min': round(float(smin), 4), 's_max': round(float(smax), 4)}


def _refinedet_candidates(anchor_cfg, input_size: int):
  del anchor_cfg, input_size
  for factor in np.linspace(0.5, 6.0, 23):
    yield {'size_factor': round(float(factor), 3)}


_CANDIDATES = {'ssd': _ssd_candidates, 'dfssd': _dfssd_candidates,
               'refinedet': _refinedet_candidates}


def with_overrides(anchor_cfg, overrides: dict[str, Any]):
  cfg = copy.deepcopy(anchor_cfg)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def suggest(boxes: np.ndarray, anchor_cfg, input_size: int, threshold: float = 0.5,
            max_objects: int = 4000, seed: int = 0) -> dict[str, Any]:
  """The prior scales (of the config's style) that cover the most objects.

  Same number of priors per location and the same aspect ratios; the score
  is the fraction of objects whose best prior IoU reaches `threshold`, ties
  broken by the mean number of positives. A sample of `max_objects` boxes
  scores the candidates; the winner and the config are then scored on all.

  Returns:
    {'overrides': {anchors field: value}, 'before': coverage, 'after': coverage}.
  """
  from smallssd_jax import anchors as anchors_lib  # pylint: disable=g-import-not-at-top
  style = anchor_cfg.style
  if style not in _CANDIDATES:
    raise ValueError(f'no prior search for anchors.style {style!r}')
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  sample = boxes
  if len(boxes) > max_objects:
    sample = boxes[np.random.default_rng(seed).choice(len(boxes), max_objects, replace=False)]
  per_location = anchors_lib.anchors_per_location(anchor_cfg)

  def score(cfg):
    best, count = best_ious(sample, anchors_lib.from_config(cfg), threshold)
    return float((best >= threshold).mean()), float(count.mean())

  best_score, best_overrides = score(anchor_cfg), {}
  for overrides in _CANDIDATES[style](anchor_cfg, input_size):
    cfg = with_overrides(anchor_cfg, overrides)
    if anchors_lib.anchors_per_location(cfg) != per_location:
      continue
    s = score(cfg)
    if s > best_score:
      best_score, best_overrides = s, overrides
  return {'overrides': best_overrides,
          'before': coverage(boxes, anchors_lib.from_config(anchor_cfg), input_size, threshold),
          'after': coverage(boxes, anchors_lib.from_config(with_overrides(anchor_cfg,
                                                                          best_overrides)),
                            input_size, threshold)}


def command_line(overrides: dict[str, Any]) -> str:
  """`--config.anchors.k=v` flags that reproduce `overrides` (lists as Python literals)."""
  return ' '.join(f"--config.anchors.{k}='{list(v)}'" if isinstance(v, (list, tuple))
                  else f'--config.anchors.{k}={v}' for k, v in overrides.items())
