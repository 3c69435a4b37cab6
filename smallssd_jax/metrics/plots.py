"""Precision/recall curve figures, one PNG per class (matplotlib, Agg)."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence


def plot_pr_curves(curves: Mapping[int, Mapping[str, Any]],
                   class_names: Sequence[str] | None, path: str) -> list[str]:
  """Writes `pr_<id>_<name>.png` per class into the directory `path`.

  Args:
    curves: from `metrics.precision_recall`: {class id: {'precision',
      'recall', 'ap'}}.
    class_names: names of classes 1..K (or None to use ids).
    path: output directory, created if missing.

  Returns:
    The written file paths, in class-id order.
  """
  # The Agg canvas is used directly, so the caller's pyplot backend and
  # global state are left alone (and no display is needed).
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  os.makedirs(path, exist_ok=True)
  written = []
  for c in sorted(curves):
    curve = curves[c]
    name = class_names[c - 1] if class_names is not None else str(c)
    figure = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(curve['recall'], curve['precision'], drawstyle='steps-post')
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='recall', ylabel='precision',
           title=f'{name}: AP {100 * curve["ap"]:.1f}')
    ax.grid(alpha=0.3)
    figure.tight_layout()
    safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', name)
    file = os.path.join(path, f'pr_{c:03d}_{safe}.png')
    figure.savefig(file)
    written.append(file)
  return written
