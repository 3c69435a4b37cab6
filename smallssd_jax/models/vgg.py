"""VGG16 "reduced fc" backbones with the SSD / RefineDet extra layers (docs/design.md §3, §5).

One module, `VGG16`, returns every named feature map a detector may take as a
source: `conv4_3`, `conv5_3`, `fc7` and the extra layers' outputs (`conv8_2`
... `conv12_2` for SSD, `conv6_2` for RefineDet). Maps listed in
`l2norm_scales` come out L2-normalised with a learned per-channel scale
(ParseNet), as SSD does for conv4_3 and RefineDet for conv4_3 and conv5_3.

Two variants, picked by `variant`:

* 'ssd' (SSD paper, ssd.pytorch, torchvision `ssd300_vgg16`): pool5 3x3 stride
  1 pad 1 keeps the stride-16 grid, fc6 is a 3x3 conv with dilation 6;
* 'refinedet' (RefineDet, SkipFPN-GRF): pool5 2x2 stride 2, fc6 dilation 3,
  then one extra stage conv6_1 1x1-256 / conv6_2 3x3/2-512.

Both decimate the ImageNet fc6/fc7 to 1024 channels (see `weights.py`). pool3
is ceil-mode in both (300 -> 38, 75 -> 38). The backbone has no BatchNorm:
the ImageNet weights it starts from have none.

Layer names match the papers (conv1_1 ... conv5_3, fc6, fc7, conv8_1, ...,
`l2norm_conv4_3`), so converted weights and checkpoints read naturally.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from smallssd_jax.models import layers

Array = jax.Array

# (name, channels) per block; a pool follows every block but the last.
VGG16_BLOCKS = (
    (('conv1_1', 64), ('conv1_2', 64)),
    (('conv2_1', 128), ('conv2_2', 128)),
    (('conv3_1', 256), ('conv3_2', 256), ('conv3_3', 256)),
    (('conv4_1', 512), ('conv4_2', 512), ('conv4_3', 512)),
    (('conv5_1', 512), ('conv5_2', 512), ('conv5_3', 512)),
)

# Extra layers after fc7: (name, channels, kernel, stride, padding), each + ReLU.
EXTRA_LAYERS = {
    # SSD300: two stride-2 stages (19 -> 10 -> 5), two valid 3x3 (5 -> 3 -> 1).
    'ssd300': (
        ('conv8_1', 256, 1, 1, 0), ('conv8_2', 512, 3, 2, 1),
        ('conv9_1', 128, 1, 1, 0), ('conv9_2', 256, 3, 2, 1),
        ('conv10_1', 128, 1, 1, 0), ('conv10_2', 256, 3, 1, 0),
        ('conv11_1', 128, 1, 1, 0), ('conv11_2', 256, 3, 1, 0),
    ),
    # SSD512: four stride-2 stages (32 -> 16 -> 8 -> 4 -> 2), then 4x4 pad 1 (2 -> 1).
    'ssd512': (
        ('conv8_1', 256, 1, 1, 0), ('conv8_2', 512, 3, 2, 1),
        ('conv9_1', 128, 1, 1, 0), ('conv9_2', 256, 3, 2, 1),
        ('conv10_1', 128, 1, 1, 0), ('conv10_2', 256, 3, 2, 1),
        ('conv11_1', 128, 1, 1, 0), ('conv11_2', 256, 3, 2, 1),
        ('conv12_1', 128, 1, 1, 0), ('conv12_2', 256, 4, 1, 1),
    ),
    # RefineDet: one stride-2 stage for the stride-64 source (10 -> 5 at 320).
    'refinedet': (
        ('conv6_1', 256, 1, 1, 0), ('conv6_2', 512, 3, 2, 1),
    ),
    'none': (),
}

# pool5 (kernel, stride, padding) and fc6 dilation per variant.
VARIANTS = {
    'ssd': dict(pool5=(3, 1, 1), fc6_dilation=6),
    'refinedet': dict(pool5=(2, 2, 0), fc6_dilation=3),
}


class VGG16(nn.Module):
  """VGG16 reduced-fc backbone plus extra layers; returns `{name: NHWC map}`.

  Attributes:
    variant: 'ssd' | 'refinedet' (pool5 and fc6 dilation, see module doc).
    extras: key of `EXTRA_LAYERS` ('ssd300' | 'ssd512' | 'refinedet' | 'none').
    width: channel multiplier (`layers.scaled_channels`), 1.0 for the papers.
    l2norm_scales: `((map name, initial scale), ...)`, e.g. `(('conv4_3', 20.0),)`.
    batch_norm: BatchNorm after every conv of the backbone and the extra
      layers (ScratchDet's remedy for training SSD from scratch); the
      pretrained VGG16 weights have none, so it is for from-scratch runs.
    axis_name: mesh axis the BatchNorm statistics are averaged over.
    dtype: compute dtype; parameters stay float32.
    conv, norm: `nn.Conv` / `nn.BatchNorm` or drop-in replacements (models/cpu.py).
  """
  variant: str = 'ssd'
  extras: str = 'ssd300'
  width: float = 1.0
  l2norm_scales: Sequence[tuple[str, float]] = ()
  batch_norm: bool = False
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  conv: layers.ModuleDef = nn.Conv
  norm: layers.ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> dict[str, Array]:
    if self.variant not in VARIANTS:
      raise ValueError(f'unknown VGG16 variant {self.variant!r}; known: {sorted(VARIANTS)}')
    if self.extras not in EXTRA_LAYERS:
      raise ValueError(f'unknown extra layers {self.extras!r}; known: {sorted(EXTRA_LAYERS)}')
    ch = lambda c: layers.scaled_channels(c, self.width)

    def conv_relu(x, c, k, *, name, kernel_init=layers.xavier_uniform, **kw):
      if self.batch_norm:
        return layers.ConvBNReLU(ch(c), k, kernel_init=kernel_init, axis_name=self.axis_name,
                                 dtype=self.dtype, conv=self.conv, norm=self.norm, name=name,
                                 **kw)(x, train)
      return nn.relu(layers.conv2d(ch(c), k, kernel_init=kernel_init, dtype=self.dtype,
                                   conv=self.conv, name=name, **kw)(x))

    l2norm_scales = dict(self.l2norm_scales)
    unknown = set(l2norm_scales) - {'conv4_3', 'conv5_3', 'fc7'}
    if unknown:
      raise ValueError(f'l2norm_scales names {sorted(unknown)}; only conv4_3, conv5_3, fc7 '
                       'can be normalised')
    spec = VARIANTS[self.variant]
    features = {}

    def source(name, x):
      if name in l2norm_scales:
        x = layers.L2Norm(l2norm_scales[name], dtype=self.dtype, name=f'l2norm_{name}')(x)
      features[name] = x

    x = images.astype(self.dtype)
    for block, convs in enumerate(VGG16_BLOCKS):
      for name, channels in convs:
        x = conv_relu(x, channels, 3, padding=1, kernel_init=layers.he_fan_out, name=name)
      if block == 2:
        # pool3 in ceil mode: 75 -> 38 at 300 (Caffe's pooling always rounds up).
        x = layers.max_pool2d(x, 2, 2, ceil_mode=True)
      elif block == 3:
        source('conv4_3', x)  # the un-normalised map continues down the network
        x = layers.max_pool2d(x, 2, 2)
      elif block < 4:
        x = layers.max_pool2d(x, 2, 2)
    source('conv5_3', x)
    x = layers.max_pool2d(x, *spec['pool5'])
    dilation = spec['fc6_dilation']
    x = conv_relu(x, 1024, 3, padding=dilation, dilation=dilation, name='fc6')
    x = conv_relu(x, 1024, 1, padding=0, name='fc7')
    source('fc7', x)
    for name, channels, kernel, stride, padding in EXTRA_LAYERS[self.extras]:
      x = conv_relu(x, channels, kernel, stride=stride, padding=padding, name=name)
      if name.endswith('_2'):
        features[name] = x
    return features


# ------------------------------------------------------------ map sizes ---


def _half_floor(s: int) -> int:
  return s // 2


def _half_ceil(s: int) -> int:
  return -(-s // 2)


def ssd_feature_sizes(input_size: int) -> dict[str, int]:
  """Spatial sizes of the SSD VGG16 reduced-fc sources and extra layers.

  pool1, pool2 floor; pool3 ceil (300 -> 38); pool4 floor; pool5 3x3/1 keeps
  size. Extra layers: 300-style (two stride-2 stages, then two valid 3x3),
  512-style (four stride-2 stages, then a 4x4 pad-1 conv).
  """
  s = _half_floor(_half_floor(input_size))
  conv4_3 = _half_ceil(s)
  fc7 = _half_floor(conv4_3)
  sizes = {'conv4_3': conv4_3, 'fc7': fc7}
  if input_size < 512:
    c8 = _half_ceil(fc7)
    c9 = _half_ceil(c8)
    sizes.update(conv8_2=c8, conv9_2=c9, conv10_2=c9 - 2, conv11_2=c9 - 4)
  else:
    c8 = _half_ceil(fc7)
    c9 = _half_ceil(c8)
    c10 = _half_ceil(c9)
    c11 = _half_ceil(c10)
    sizes.update(conv8_2=c8, conv9_2=c9, conv10_2=c10, conv11_2=c11, conv12_2=c11 - 1)
  return sizes


def refinedet_feature_sizes(input_size: int) -> dict[str, int]:
  """Sizes of the RefineDet VGG16 sources: strides 8, 16, 32, 64."""
  s = _half_floor(_half_floor(input_size))
  conv4_3 = _half_ceil(s)
  conv5_3 = _half_floor(conv4_3)
  fc7 = _half_floor(conv5_3)
  conv6_2 = _half_ceil(fc7)
  return {'conv4_3': conv4_3, 'conv5_3': conv5_3, 'fc7': fc7, 'conv6_2': conv6_2}
