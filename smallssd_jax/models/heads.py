"""Prediction heads: SSD's single-step head and RefineDet's two-step head (docs/design.md §3, §5).

Every level gets a 3x3 conv for class logits (`anchors * classes` channels) and
one for box deltas (`anchors * 4`, ordered `[dy, dx, dh, dw]` per anchor as in
`boxes.py`). Outputs are flattened level by level, row-major over (y, x), then
the anchors of a location, then the values: channel `a * K + k` of the conv
is value k of anchor a. That is torchvision's `SSDScoringHead` order (its
NCHW `view(N, A, K, H, W).permute(0, 3, 4, 1, 2)`), so its weights convert
without reordering, and the anchor generator's order.

Heads return float32 whatever the compute dtype: losses and softmaxes want it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from smallssd_jax.models import layers

Array = jax.Array


def _check_levels(num_anchors: Sequence[int], maps: Sequence[Array], what: str) -> None:
  if len(num_anchors) != len(maps):
    sizes = [tuple(m.shape[1:3]) for m in maps]
    raise ValueError(f'{what}: {len(maps)} feature maps {sizes} but anchors per location are '
                     f'given for {len(num_anchors)} levels ({list(num_anchors)})')


# 'xavier': ssd.pytorch / torchvision (Xavier-uniform, zero bias), right for a
# pretrained backbone. 'small': normal(0.01) as RetinaNet's heads, so a model
# trained from scratch with BatchNorm in the backbone starts from near-zero
# logits and deltas instead of a loss several times the uniform-guess loss.
HEAD_INITS = {
    'xavier': layers.xavier_uniform,
    'small': nn.initializers.normal(0.01),
}


class _LevelPredictor(nn.Module):
  """One 3x3 conv per level with `anchors * values` outputs, flattened to [B, sum HWA, values]."""
  num_anchors: Sequence[int]
  values: int
  dtype: jnp.dtype = jnp.float32
  head_init: str = 'xavier'
  conv: layers.ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, maps: Sequence[Array]) -> Array:
    if self.head_init not in HEAD_INITS:
      raise ValueError(f'model.head_init must be one of {sorted(HEAD_INITS)}, '
                       f'got {self.head_init!r}')
    out = []
    for level, (x, anchors) in enumerate(zip(maps, self.num_anchors)):
      y = layers.conv2d(anchors * self.values, 3, padding=1, dtype=self.dtype,
                        kernel_init=HEAD_INITS[self.head_init], conv=self.conv,
                        name=f'level{level}')(x)
      out.append(y.reshape(y.shape[0], -1, self.values))
    return jnp.concatenate(out, axis=1).astype(jnp.float32)


class SSDHead(nn.Module):
  """SSD's head: per level, per anchor, `num_classes` logits (0 = background) and 4 deltas."""
  num_anchors: Sequence[int]
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  head_init: str = 'xavier'
  conv: layers.ModuleDef = nn.Conv

  takes_lateral_sources: ClassVar[bool] = False

  @nn.compact
  def __call__(self, maps: Sequence[Array]) -> dict[str, Array]:
    _check_levels(self.num_anchors, maps, 'SSD head')
    predictor = lambda values, name: _LevelPredictor(self.num_anchors, values, self.dtype,
                                                     self.head_init, self.conv, name=name)
    return {
        'cls_logits': predictor(self.num_classes, 'classification')(maps),
        'box_deltas': predictor(4, 'regression')(maps),
    }


class TwoStepHead(nn.Module):
  """RefineDet's head: the anchor refinement module (ARM) and the object detection module (ODM).

  The ARM predicts binary objectness logits `[B, A, 2]` (index 1 = object)
  and box deltas relative to the anchors from the lateral sources (the
  backbone maps, after their L2Norm); the ODM predicts class logits and deltas
  relative to the ARM-refined anchors from the pyramid maps. Decoding the
  refined anchors and negative anchor filtering are the loss's and
  post-processing's business, not the model's.
  """
  num_anchors: Sequence[int]
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  head_init: str = 'xavier'
  conv: layers.ModuleDef = nn.Conv

  takes_lateral_sources: ClassVar[bool] = True

  @nn.compact
  def __call__(self, maps: Sequence[Array], lateral: Sequence[Array]) -> dict[str, Array]:
    _check_levels(self.num_anchors, lateral, 'two-step head (ARM)')
    _check_levels(self.num_anchors, maps, 'two-step head (ODM)')
    predictor = lambda values, name: _LevelPredictor(self.num_anchors, values, self.dtype,
                                                     self.head_init, self.conv, name=name)
    return {
        'arm_logits': predictor(2, 'arm_classification')(lateral),
        'arm_deltas': predictor(4, 'arm_regression')(lateral),
        'cls_logits': predictor(self.num_classes, 'odm_classification')(maps),
        'box_deltas': predictor(4, 'odm_regression')(maps),
    }
