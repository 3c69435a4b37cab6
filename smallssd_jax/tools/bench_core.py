"""Benchmark of the detection core: matching + MultiBox loss, and detect().

    python -m smallssd_jax.tools.bench_core [--batch=32] [--repeats=10] [--warmup=2]

Times jitted calls on random data of SSD300's shape (8732 priors, 21 classes,
50 ground-truth slots per image) after warm-up, with `block_until_ready`, and
prints the median milliseconds. Run it on an otherwise idle machine.
"""

from __future__ import annotations

from collections.abc import Callable

from absl import app
from absl import flags

from smallssd_jax import _xla

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from smallssd_jax import anchors as anchor_lib  # noqa: E402
from smallssd_jax import losses  # noqa: E402
from smallssd_jax import postprocess  # noqa: E402
from smallssd_jax import config_blocks  # noqa: E402
from smallssd_jax.tools import timing  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 32, 'images per batch')
_MAX_BOXES = flags.DEFINE_integer('max_boxes', 50, 'ground-truth slots per image')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'timed repetitions')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed calls after compilation')


def _median_ms(fn: Callable, *args, repeats: int, warmup: int) -> float:
  jax.block_until_ready(fn(*args))      # compile
  return 1e3 * timing.median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats, warmup)


def _inputs(batch: int, num_anchors: int, num_classes: int, max_boxes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  yx = rng.uniform(0, 0.9, (batch, max_boxes, 2))
  hw = rng.uniform(0.01, 0.3, (batch, max_boxes, 2))
  boxes = np.concatenate([yx, np.minimum(yx + hw, 1.0)], -1).astype(np.float32)
  num_valid = rng.integers(1, max_boxes + 1, (batch, 1))
  mask = np.arange(max_boxes)[None] < num_valid
  labels = rng.integers(1, num_classes, (batch, max_boxes)).astype(np.int32)
  ignore = (rng.uniform(size=mask.shape) < 0.05) & mask
  targets = dict(boxes=boxes, labels=labels, mask=mask, ignore=ignore)
  logits = rng.normal(0, 2, (batch, num_anchors, num_classes))
  outputs = dict(cls_logits=jnp.asarray(logits, jnp.float32),
                 box_deltas=jnp.asarray(rng.normal(0, 1, (batch, num_anchors, 4)), jnp.float32))
  return outputs, jax.tree.map(jnp.asarray, targets)


def main(argv):
  _xla.apply_cpu_xla_defaults()
  del argv
  cfg = config_blocks.ssd_model(300, num_classes=21)
  anchors = anchor_lib.from_config(cfg.anchors)
  post = config_blocks.postprocess()
  outputs, targets = _inputs(_BATCH.value, len(anchors), 21, _MAX_BOXES.value)
  kw = dict(repeats=_REPEATS.value, warmup=_WARMUP.value)
  print(f'device: {jax.devices()[0].device_kind}, batch {_BATCH.value}, {len(anchors)} priors, '
        f'{_MAX_BOXES.value} ground-truth slots, 21 classes')

  loss_fn = jax.jit(lambda o, t: losses.multibox_loss(o, anchors, t, cfg.loss))
  ms = _median_ms(loss_fn, outputs, targets, **kw)
  print(f'match + multibox_loss (forward)        {ms:9.2f} ms')
  grad_fn = jax.jit(jax.grad(lambda o, t: losses.multibox_loss(o, anchors, t, cfg.loss)[0]))
  ms = _median_ms(grad_fn, outputs, targets, **kw)
  print(f'match + multibox_loss (value and grad) {ms:9.2f} ms')
  detect_fn = jax.jit(lambda o: postprocess.detect(o, anchors, post))
  ms = _median_ms(detect_fn, outputs, **kw)
  print(f'detect (random logits: every class full) {ms:7.2f} ms')
  trained = dict(outputs, cls_logits=outputs['cls_logits'].at[..., 0].add(6.0))
  ms = _median_ms(detect_fn, trained, **kw)
  print(f'detect (background-heavy logits)       {ms:9.2f} ms')


if __name__ == '__main__':
  app.run(main)
