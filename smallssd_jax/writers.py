"""One metric writer (JSON lines + TensorBoard) and a progress bar, process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys

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
  """A tqdm bar with loss and images/s; silent on other processes or without a TTY."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                       mininterval=2.0, file=sys.stderr, disable=None if not os.environ.get('CI') else True)
    self._n = initial

  def update(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._n)
    self._n = step

  def postfix(self, **values: float) -> None:
    if self._bar is not None:
      self._bar.set_postfix({k: f'{v:.3g}' for k, v in values.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
