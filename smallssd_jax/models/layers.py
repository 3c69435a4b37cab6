"""Building blocks shared by the backbone, the necks and the heads.

Every layer here follows PyTorch's arithmetic exactly (explicit padding,
ceil-mode pooling, transposed-convolution output sizes, adaptive pooling bins),
because weights converted from torchvision must reproduce torchvision's
outputs, and because the papers state their layer sizes in those terms.
All layers take and return NHWC arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
ModuleDef = Any     # a Flax module class (or partial) such as nn.Conv

# ssd.pytorch / torchvision initialise the SSD extra layers and heads with
# Xavier-uniform and zero bias; torchvision's VGG uses He (fan_out) normal.
xavier_uniform = nn.initializers.xavier_uniform()
he_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def scaled_channels(channels: int, width: float) -> int:
  """`channels * width` rounded to a multiple of 8, at least 8.

  Every channel count of the published architectures is a multiple of 8, so
  width 1.0 changes nothing; small widths keep tests tiny without degenerate
  1- or 2-channel layers.
  """
  if width == 1.0:
    return channels
  return max(8, int(round(channels * width / 8.0)) * 8)


def conv2d(features: int, kernel: int, *, stride: int = 1, padding: int | None = None,
           dilation: int = 1, use_bias: bool = True, kernel_init=xavier_uniform,
           dtype: Dtype = jnp.float32, name: str | None = None, conv: ModuleDef = nn.Conv):
  """A square convolution with PyTorch's explicit symmetric zero padding.

  `padding=None` means "same" for odd kernels at stride 1: `dilation * (kernel - 1) // 2`.
  `conv` is `nn.Conv` or a module with its signature and parameter names
  (`models/cpu.py`); parameters are float32 whatever the compute dtype.
  """
  if padding is None:
    padding = dilation * (kernel - 1) // 2
  return conv(features, (kernel, kernel), strides=(stride, stride),
              padding=((padding, padding), (padding, padding)),
              kernel_dilation=(dilation, dilation), use_bias=use_bias, kernel_init=kernel_init,
              dtype=dtype, param_dtype=jnp.float32, name=name)


def batch_norm(train: bool, *, axis_name: str | None = None, scale_init: float = 1.0,
               dtype: Dtype = jnp.float32, name: str | None = None,
               norm: ModuleDef = nn.BatchNorm):
  """BatchNorm over the last axis with PyTorch's defaults (momentum 0.1 = Flax's 0.9, eps 1e-5)."""
  return norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name,
              scale_init=nn.initializers.constant(scale_init), dtype=dtype,
              param_dtype=jnp.float32, name=name)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
  """PyTorch's pooling output size, including its ceil-mode rule.

  In ceil mode the last window must start inside the input or the left
  padding, never wholly in the right padding.
  """
  span = size + 2 * padding - kernel
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + padding:
    out -= 1
  return out


def max_pool2d(x: Array, kernel: int, stride: int, padding: int = 0,
               ceil_mode: bool = False) -> Array:
  """`torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=...)` on NHWC.

  Padding (including the extra right/bottom cells of ceil mode) is -inf, as
  in PyTorch, so it never wins the max.

  Written as an elementwise max over the window's k*k strided views rather
  than `reduce_window`: the forward pass costs the same, but the gradient is
  k*k cheap selects instead of XLA's select-and-scatter, which on the CPU made
  a VGG16 backward pass several times slower.
  """
  b, h, w, c = x.shape
  outs, pads = [], []
  for size in (h, w):
    out = pool_output_size(size, kernel, stride, padding, ceil_mode)
    right = (out - 1) * stride + kernel - size - padding
    outs.append(out)
    pads.append((padding, max(right, 0)))
  neg = jnp.array(-jnp.inf, x.dtype)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=neg)
  oh, ow = outs
  result = None
  for i in range(kernel):
    for j in range(kernel):
      view = jax.lax.slice(xp, (0, i, j, 0),
                           (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                           (1, stride, stride, 1))
      result = view if result is None else jnp.maximum(result, view)
  return result


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
  # PyTorch's adaptive pooling bins: [floor(i*n/o), ceil((i+1)*n/o)).
  return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_pool2d(x: Array, output_size: Sequence[int], mode: str = 'avg') -> Array:
  """`torch.nn.AdaptiveAvgPool2d` / `AdaptiveMaxPool2d` on NHWC ('avg' | 'max').

  Lands exactly on `output_size` for any input size (300 -> 38 uses bins of 7
  and 8 pixels). When the size divides evenly this is plain strided pooling.
  """
  if mode not in ('avg', 'max'):
    raise ValueError(f"pool mode must be 'avg' or 'max', got {mode!r}")
  b, h, w, c = x.shape
  oh, ow = output_size
  if h % oh == 0 and w % ow == 0:
    kh, kw = h // oh, w // ow
    blocks = x.reshape(b, oh, kh, ow, kw, c)
    return blocks.mean(axis=(2, 4)) if mode == 'avg' else blocks.max(axis=(2, 4))
  if mode == 'avg':
    # Separable box sums from cumulative sums: O(HWC) work and a cheap
    # gradient, where averaging matrices cost O(H*W*C*out) (DF-SSD's 300 -> 38
    # pooling of a full-resolution map would cost more than its backbone at
    # small widths).
    def box_mean(v, axis, size, out):
      bins = _adaptive_bins(size, out)
      lo = np.array([a for a, _ in bins], np.int32)
      hi = np.array([b for _, b in bins], np.int32)
      pad = [(0, 0)] * v.ndim
      pad[axis] = (1, 0)
      csum = jnp.cumsum(jnp.pad(v.astype(jnp.float32), pad), axis=axis)
      sums = jnp.take(csum, jnp.asarray(hi), axis=axis) - jnp.take(csum, jnp.asarray(lo), axis=axis)
      shape = [1] * v.ndim
      shape[axis] = out
      return (sums / jnp.asarray((hi - lo).astype(np.float32)).reshape(shape)).astype(x.dtype)
    return box_mean(box_mean(x, 1, h, oh), 2, w, ow)

  # Max is separable too; each bin gathers its (at most k) rows, repeating the
  # last index to fill, which cannot change a max.
  def gather_max(v, axis, size, out):
    bins = _adaptive_bins(size, out)
    k = max(hi - lo for lo, hi in bins)
    idx = np.array([[min(lo + j, hi - 1) for j in range(k)] for lo, hi in bins], np.int32)
    g = jnp.take(v, jnp.asarray(idx.reshape(-1)), axis=axis)
    shape = v.shape[:axis] + (out, k) + v.shape[axis + 1:]
    return g.reshape(shape).max(axis=axis + 1)
  return gather_max(gather_max(x, 1, h, oh), 2, w, ow)


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
  """Bilinear resize with half-pixel centres.

  Upsampling equals PyTorch's `F.interpolate(mode='bilinear',
  align_corners=False)`; downsampling (only used by DF-SSD's `fuse_levels='all'`)
  is antialiased, i.e. averages the area each output pixel covers.
  """
  b, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  # Antialiasing changes nothing when no axis shrinks; asked for only then, the
  # upsampling stays one plain interpolation (which ONNX converters also take).
  shrinks = size[0] < h or size[1] < w
  return jax.image.resize(x, (b, size[0], size[1], c), method='bilinear',
                          antialias=shrinks).astype(x.dtype)


def crop_or_pad(x: Array, size: Sequence[int], centred: bool) -> Array:
  """Zero-pads or crops the spatial axes of `x` to exactly `size`.

  `centred=True` splits the difference evenly (the extra pixel at the
  bottom/right); otherwise all of it goes to the bottom/right, which keeps the
  top-left corner aligned (transposed convolutions of stride s put input cell
  i at output cells s*i .. s*i + s - 1).
  """
  pads = []
  for have, want in zip(x.shape[1:3], size):
    diff = want - have
    before = diff // 2 if centred else 0
    pads.append((before, diff - before))
  if all(p == (0, 0) for p in pads):
    return x
  # lax.pad accepts negative amounts, which crop.
  config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


class ConvTranspose2d(nn.Module):
  """`torch.nn.ConvTranspose2d(in, features, kernel, stride, padding)` on NHWC.

  Output size `(i - 1) * stride + kernel - 2 * padding`, exactly PyTorch's
  (output_padding 0, dilation 1). The kernel is stored HWIO with I the input
  channels, i.e. PyTorch's `[in, out, kh, kw]` weight transposed (2, 3, 0, 1),
  applied unflipped in PyTorch's scatter sense.
  """
  features: int
  kernel: int
  stride: int
  padding: int = 0
  use_bias: bool = True
  kernel_init: Any = xavier_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s, p = self.kernel, self.stride, self.padding
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    if k <= s:
      y = _conv_transpose_disjoint(x.astype(self.dtype), kernel.astype(self.dtype), s, p)
    else:
      # Scatter form == gather form over the stride-dilated input with a
      # spatially flipped kernel and (k - 1 - p) padding (negative pads crop).
      q = k - 1 - p
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype), window_strides=(1, 1),
          padding=((q, q), (q, q)), lhs_dilation=(s, s),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _conv_transpose_disjoint(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  """PyTorch ConvTranspose2d when kernel <= stride: the input cells' patches never overlap.

  Every input cell writes its own k x k patch at (s*i, s*j), so the layer is
  one matmul per cell plus a reshape. The general dilated-convolution form
  would run a k x k convolution over the whole (mostly zero) s-times larger
  grid: for DF-SSD's 38 -> 300 layer about 60x the work, and worse backward.
  """
  b, h, w, _ = x.shape
  k = kernel.shape[0]
  d = kernel.shape[-1]
  patches = jnp.einsum('bhwc,ijcd->bhiwjd', x, kernel)
  patches = jnp.pad(patches, ((0, 0), (0, 0), (0, stride - k), (0, 0), (0, stride - k), (0, 0)))
  full = patches.reshape(b, h * stride, w * stride, d)
  # The scatter form ends at (h - 1) * s + k; PyTorch then drops `padding` per side.
  out_h = (h - 1) * stride + k - 2 * padding
  out_w = (w - 1) * stride + k - 2 * padding
  return full[:, padding:padding + out_h, padding:padding + out_w, :]


class _AxisPlan(NamedTuple):
  """One spatial axis of `deconv_avg_pool`: which input cells and kernel offsets feed each bin.

  Each output bin sums, over its canvas pixels, the kernel offset each pixel
  gets from the one input cell covering it (kernel <= stride: at most one).
  Consecutive pixels from one cell use a contiguous offset range, so a bin is
  a few terms (bin, cell, offset range). Terms are grouped by range, in
  chunks of one common size (zero-padded) so that one batched matmul serves
  every pair of chunks.
  """
  gather: np.ndarray    # [G, n, cells] one-hot: the input cell of each term of chunk g
  scatter: np.ndarray   # [G, n, bins]: 1 / bin size at the term's bin
  chunk_range: np.ndarray  # [G] int: the offset range of chunk g
  ranges: np.ndarray    # [R, kernel]: 1 on the offsets of range r
  bias: np.ndarray      # [bins]: fraction of the bin's pixels inside the deconvolution


def _axis_plan(cells: int, kernel: int, stride: int, padding: int, canvas: int,
               bins: int, max_chunks: int = 10) -> _AxisPlan:
  out_len = (cells - 1) * stride + kernel - 2 * padding
  before = (canvas - out_len) // 2                  # crop_or_pad(centred=True)
  bin_bounds = _adaptive_bins(canvas, bins)
  terms: dict[tuple[int, int], list[tuple[int, int]]] = {}
  bias = np.zeros(bins, np.float64)
  for i, (lo, hi) in enumerate(bin_bounds):
    runs: dict[int, list[int]] = {}
    for y in range(lo, hi):
      v = y - before
      if not 0 <= v < out_len:
        continue                                    # zero padding around the deconvolution
      bias[i] += 1.0 / (hi - lo)
      cell, offset = divmod(v + padding, stride)
      if offset < kernel and cell < cells:
        runs.setdefault(cell, []).append(offset)
    for cell, offsets in runs.items():
      terms.setdefault((min(offsets), max(offsets) + 1), []).append((i, cell))
  keys = sorted(terms)
  counts = [len(terms[key]) for key in keys]
  # The chunk size with the fewest padded terms, in at most `max_chunks` chunks.
  sizes = [n for n in range(1, max(counts) + 1) if sum(-(-c // n) for c in counts) <= max_chunks]
  size = min(sizes or [max(counts)], key=lambda n: (sum(-(-c // n) for c in counts) * n, -n))
  chunks = [(r, terms[key][start:start + size]) for r, key in enumerate(keys)
            for start in range(0, len(terms[key]), size)]
  gather = np.zeros((len(chunks), size, cells), np.float32)
  scatter = np.zeros((len(chunks), size, bins), np.float32)
  for g, (_, members) in enumerate(chunks):
    for q, (i, cell) in enumerate(members):
      gather[g, q, cell] = 1.0
      scatter[g, q, i] = 1.0 / (bin_bounds[i][1] - bin_bounds[i][0])
  ranges = np.zeros((len(keys), kernel), np.float32)
  for r, (lo, hi) in enumerate(keys):
    ranges[r, lo:hi] = 1.0
  return _AxisPlan(gather, scatter, np.array([r for r, _ in chunks], np.int32), ranges,
                   bias.astype(np.float32))


@functools.lru_cache(maxsize=32)
def _cached_axis_plan(*args) -> _AxisPlan:
  return _axis_plan(*args)


def deconv_avg_pool(x: Array, kernel: Array, bias: Array | None, stride: int, padding: int,
                    canvas: Sequence[int], grid: Sequence[int]) -> Array:
  """`adaptive_avg_pool(crop_or_pad(conv_transpose(x), canvas, centred), grid)`, never at canvas size.

  A transposed convolution with kernel <= stride (PyTorch arithmetic, HWIO
  kernel), centred onto the `canvas` and average-pooled into `grid` adaptive
  bins is linear in `x`: each bin is a weighted sum over the few input cells
  it covers of `x[cell] @ sum(kernel over the offsets it sees)`. This computes
  exactly that sum: per axis, the (bin, cell, offset range) terms grouped by
  range, the kernel summed over each pair of ranges, one batched matmul (for
  DF-SSD300 about as many multiplies as 4-6 1x1 convolutions on the grid,
  whatever the kernel size), where the direct form writes and pools a
  `canvas`-sized map.
  """
  k = kernel.shape[0]
  if k > stride:
    raise ValueError(f'deconv_avg_pool needs kernel <= stride, got {k} > {stride}')
  _, h, w, _ = x.shape
  rows = _cached_axis_plan(h, k, stride, padding, int(canvas[0]), int(grid[0]))
  cols = _cached_axis_plan(w, k, stride, padding, int(canvas[1]), int(grid[1]))
  dtype = x.dtype
  c = lambda a: jnp.asarray(a, dtype)
  # The kernel summed over every (row range, column range) pair, then per pair of chunks.
  boxes = jnp.einsum('ro,tq,oqcd->rtcd', c(rows.ranges), c(cols.ranges), kernel.astype(dtype))
  boxes = boxes[rows.chunk_range][:, cols.chunk_range]
  gathered = jnp.einsum('rpy,byxc,tqx->brptqc', c(rows.gather), x, c(cols.gather))
  terms = jnp.einsum('brptqc,rtcd->brptqd', gathered, boxes)
  y = jnp.einsum('rpi,brptqd,tqj->bijd', c(rows.scatter), terms, c(cols.scatter))
  if bias is not None:
    y = y + c(np.outer(rows.bias, cols.bias))[None, :, :, None] * bias.astype(dtype)
  return y


class ConvTransposeAvgPool(nn.Module):
  """`ConvTranspose2d`, centred onto `canvas`, average-pooled into `grid` bins; one layer.

  The same `kernel` / `bias` parameters as `ConvTranspose2d` (checkpoints
  and weight files load either way), computed without the canvas-sized map
  (`deconv_avg_pool`); needs kernel <= stride, as DF-SSD's layers have.
  """
  features: int
  kernel: int
  stride: int
  padding: int
  canvas: Sequence[int]
  grid: Sequence[int]
  kernel_init: Any = xavier_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return deconv_avg_pool(x.astype(self.dtype), kernel, bias, self.stride, self.padding,
                           self.canvas, self.grid)


class ConvBNReLU(nn.Module):
  """Conv, then BatchNorm (when `batch_norm`), then ReLU (when `relu`).

  With BatchNorm the conv has no bias (BN's own shift replaces it). BN uses
  PyTorch's defaults (momentum 0.1, eps 1e-5) and averages its batch
  statistics over `axis_name` when one is given (data-parallel training).
  `conv` / `norm` are `nn.Conv` / `nn.BatchNorm` or drop-in replacements.
  """
  features: int
  kernel: int
  stride: int = 1
  padding: int | None = None
  dilation: int = 1
  batch_norm: bool = True
  relu: bool = True
  kernel_init: Callable = xavier_uniform
  axis_name: str | None = None
  bn_scale_init: float = 1.0
  dtype: Dtype = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = conv2d(self.features, self.kernel, stride=self.stride, padding=self.padding,
               dilation=self.dilation, use_bias=not self.batch_norm,
               kernel_init=self.kernel_init, dtype=self.dtype, name='conv', conv=self.conv)(x)
    if self.batch_norm:
      x = batch_norm(train, axis_name=self.axis_name, scale_init=self.bn_scale_init,
                     dtype=self.dtype, name='bn', norm=self.norm)(x)
    return nn.relu(x) if self.relu else x


class L2Norm(nn.Module):
  """ParseNet / SSD L2 normalisation over channels with a learned per-channel scale.

  `scale * x / max(||x||_2, 1e-12)` (torchvision's `F.normalize`); the norm is
  taken in float32 even under bfloat16 compute, where the sum of 512 squares
  would lose most of its precision.
  """
  init_scale: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.constant(self.init_scale), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    # max(||x||, 1e-12) as torchvision, with the floor under the square root:
    # the same values, and a finite gradient where x is all zero (a ReLU map
    # that is off everywhere at some position, e.g. DF-SSD's 1x1 conv11_2).
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x32), axis=-1, keepdims=True), 1e-24))
    return (x32 / norm * scale).astype(self.dtype)


def count_params(tree: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
