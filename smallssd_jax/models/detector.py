"""A detector is backbone + neck + head, each picked by name from `config.model`.

The registries below map the config's names to small builder functions
`builder(model_cfg, common) -> nn.Module`; `common` carries what every part
shares (width multiplier, compute dtype, BatchNorm axis name). Adding a
backbone, neck or head means adding one builder and one registry entry.

`Detector.__call__(images, train)` with `images [B, S, S, 3]` (already
resized and normalised) returns only arrays:

* `cls_logits [B, A, C]` (class 0 = background), `box_deltas [B, A, 4]`
  (`[dy, dx, dh, dw]` relative to the priors, docs/design.md §2);
* two-step head: also `arm_logits [B, A, 2]` and `arm_deltas [B, A, 4]`.

A = sum over levels of H_l * W_l * anchors_per_location[l], in the prior
generator's order (level, y, x, anchor).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from smallssd_jax.models import dfssd
from smallssd_jax.models import heads
from smallssd_jax.models import layers
from smallssd_jax.models import skipfpn
from smallssd_jax.models import vgg

Array = jax.Array
ConfigDict = ml_collections.ConfigDict

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Common:
  """Settings every part of a detector shares, and the convolution / norm layers it is built of."""
  width: float
  dtype: Any
  axis_name: str | None
  conv: Any = nn.Conv
  norm: Any = nn.BatchNorm

  def channels(self, c: int) -> int:
    return layers.scaled_channels(c, self.width)


class SelectSources(nn.Module):
  """The 'none' neck: the backbone maps named in `sources`, in order."""
  sources: Sequence[str]

  def __call__(self, features: Mapping[str, Array], train: bool = False) -> list[Array]:
    del train
    missing = [s for s in self.sources if s not in features]
    if missing:
      raise ValueError(f'model.sources {missing} are not backbone maps; the backbone makes '
                       f'{sorted(features)}')
    return [features[s] for s in self.sources]


# ------------------------------------------------------------- registries ---


def _vgg16(variant: str, cfg: ConfigDict, common: Common) -> nn.Module:
  return vgg.VGG16(
      variant=variant,
      extras=cfg.extras,
      width=common.width,
      l2norm_scales=tuple((str(k), float(v)) for k, v in cfg.l2norm_scales.items()),
      batch_norm=cfg.backbone_batch_norm,
      axis_name=common.axis_name,
      dtype=common.dtype,
      conv=common.conv,
      norm=common.norm)


def _no_neck(cfg: ConfigDict, common: Common) -> nn.Module:
  del common
  return SelectSources(tuple(cfg.sources))


def _dfssd_neck(cfg: ConfigDict, common: Common) -> nn.Module:
  d = cfg.dfssd
  return dfssd.DFSSDNeck(
      sources=tuple(cfg.sources),
      input_size=cfg.input_size,
      deconv_channels=common.channels(d.deconv_channels),
      deconv_kernel=d.deconv_kernel,
      deconv_stride=d.deconv_stride,
      deconv_padding=d.deconv_padding,
      pool=d.pool,
      deepest=d.deepest,
      fusion_channels=common.channels(d.fusion_channels),
      fusion_weights=tuple(d.fusion_weights),
      fusion_sources=tuple(d.fusion_sources),
      fusion=d.fusion,
      fuse_levels=d.fuse_levels,
      source_norm=d.source_norm,
      source_norm_scale=d.source_norm_scale,
      context_init=d.context_init,
      batch_norm=cfg.batch_norm,
      axis_name=common.axis_name,
      dtype=common.dtype,
      conv=common.conv,
      norm=common.norm)


def _skipfpn_neck(cfg: ConfigDict, common: Common) -> nn.Module:
  s = cfg.skipfpn
  return skipfpn.SkipFPN(
      sources=tuple(cfg.sources),
      channels=common.channels(s.channels),
      skip_depth=s.skip_depth,
      grf_levels=tuple(s.grf_levels),
      grf_reduction=s.grf_reduction,
      batch_norm=cfg.batch_norm,
      axis_name=common.axis_name,
      dtype=common.dtype,
      conv=common.conv,
      norm=common.norm)


Builder = Callable[[ConfigDict, Common], nn.Module]

BACKBONES: dict[str, Builder] = {
    'vgg16_ssd': functools.partial(_vgg16, 'ssd'),
    'vgg16_refinedet': functools.partial(_vgg16, 'refinedet'),
}
NECKS: dict[str, Builder] = {
    'none': _no_neck,
    'dfssd': _dfssd_neck,
    'skipfpn': _skipfpn_neck,
}
HEADS: dict[str, type[nn.Module]] = {
    'ssd': heads.SSDHead,
    'two_step': heads.TwoStepHead,
}


def _lookup(registry: Mapping[str, Any], name: str, what: str) -> Any:
  if name not in registry:
    raise ValueError(f'unknown model.{what} {name!r}; known: {sorted(registry)}')
  return registry[name]


# --------------------------------------------------------------- detector ---


class Detector(nn.Module):
  """backbone -> neck -> head; see the module docstring for the outputs.

  Attributes:
    backbone: images -> `{name: map}`.
    neck: that dict -> list of prediction maps.
    head: prediction maps (and, for two-step heads, the lateral sources) -> outputs.
    sources: the backbone maps the two-step head's ARM reads.
    input_size: the image side the priors were made for; other sizes are refused.
  """
  backbone: nn.Module
  neck: nn.Module
  head: nn.Module
  sources: Sequence[str]
  input_size: int

  def feature_maps(self, images: Array, train: bool = False) -> tuple[list[Array], list[Array]]:
    """(lateral sources, prediction maps); the lateral list is empty for one-step heads."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (self.input_size, self.input_size, 3):
      raise ValueError(f'images must be [B, {self.input_size}, {self.input_size}, 3] '
                       f'(model.input_size), got {list(images.shape)}')
    features = self.backbone(images, train=train)
    pyramid = self.neck(features, train=train)
    lateral = []
    if self.head.takes_lateral_sources:
      lateral = [features[s] for s in self.sources]
    return lateral, list(pyramid)

  def __call__(self, images: Array, train: bool = False) -> dict[str, Array]:
    lateral, pyramid = self.feature_maps(images, train=train)
    if self.head.takes_lateral_sources:
      return self.head(pyramid, lateral)
    return self.head(pyramid)


def layer_kinds(backend: str | None = None) -> tuple[Any, Any]:
  """(conv, norm) layer classes for `backend` (default: JAX's default backend).

  On a CPU, the drop-in kernels of `models/cpu.py` (the same parameters and
  values, a faster backward pass there); elsewhere Flax's `nn.Conv` / `nn.BatchNorm`.
  """
  from smallssd_jax.models import cpu  # pylint: disable=g-import-not-at-top
  if (backend or jax.default_backend()) == 'cpu':
    return cpu.Conv, cpu.BatchNorm
  return nn.Conv, nn.BatchNorm


def build_detector(model_cfg: ConfigDict, num_anchors: Sequence[int],
                   axis_name: str | None = None, backend: str | None = None) -> Detector:
  """The detector `model_cfg` describes (`config.model`, see `config_blocks.py`).

  Args:
    model_cfg: `backbone`, `neck`, `head` names, `sources`, `input_size`,
      `num_classes` (with background), `width`, `dtype` and the neck's options.
    num_anchors: priors per location for each prediction level
      (`anchors.anchors_per_location(config.anchors)`).
    axis_name: mesh axis over which BatchNorm layers average batch statistics
      in training (the data axis), or None.
    backend: the backend to build the layers for ('cpu', 'gpu', 'tpu'; default
      JAX's default backend), `layer_kinds`. Every choice has the same
      parameters and computes the same function.

  Returns:
    An unbound `Detector`; `init(rng, images, train=False)` makes its variables
    (`params`, plus `batch_stats` when a part has BatchNorm).
  """
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.dtype!r}')
  conv, norm = layer_kinds(backend)
  common = Common(width=float(model_cfg.width), dtype=DTYPES[model_cfg.dtype],
                  axis_name=axis_name, conv=conv, norm=norm)
  backbone = _lookup(BACKBONES, model_cfg.backbone, 'backbone')(model_cfg, common)
  neck = _lookup(NECKS, model_cfg.neck, 'neck')(model_cfg, common)
  head_cls = _lookup(HEADS, model_cfg.head, 'head')
  head = head_cls(num_anchors=tuple(int(a) for a in num_anchors),
                  num_classes=int(model_cfg.num_classes), dtype=common.dtype,
                  head_init=model_cfg.head_init, conv=conv)
  return Detector(backbone=backbone, neck=neck, head=head, sources=tuple(model_cfg.sources),
                  input_size=int(model_cfg.input_size))


# ---------------------------------------------------------------- shapes ---


def _abstract_images(input_size: int, batch: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, input_size, input_size, 3), jnp.float32)


def abstract_variables(module: Detector) -> Any:
  """Variable shapes (`jax.ShapeDtypeStruct`s), without computing anything."""
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False),
                        _abstract_images(module.input_size))


def output_shapes(module: Detector, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Output shapes of `module` on `[batch, S, S, 3]` images, via `jax.eval_shape`."""
  fn = lambda x: module.init_with_output(jax.random.key(0), x, train=False)[0]
  return jax.eval_shape(fn, _abstract_images(module.input_size, batch))


def feature_map_shapes(module: Detector) -> dict[str, list[tuple[int, ...]]]:
  """`{'lateral': [...], 'pyramid': [...]}` per-level `(H, W, C)`, via `jax.eval_shape`."""
  fn = lambda x: module.init_with_output(jax.random.key(0), x, train=False,
                                         method=Detector.feature_maps)[0]
  lateral, pyramid = jax.eval_shape(fn, _abstract_images(module.input_size))
  return {'lateral': [tuple(m.shape[1:]) for m in lateral],
          'pyramid': [tuple(m.shape[1:]) for m in pyramid]}


def check_anchor_count(module: Detector, model_cfg: ConfigDict, expected_anchors: int) -> None:
  """Raises ValueError when the model's prediction count differs from the number of priors.

  The usual cause is a prior config whose `feature_maps` do not match the
  model's maps at `model.input_size`; the message names both.
  """
  got = output_shapes(module)['cls_logits'].shape[1]
  if got == expected_anchors:
    return
  sizes = [shape[:2] for shape in feature_map_shapes(module)['pyramid']]
  num_anchors = list(module.head.num_anchors)
  raise ValueError(
      f'model {model_cfg.name} at input {module.input_size} predicts {got} boxes '
      f'per image (feature maps {sizes}, anchors per location {num_anchors}), but the prior '
      f'config makes {expected_anchors} priors: anchors.feature_maps must equal the model\'s '
      'feature map sizes')
