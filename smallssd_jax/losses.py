"""MultiBox loss (SSD) and the two-step loss (RefineDet-style, docs/design.md §5).

Pure functions of arrays, jit-able, batched with static shapes: matching is
vmapped over images and hard-negative mining ranks anchors with one sort and a
scatter per image, never a Python loop. Everything is computed in float32,
whatever dtype the heads produce.

Inputs shared by both losses:

* `outputs`: the model's dict, `cls_logits [B, A, C]` (class 0 is
  background), `box_deltas [B, A, 4]` `[dy, dx, dh, dw]` (see `boxes.py`), and
  for the two-step head `arm_logits [B, A, 2]` (background, object) and
  `arm_deltas [B, A, 4]`.
* `anchors`: `[A, 4]` `[cy, cx, h, w]` normalised.
* `batch`: `boxes [B, M, 4]` yxyx normalised, `labels int32 [B, M]` (1..K),
  `mask bool [B, M]`, `ignore bool [B, M]` (optional).
* `loss_cfg`: `config.loss` (config_blocks.ssd_loss): `iou_threshold`,
  `neg_pos_ratio`, `variances`, `loc_weight`; two-step adds
  `arm_filter_threshold`, `negative_anchor_filter` and `odm_cls_weight`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from smallssd_jax import boxes as box_lib
from smallssd_jax import matching

Metrics = dict[str, jax.Array]
Config = Any  # ml_collections.ConfigDict (config.loss) or a plain dict


def smooth_l1(x: jax.Array, beta: float = 1.0) -> jax.Array:
  """Huber-style smooth L1 (SSD, beta = 1), elementwise."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def hard_negatives(neg_score: jax.Array, candidates: jax.Array, num_pos: jax.Array,
                   neg_pos_ratio: float) -> jax.Array:
  """Selects the hardest negatives of each image.

  Args:
    neg_score: `[B, A]` mining score (the background cross entropy).
    candidates: `[B, A]` bool, anchors that may be mined.
    num_pos: `[B]` int, positives per image.
    neg_pos_ratio: negatives per positive.

  Returns:
    bool `[B, A]`: exactly `min(ratio * num_pos, #candidates)` anchors per image,
    the candidates with the largest scores (ties: lower anchor index first). An
    image without positives mines nothing, as in SSD and torchvision.
  """
  num_anchors = neg_score.shape[-1]
  score = jnp.where(candidates, jax.lax.stop_gradient(neg_score), -jnp.inf)
  order = jnp.argsort(-score, axis=-1, stable=True)
  # The rank of each anchor: a scatter of the sort order (cheaper than argsort twice).
  positions = jnp.arange(num_anchors, dtype=order.dtype)
  rank = jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(positions))(order)
  num_cand = jnp.sum(candidates, axis=-1)
  num_neg = jnp.minimum(jnp.floor(neg_pos_ratio * num_pos).astype(jnp.int32), num_cand)
  return candidates & (rank < num_neg[:, None])


def _mined_loss(logits: jax.Array, deltas: jax.Array, anchors: jax.Array,
                m: matching.Match, labels: jax.Array, neg_pos_ratio: float,
                variances: Sequence[float], negative_eligible: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Unnormalised softmax CE with hard negatives + smooth L1 on positives.

  Args:
    logits: `[B, A, C]`; deltas `[B, A, 4]`.
    anchors: `[A, 4]` or `[B, A, 4]` `[cy, cx, h, w]` the deltas are relative to.
    m: the batch's `Match`.
    labels: int `[B, A]` target class per anchor (0 where not positive).
    negative_eligible: optional bool `[B, A]`, anchors allowed as negatives.

  Returns:
    (sum of classification losses, sum of box losses, #positives, #negatives).
  """
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  positive = m.positive
  candidates = ~positive & ~m.ignore
  if negative_eligible is not None:
    candidates = candidates & negative_eligible
  num_pos = jnp.sum(positive, axis=-1)
  negatives = hard_negatives(-log_probs[..., 0], candidates, num_pos, neg_pos_ratio)
  cls_sum = jnp.sum(jnp.where(positive | negatives, ce, 0.0))

  targets = jax.lax.stop_gradient(
      box_lib.encode_boxes(m.matched_boxes.astype(jnp.float32), anchors, variances))
  l1 = jnp.sum(smooth_l1(deltas.astype(jnp.float32) - targets), axis=-1)
  box_sum = jnp.sum(jnp.where(positive, l1, 0.0))
  return cls_sum, box_sum, jnp.sum(num_pos), jnp.sum(negatives)


def _batch_targets(batch: Mapping[str, Any]) -> tuple[jax.Array, ...]:
  boxes = jnp.asarray(batch['boxes'], jnp.float32)
  labels = jnp.asarray(batch['labels'], jnp.int32)
  mask = jnp.asarray(batch['mask'], bool)
  ignore = batch.get('ignore')
  ignore = jnp.zeros(mask.shape, bool) if ignore is None else jnp.asarray(ignore, bool)
  return boxes, labels, mask, ignore


def multibox_loss(outputs: Mapping[str, jax.Array], anchors: jax.Array,
                  batch: Mapping[str, Any], loss_cfg: Config) -> tuple[jax.Array, Metrics]:
  """SSD MultiBox loss.

  Softmax cross entropy over positives and hard negatives (`neg_pos_ratio`
  per positive, per image) plus `loc_weight` x smooth L1 (beta 1) on the
  encoded offsets of positives, both divided by the batch's total number of
  positives (at least 1).

  Args:
    outputs: `cls_logits [B, A, C]`, `box_deltas [B, A, 4]` `[dy, dx, dh, dw]`.
    anchors: `[A, 4]` `[cy, cx, h, w]` normalised.
    batch: `boxes [B, M, 4]` yxyx normalised, `labels`, `mask`, `ignore` `[B, M]`.
    loss_cfg: `iou_threshold`, `neg_pos_ratio`, `variances`, `loc_weight`.

  Returns:
    (loss, metrics) with metrics `loss`, `cls_loss`, `box_loss`, `num_pos`, `num_neg`.
  """
  variances = tuple(loss_cfg['variances'])
  anchors = jnp.asarray(anchors, jnp.float32)
  boxes, labels, mask, ignore = _batch_targets(batch)
  m = matching.match_batch(anchors, boxes, labels, mask, ignore,
                           loss_cfg['iou_threshold'])
  cls_sum, box_sum, num_pos, num_neg = _mined_loss(
      outputs['cls_logits'], outputs['box_deltas'], anchors, m, m.labels,
      loss_cfg['neg_pos_ratio'], variances)
  norm = jnp.maximum(num_pos, 1).astype(jnp.float32)
  cls_loss = cls_sum / norm
  box_loss = loss_cfg['loc_weight'] * box_sum / norm
  loss = cls_loss + box_loss
  return loss, {'loss': loss, 'cls_loss': cls_loss, 'box_loss': box_loss,
                'num_pos': num_pos.astype(jnp.float32),
                'num_neg': num_neg.astype(jnp.float32)}


def refine_anchors(arm_deltas: jax.Array, anchors: jax.Array,
                   variances: Sequence[float] = box_lib.DEFAULT_VARIANCES) -> jax.Array:
  """Step one's refined anchors, no gradient.

  Args:
    arm_deltas: `[B, A, 4]` `[dy, dx, dh, dw]` relative to `anchors`.
    anchors: `[A, 4]` `[cy, cx, h, w]` normalised.

  Returns:
    float32 `[B, A, 4]` `[cy, cx, h, w]` normalised.
  """
  refined = box_lib.decode_boxes(arm_deltas.astype(jnp.float32), jnp.asarray(anchors, jnp.float32),
                                 variances)
  return jax.lax.stop_gradient(box_lib.yxyx_to_cycxhw(refined))


def two_step_loss(outputs: Mapping[str, jax.Array], anchors: jax.Array,
                  batch: Mapping[str, Any], loss_cfg: Config) -> tuple[jax.Array, Metrics]:
  """RefineDet-style loss of the two-step head (docs/design.md §5).

  Step one (ARM): 2-way softmax cross entropy, background vs object (the
  head's `arm_logits [B, A, 2]`, as RefineDet), with hard negatives at
  `neg_pos_ratio`, plus smooth L1 of `arm_deltas` against the anchors;
  normalised by its positives. Step two (ODM): the same MultiBox loss on
  `cls_logits` / `box_deltas`, with ground truth matched afresh against the
  refined anchors (step one's decoded boxes, no gradient), normalised by its
  own positives, its class part times `odm_cls_weight`. Negative anchor
  filtering (`negative_anchor_filter`): an anchor that is negative for step
  two and whose step-one background probability exceeds
  `arm_filter_threshold` cannot be mined as a negative; positives are never
  filtered.

  Returns:
    (loss, metrics): `loss` = ARM + ODM; `cls_loss`, `box_loss` (sums of both
    steps), `num_pos` (step two), and `arm_*` / `odm_*` parts, `num_filtered`.
  """
  variances = tuple(loss_cfg['variances'])
  ratio = loss_cfg['neg_pos_ratio']
  threshold = loss_cfg['iou_threshold']
  loc_weight = loss_cfg['loc_weight']
  anchors = jnp.asarray(anchors, jnp.float32)
  boxes, labels, mask, ignore = _batch_targets(batch)

  arm_match = matching.match_batch(anchors, boxes, labels, mask, ignore, threshold)
  arm_cls, arm_box, arm_pos, _ = _mined_loss(
      outputs['arm_logits'], outputs['arm_deltas'], anchors, arm_match,
      arm_match.positive.astype(jnp.int32), ratio, variances)
  arm_norm = jnp.maximum(arm_pos, 1).astype(jnp.float32)
  arm_cls, arm_box = arm_cls / arm_norm, loc_weight * arm_box / arm_norm

  refined = refine_anchors(outputs['arm_deltas'], anchors, variances)
  odm_match = matching.match_batch(refined, boxes, labels, mask, ignore, threshold)
  eligible = None
  num_filtered = jnp.zeros((), jnp.float32)
  if loss_cfg['negative_anchor_filter']:
    arm_logits = jax.lax.stop_gradient(outputs['arm_logits']).astype(jnp.float32)
    arm_bg = jax.nn.softmax(arm_logits, axis=-1)[..., 0]
    eligible = ~(arm_bg > loss_cfg['arm_filter_threshold'])
    num_filtered = jnp.sum(~eligible & ~odm_match.positive).astype(jnp.float32)
  odm_cls, odm_box, odm_pos, _ = _mined_loss(
      outputs['cls_logits'], outputs['box_deltas'], refined, odm_match, odm_match.labels,
      ratio, variances, negative_eligible=eligible)
  odm_norm = jnp.maximum(odm_pos, 1).astype(jnp.float32)
  odm_cls = loss_cfg['odm_cls_weight'] * odm_cls / odm_norm
  odm_box = loc_weight * odm_box / odm_norm

  arm_loss = arm_cls + arm_box
  odm_loss = odm_cls + odm_box
  loss = arm_loss + odm_loss
  return loss, {
      'loss': loss, 'cls_loss': arm_cls + odm_cls, 'box_loss': arm_box + odm_box,
      'num_pos': odm_pos.astype(jnp.float32),
      'arm_loss': arm_loss, 'arm_cls_loss': arm_cls, 'arm_box_loss': arm_box,
      'arm_num_pos': arm_pos.astype(jnp.float32),
      'odm_loss': odm_loss, 'odm_cls_loss': odm_cls, 'odm_box_loss': odm_box,
      'odm_num_pos': odm_pos.astype(jnp.float32),
      'num_filtered': num_filtered,
  }
