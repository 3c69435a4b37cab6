"""One metric writer (JSON lines + TensorBoard) and a progress bar, process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import logging


class MetricWriter:
  """Appends `{"step": s, **metrics}` to WORKDIR/metrics.jsonl and TensorBoard events."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # TensorBoard files are a convenience, the JSON lines are the record
        logging.info('tensorboardX not installed: writing metrics.jsonl only')

  def write(self, step: int, metrics: dict[str, float], prefix: str = '') -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        row[prefix + k] = float(v)
    with open(self.path, 'a') as f:
      f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                          for k, v in row.items()}) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step' and v is not None and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Progress of the run, process 0 only: a tqdm bar on a terminal, else one line per log step.

  Without a terminal (a SLURM or CI log, `| tee`) a bar prints nothing
  useful, so every `log_every_steps` one compact line goes to stdout instead:
  `step 150/200  loss 6.32 (cls 4.26, box 2.06)  12.1 img/s  ETA 0:35`.
  """

  def __init__(self, total: int, initial: int = 0, enabled: bool = True,
               terminal: bool | None = None):
    self._bar = None
    self._enabled = enabled
    self._total = total
    self._n = initial
    self._start = (time.perf_counter(), initial)
    if terminal is None:
      terminal = sys.stderr.isatty() and not os.environ.get('CI')
    self._terminal = terminal
    if enabled and terminal:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                       mininterval=2.0, file=sys.stderr)

  def update(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._n)
    self._n = step

  def log(self, step: int, metrics: dict[str, float]) -> None:
    """The metrics of a log step: on the bar, or as one line."""
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix({'loss': f'{metrics["loss"]:.3g}',
                             'img_s': f'{metrics.get("images_per_sec", 0.0):.3g}'}, refresh=False)
      return
    print(format_log_line(step, self._total, metrics, self._eta(step)), flush=True)

  def _eta(self, step: int) -> float | None:
    t0, s0 = self._start
    done = step - s0
    if done <= 0:
      return None
    return (time.perf_counter() - t0) / done * (self._total - step)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def format_log_line(step: int, total: int, metrics: dict[str, float], eta: float | None) -> str:
  """`step 150/200  loss 6.32 (cls 4.26, box 2.06)  12.1 img/s  ETA 0:35`."""
  parts = [f'step {step}/{total}', f'loss {metrics["loss"]:.4g}']
  inner = [f'{name} {metrics[key]:.3g}' for name, key in (('cls', 'cls_loss'), ('box', 'box_loss'))
           if key in metrics]
  if inner:
    parts[-1] += f' ({", ".join(inner)})'
  if 'images_per_sec' in metrics:
    parts.append(f'{metrics["images_per_sec"]:.1f} img/s')
  if eta is not None:
    minutes, seconds = divmod(int(round(eta)), 60)
    hours, minutes = divmod(minutes, 60)
    parts.append(f'ETA {hours}:{minutes:02d}:{seconds:02d}' if hours else f'ETA {minutes}:{seconds:02d}')
  return '  '.join(parts)
