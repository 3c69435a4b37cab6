"""SkipFPN-GRF neck: skip feature pyramid with global receptive field modules (docs/design.md §5).

Sources (RefineDet's VGG16): conv4_3, conv5_3 (both L2-normalised), fc7,
conv6_2 at strides 8, 16, 32, 64 (40/20/10/5 at 320, 64/32/16/8 at 512).

* lateral: conv3x3-C + BN + ReLU twice on each source (the paper's fig. 3), C = 256;
* `global_receptive_field` on the levels in `grf_levels`, applied to the
  lateral maps before the pyramid (our reading of "where");
* `skip_pyramid`, top down: `P_l = ReLU(L_l + sum_{d=1..D} deconv_d(P_{l+d}))`
  followed by conv3x3-C + BN + ReLU, `deconv_d` a transposed conv with kernel
  and stride 2^d (2x2/2 from the adjacent level, 4x4/4 from the next), one per
  (source level, target level) pair.

At the papers' sizes every upsampled map lands exactly on its target. At other
input sizes a stride-2 stage may have rounded up (e.g. 300: 38, 19, 10, 5), so
a deconv output can be a pixel too large or small: it is cropped or
zero-padded at the bottom/right, which keeps the top-left alignment that a
kernel == stride transposed conv has (input cell i covers output cells
s*i .. s*i + s - 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from smallssd_jax.models import layers

Array = jax.Array


class GlobalReceptiveField(nn.Module):
  """The paper's GRF module (fig. 4), RFB-like, output width = input width.

  1x1 reduce to `C / reduction`; three branches (1x1 -> 3x3 d1), (3x3 -> 3x3
  d3), (5x5 -> 3x3 d5); concatenate; 1x1 back to C; add the input; ReLU. As in
  RFBNet, the last conv of each branch and the 1x1 back are linear (BN, no
  ReLU) so the residual sum is not clipped twice.
  """
  reduction: int = 4
  batch_norm: bool = True
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  conv: layers.ModuleDef = nn.Conv
  norm: layers.ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    channels = x.shape[-1]
    reduced = max(8, channels // self.reduction)

    def conv(features, kernel, name, dilation=1, relu=True):
      return layers.ConvBNReLU(features, kernel, dilation=dilation, batch_norm=self.batch_norm,
                               relu=relu, axis_name=self.axis_name, dtype=self.dtype,
                               conv=self.conv, norm=self.norm, name=name)

    y = conv(reduced, 1, 'reduce')(x, train)
    branches = []
    for i, (kernel, dilation) in enumerate(((1, 1), (3, 3), (5, 5))):
      b = conv(reduced, kernel, f'branch{i}_conv{kernel}x{kernel}')(y, train)
      b = conv(reduced, 3, f'branch{i}_dilated{dilation}', dilation=dilation, relu=False)(b, train)
      branches.append(b)
    y = conv(channels, 1, 'project', relu=False)(jnp.concatenate(branches, axis=-1), train)
    return nn.relu(x + y)


class SkipFPN(nn.Module):
  """Backbone feature dict -> SkipFPN-GRF pyramid maps, in `sources` order.

  Attributes:
    sources: backbone map names, finest first.
    channels: pyramid width C (256 in the paper, already width-scaled).
    skip_depth: D, how many coarser levels feed each level (2 in the paper's
      figure; `len(sources) - 1` connects every level).
    grf_levels: indices of the levels that get a global receptive field module.
    grf_reduction: channel reduction inside the GRF module.
    batch_norm: BN after the convs (the paper's fig. 3 has it).
    axis_name: mesh axis the BN batch statistics are averaged over.
    dtype: compute dtype.
  """
  sources: Sequence[str]
  channels: int = 256
  skip_depth: int = 2
  grf_levels: Sequence[int] = (0, 1, 2, 3)
  grf_reduction: int = 4
  batch_norm: bool = True
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  conv: layers.ModuleDef = nn.Conv
  norm: layers.ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, features: Mapping[str, Array], train: bool = False) -> list[Array]:
    n = len(self.sources)
    bad = [l for l in self.grf_levels if not 0 <= l < n]
    if bad:
      raise ValueError(f'skipfpn.grf_levels {bad} out of range for {n} sources')

    def conv_bn_relu(name):
      return layers.ConvBNReLU(self.channels, 3, batch_norm=self.batch_norm,
                               axis_name=self.axis_name, dtype=self.dtype, conv=self.conv,
                               norm=self.norm, name=name)

    lateral = []
    for level, name in enumerate(self.sources):
      x = features[name]
      x = conv_bn_relu(f'lateral{level}_conv0')(x, train)
      x = conv_bn_relu(f'lateral{level}_conv1')(x, train)
      if level in self.grf_levels:
        x = GlobalReceptiveField(self.grf_reduction, batch_norm=self.batch_norm,
                                 axis_name=self.axis_name, dtype=self.dtype, conv=self.conv,
                                 norm=self.norm, name=f'global_receptive_field{level}')(x, train)
      lateral.append(x)

    # skip_pyramid, built top down so every coarser P is ready.
    pyramid = [None] * n
    for level in reversed(range(n)):
      x = lateral[level]
      for d in range(1, self.skip_depth + 1):
        if level + d >= n:
          break
        up = layers.ConvTranspose2d(self.channels, 2 ** d, 2 ** d, dtype=self.dtype,
                                    name=f'skip_deconv{level + d}_to{level}')(pyramid[level + d])
        x = x + layers.crop_or_pad(up, x.shape[1:3], centred=False)
      pyramid[level] = conv_bn_relu(f'pyramid{level}_conv')(nn.relu(x), train)
    return pyramid
