"""Decoding and per-class non-maximum suppression with fixed-size outputs.

Greedy NMS is inherently sequential over the score-sorted candidates; here it is
one `lax.while_loop` step per candidate, each step comparing the current box with
all candidates of its row at once, for every image and class together (the IoU
row is computed on the fly, so no `[K, K]` matrix is kept). The loop stops early
once every row has `max_outputs` boxes or has run out of valid candidates
(candidates are sorted, so an invalid one means no valid one follows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from smallssd_jax import boxes as box_lib


def _greedy_nms_sorted(boxes: jax.Array, valid: jax.Array, classes: jax.Array | None,
                       iou_threshold: float, max_outputs: int) -> jax.Array:
  """Greedy NMS over candidates already sorted by decreasing score.

  Leading batch dimensions are handled natively rather than by vmap, so the
  loop counter stays a scalar and each step is a slice, not a gather.

  Args:
    boxes: `[..., K, 4]` yxyx (any units).
    valid: `[..., K]` bool; in each row the valid candidates must come first.
    classes: `[..., K]` int, or None when all candidates of a row share one class.
    iou_threshold: a box is suppressed by a kept box of its class with
      IoU > threshold (torchvision).
    max_outputs: a row stops keeping boxes once it has this many.

  Returns:
    bool `[..., K]`: kept candidates (at most `max_outputs` per row).
  """
  num = boxes.shape[-2]
  batch_shape = boxes.shape[:-2]

  def cond(state):
    i, count, _, _ = state
    # Rows are sorted, so an invalid column i means nothing valid follows.
    pending = (count < max_outputs) & valid[..., jnp.minimum(i, num - 1)]
    return (i < num) & jnp.any(pending)

  def body(state):
    i, count, keep, suppressed = state
    kept = valid[..., i] & ~suppressed[..., i] & (count < max_outputs)
    current = jax.lax.dynamic_slice_in_dim(boxes, i, 1, axis=-2)       # [..., 1, 4]
    iou_row = box_lib.iou(current, boxes)[..., 0, :]
    overlap = iou_row > iou_threshold
    if classes is not None:
      overlap = overlap & (classes == classes[..., i, None])
    suppressed = suppressed | (overlap & kept[..., None])
    keep = keep.at[..., i].set(kept)
    return i + 1, count + kept.astype(jnp.int32), keep, suppressed

  init = (jnp.int32(0), jnp.zeros(batch_shape, jnp.int32),
          jnp.zeros(valid.shape, bool), jnp.zeros(valid.shape, bool))
  _, _, keep, _ = jax.lax.while_loop(cond, body, init)
  return keep


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array,
                iou_threshold: float, max_outputs: int) -> tuple[jax.Array, jax.Array]:
  """Per-class greedy NMS for one image (torchvision.ops.batched_nms semantics).

  Args:
    boxes: `[N, 4]` `[ymin, xmin, ymax, xmax]` (normalised or pixels).
    scores: `[N]`; `-inf` (or NaN) marks a candidate that must not be selected.
    classes: int `[N]`; boxes only suppress boxes of their own class.
    iou_threshold: suppress when IoU > threshold.
    max_outputs: static number of output slots.

  Returns:
    `(indices int32 [max_outputs], valid bool [max_outputs])`: indices into the
    inputs of the kept boxes in decreasing score order (ties: lower index
    first); slots past the last kept box have `valid` False and index 0.
  """
  scores = jnp.asarray(scores)
  num = scores.shape[0]
  if num == 0:
    return jnp.zeros((max_outputs,), jnp.int32), jnp.zeros((max_outputs,), bool)
  ok = jnp.isfinite(scores) | (scores == jnp.inf)
  order = jnp.argsort(jnp.where(ok, -scores, jnp.inf), stable=True)
  keep = _greedy_nms_sorted(jnp.asarray(boxes)[order], ok[order], jnp.asarray(classes)[order],
                            iou_threshold, max_outputs)
  slots = jnp.nonzero(keep, size=max_outputs, fill_value=0)[0]
  valid = jnp.arange(max_outputs) < jnp.sum(keep)
  return jnp.where(valid, order[slots], 0).astype(jnp.int32), valid


def decode_scores(outputs: Mapping[str, jax.Array], anchors: jax.Array, post_cfg: Any,
                  variances: Sequence[float] = box_lib.DEFAULT_VARIANCES,
                  two_step: bool = False, arm_filter_threshold: float | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """The part of `detect` before NMS: (boxes `[B, A, 4]` yxyx normalised and
  clipped to [0, 1], class probabilities `[B, A, C]`, two-step filtering applied).

  The ONNX export runs this in the graph and ONNX's NonMaxSuppression after it.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  probs = jax.nn.softmax(outputs['cls_logits'].astype(jnp.float32), axis=-1)
  if two_step:
    if arm_filter_threshold is None:
      arm_filter_threshold = post_cfg['arm_filter_threshold']
    arm_bg = jax.nn.softmax(outputs['arm_logits'].astype(jnp.float32), axis=-1)[..., 0]
    probs = jnp.where((arm_bg > arm_filter_threshold)[..., None], 0.0, probs)
    refined = box_lib.decode_boxes(outputs['arm_deltas'].astype(jnp.float32), anchors, variances)
    anchors = box_lib.yxyx_to_cycxhw(refined)
  boxes = box_lib.decode_boxes(outputs['box_deltas'].astype(jnp.float32), anchors, variances)
  return jnp.clip(boxes, 0.0, 1.0), probs


def detect(outputs: Mapping[str, jax.Array], anchors: jax.Array, post_cfg: Any,
           variances: Sequence[float] = box_lib.DEFAULT_VARIANCES,
           two_step: bool = False,
           arm_filter_threshold: float | None = None) -> dict[str, jax.Array]:
  """Detections from a head's outputs: softmax, decode, per-class NMS, top-K.

  Per image and foreground class: keep scores > `score_threshold`, take the
  `pre_nms_top_k` best, greedy NMS at `nms_iou`; then the `max_detections`
  best over all classes (torchvision's SSD postprocess). Boxes are clipped to
  [0, 1] before NMS, as torchvision does.

  Args:
    outputs: `cls_logits [B, A, C]` (class 0 background), `box_deltas [B, A, 4]`
      `[dy, dx, dh, dw]`; with `two_step` also `arm_logits [B, A, 2]`,
      `arm_deltas [B, A, 4]`.
    anchors: `[A, 4]` `[cy, cx, h, w]` normalised.
    post_cfg: `config.post`: `score_threshold`, `nms_iou`, `pre_nms_top_k`,
      `max_detections` (and optionally `arm_filter_threshold`).
    variances: the box coder's variances.
    two_step: decode `box_deltas` against the refined anchors (decoded
      `arm_deltas`), and zero the class scores of anchors whose step-one
      background probability exceeds `arm_filter_threshold`.
    arm_filter_threshold: overrides `post_cfg.arm_filter_threshold` (default 0.99).

  Returns:
    dict with `boxes [B, K, 4]` yxyx normalised in [0, 1], `scores [B, K]`,
    `labels int32 [B, K]` (1..C-1), `valid bool [B, K]`, K = `max_detections`,
    sorted by decreasing score; invalid slots hold zeros.
  """
  score_threshold = float(post_cfg.score_threshold)
  nms_iou = float(post_cfg.nms_iou)
  max_det = int(post_cfg.max_detections)
  boxes, probs = decode_scores(outputs, anchors, post_cfg, variances, two_step,
                               arm_filter_threshold)
  batch, num_anchors, _ = probs.shape

  # [B, C-1, A]: one row of candidates per foreground class.
  scores = jnp.swapaxes(probs[..., 1:], 1, 2)
  scores = jnp.where(scores > score_threshold, scores, -jnp.inf)
  k = min(int(post_cfg.pre_nms_top_k), num_anchors)
  top_scores, top_idx = jax.lax.top_k(scores, k)                        # [B, C-1, k]
  top_boxes = jnp.take_along_axis(boxes[:, None], top_idx[..., None], axis=2)  # [B, C-1, k, 4]

  keep = _greedy_nms_sorted(top_boxes, top_scores > -jnp.inf, None, nms_iou, max_det)
  kept = jnp.where(keep, top_scores, -jnp.inf).reshape(batch, -1)

  n = min(max_det, kept.shape[1])
  final_scores, flat = jax.lax.top_k(kept, n)
  valid = final_scores > -jnp.inf
  out_boxes = jnp.take_along_axis(top_boxes.reshape(batch, -1, 4), flat[..., None], axis=1)
  labels = (flat // k + 1).astype(jnp.int32)
  pad = max_det - n
  result = {
      'boxes': jnp.where(valid[..., None], out_boxes, 0.0),
      'scores': jnp.where(valid, final_scores, 0.0),
      'labels': jnp.where(valid, labels, 0),
      'valid': valid,
  }
  if pad:
    result = {key: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
              for key, v in result.items()}
  return result
