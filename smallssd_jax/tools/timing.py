"""The one way the tools time things: medians of wall times, and paired rounds for ratios.

Speed is measured by these tools, never by tests. Every timed callable must
block until its work is done (`jax.block_until_ready`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def paired_seconds(fns: dict[str, Callable[[], Any]], rounds: int,
                   untimed: int = 1) -> dict[str, list[float]]:
  """Wall times of each `fn()` over `rounds` rounds, the programs taking turns.

  On a shared machine the load drifts over minutes; timing two programs in
  alternation exposes both to the same drift, so their per-round ratio is
  steadier than the ratio of two medians taken minutes apart. Each turn makes
  `untimed` calls before the timed one, so that a program is timed as a
  training loop runs it, right after its own previous call: the first
  SSD300 train step after a torchvision step (or after a pause) measured
  1.1-1.5 s slower than the next ones (7.3 s) on the 2-core CPU, which timed
  every call of ours in that state and not torchvision's.
  """
  times = {k: [] for k in fns}
  for _ in range(max(1, rounds)):
    for key, fn in fns.items():
      for _ in range(untimed):
        fn()
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  return times


def median_seconds(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Median wall time of `fn()` (which must block until its work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(max(1, steps)):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
