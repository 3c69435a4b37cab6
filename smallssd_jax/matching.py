"""Ground truth -> per-anchor training targets (SSD matching, docs/design.md §3).

One image at a time with static shapes; `jax.vmap` over the batch
(`match_batch`). Two rules, as in SSD, ssd.pytorch and torchvision's
`SSDMatcher`:

1. bipartite: every valid, non-ignored ground truth takes its best prior, which
   becomes positive for it whatever the IoU (if the IoU is > 0);
2. threshold: every other prior whose best ground truth has IoU >= threshold is
   positive for that ground truth.

Where two ground truths share the same best prior, torchvision and ssd.pytorch
give it to the one with the larger index and the other may end up with no
positive at all. Here ground truths claim priors one by one, in order of
decreasing best IoU (ties: lower index first), each taking its best prior not
claimed yet, so every ground truth gets its own prior. Without collisions the
result is identical to torchvision's.

Ignored ground truths (VOC difficult, COCO crowd, KITTI DontCare) take no
prior in step 1; a prior whose best ground truth is an ignored one with IoU >=
threshold is `ignore`: neither positive nor a negative for hard-negative
mining. Padding and degenerate boxes (`ymax <= ymin`, `xmax <= xmin`, or not
finite) are dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from smallssd_jax import boxes as box_lib


class Match(NamedTuple):
  """Targets for the `A` anchors of one image (`[B, A, ...]` after vmap)."""
  labels: jax.Array         # int32 [A]: 0 background, else the matched class
  positive: jax.Array       # bool [A]
  ignore: jax.Array         # bool [A]: best ground truth is ignored, IoU >= threshold
  matched_boxes: jax.Array  # [A, 4] yxyx normalised; the anchor's own box where not positive
  matched_index: jax.Array  # int32 [A]: ground-truth index, -1 where not positive


def valid_boxes(gt_boxes: jax.Array, gt_mask: jax.Array) -> jax.Array:
  """Real, non-degenerate ground truth: `gt_mask` and finite with positive h and w.

  Args:
    gt_boxes: `[..., M, 4]` yxyx normalised.
    gt_mask: `[..., M]` bool, False on padding.
  """
  finite = jnp.all(jnp.isfinite(gt_boxes), axis=-1)
  return (gt_mask & finite & (gt_boxes[..., 2] > gt_boxes[..., 0])
          & (gt_boxes[..., 3] > gt_boxes[..., 1]))


def _bipartite(overlaps: jax.Array, forceable: jax.Array) -> jax.Array:
  """Best distinct prior per ground truth.

  Args:
    overlaps: `[M, A]` IoU.
    forceable: `[M]` bool, ground truths that take a prior.

  Returns:
    int32 `[A]`: index of the ground truth that claimed the prior, or -1.
  """
  num_gt, num_anchors = overlaps.shape
  best = jnp.max(overlaps, axis=1)
  # Stable sort on the negated best IoU: larger IoU first, lower index on ties;
  # ground truths that take nothing go last.
  order = jnp.argsort(jnp.where(forceable, -best, jnp.inf), stable=True)
  # Rows in claiming order up front, so step i reads row i with a plain slice
  # and updates by a one-hot select: a per-step gather and scatter, batched by
  # vmap, made the whole match about twice as slow on the CPU.
  rows = overlaps[order]
  row_ok = forceable[order]
  anchor_ids = jnp.arange(num_anchors)

  def claim(i, state):
    claimed_by, taken = state
    row = jnp.where(taken, -1.0, rows[i])
    a = jnp.argmax(row)
    hit = (anchor_ids == a) & row_ok[i] & (row[a] > 0)
    return jnp.where(hit, order[i], claimed_by), taken | hit

  init = (jnp.full((num_anchors,), -1, jnp.int32), jnp.zeros((num_anchors,), bool))
  claimed_by, _ = jax.lax.fori_loop(0, num_gt, claim, init)
  return claimed_by


def match(anchors: jax.Array, gt_boxes: jax.Array, gt_labels: jax.Array,
          gt_mask: jax.Array, gt_ignore: jax.Array | None = None,
          iou_threshold: float = 0.5) -> Match:
  """Matches one image's ground truth to its anchors.

  Args:
    anchors: `[A, 4]` `[cy, cx, h, w]` normalised.
    gt_boxes: `[M, 4]` `[ymin, xmin, ymax, xmax]` normalised, padded.
    gt_labels: int `[M]` classes 1..K.
    gt_mask: bool `[M]`, True for real boxes.
    gt_ignore: bool `[M]`, True for ignored boxes (difficult, crowd); None = none.
    iou_threshold: an anchor whose best IoU is >= this is positive (or ignored).

  Returns:
    A `Match` of per-anchor targets.
  """
  num_gt = gt_boxes.shape[0]
  anchor_boxes = box_lib.cycxhw_to_yxyx(anchors)
  if num_gt == 0:
    num_anchors = anchors.shape[0]
    no = jnp.zeros((num_anchors,), bool)
    return Match(labels=jnp.zeros((num_anchors,), jnp.int32), positive=no, ignore=no,
                 matched_boxes=jnp.asarray(anchor_boxes),
                 matched_index=jnp.full((num_anchors,), -1, jnp.int32))
  if gt_ignore is None:
    gt_ignore = jnp.zeros((num_gt,), bool)
  gt_ignore = gt_ignore.astype(bool)
  valid = valid_boxes(gt_boxes, gt_mask.astype(bool))
  # Zero the dropped boxes so NaN or inf coordinates never reach the IoU.
  safe_boxes = jnp.where(valid[:, None], gt_boxes, 0.0)
  overlaps = jnp.where(valid[:, None], box_lib.iou(safe_boxes, anchor_boxes), -1.0)

  claimed_by = _bipartite(overlaps, valid & ~gt_ignore)
  forced = claimed_by >= 0

  best_gt = jnp.argmax(overlaps, axis=0)   # ties: lower index
  best_iou = jnp.max(overlaps, axis=0)     # -1 when there is no valid box
  above = best_iou >= iou_threshold
  best_ignored = gt_ignore[best_gt]

  positive = forced | (above & ~best_ignored)
  ignore = ~positive & above & best_ignored
  index = jnp.where(forced, claimed_by, best_gt)
  labels = jnp.where(positive, gt_labels.astype(jnp.int32)[index], 0)
  matched = jnp.where(positive[:, None], safe_boxes[index], anchor_boxes)
  return Match(labels=labels, positive=positive, ignore=ignore,
               matched_boxes=matched.astype(anchor_boxes.dtype),
               matched_index=jnp.where(positive, index, -1).astype(jnp.int32))


def match_batch(anchors: jax.Array, gt_boxes: jax.Array, gt_labels: jax.Array,
                gt_mask: jax.Array, gt_ignore: jax.Array | None = None,
                iou_threshold: float = 0.5) -> Match:
  """`match` over a batch.

  Args:
    anchors: `[A, 4]` shared, or `[B, A, 4]` per image (refined anchors);
      `[cy, cx, h, w]` normalised.
    gt_boxes: `[B, M, 4]` yxyx normalised; gt_labels, gt_mask, gt_ignore `[B, M]`.
    iou_threshold: as in `match`.

  Returns:
    A `Match` whose fields have a leading batch axis.
  """
  if gt_ignore is None:
    gt_ignore = jnp.zeros(gt_mask.shape, bool)
  anchor_axis = 0 if anchors.ndim == 3 else None
  fn = lambda a, b, l, m, i: match(a, b, l, m, i, iou_threshold)
  return jax.vmap(fn, in_axes=(anchor_axis, 0, 0, 0, 0))(
      anchors, gt_boxes, gt_labels, gt_mask, gt_ignore)
