"""Drop-in CPU kernels for the model's convolutions and BatchNorm (models/detector.py).

`Conv` and `BatchNorm` take `nn.Conv`'s and `nn.BatchNorm`'s arguments (the
subset the models use) and make the same parameters and statistics under
the same names, so checkpoints and weight files load into either. The
detector builder swaps them in when it builds for a CPU backend; on GPU / TPU
the models run Flax's own layers. They compute the same values: only how XLA's
CPU backend is asked for the backward pass differs. Measured timings are in
docs/performance.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------- per-channel sums ---
#
# XLA's CPU backend reduces the leading axes of an NHWC map (a bias gradient,
# BatchNorm statistics) with a strided loop several times slower than the same
# sum written as a matrix-vector product with a vector of ones
# (docs/performance.md). Other backends keep the plain reduction.


def _ones_matvec(x: Array) -> Array:
  flat = x.reshape(-1, x.shape[-1])
  ones = jnp.ones((flat.shape[0],), flat.dtype)
  return jnp.matmul(ones, flat, preferred_element_type=jnp.float32).astype(x.dtype)


def channel_sum(x: Array) -> Array:
  """`x.sum(axis=all but the last)`, as a GEMV on the CPU and a reduction elsewhere."""
  def reduce(v):
    return jnp.sum(v, axis=tuple(range(v.ndim - 1)), dtype=jnp.float32).astype(v.dtype)
  return jax.lax.platform_dependent(x, cpu=_ones_matvec, default=reduce)


@jax.custom_vjp
def add_bias(x: Array, bias: Array) -> Array:
  """`x + bias` over the last axis, whose bias gradient is a `channel_sum`."""
  return x + bias


def _add_bias_fwd(x, bias):
  return x + bias, None


def _add_bias_bwd(_, g):
  return g, channel_sum(g)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# ------------------------------------------ convolution weight gradients ---
#
# A convolution's weight gradient reads its input transposed to [C, H, W, N].
# XLA's CPU backend fuses the elementwise ops that produced that input (the
# previous layer's bias add and ReLU) into the transpose, recomputing them in
# a loop several times slower than its own plain transpose (docs/performance.md).
# `conv_nhwc` therefore saves its input for the backward pass as the result of
# a conditional, which fusion cannot look into, so the transposes read the
# stored activation. An optimization barrier or a one-trip while loop does not
# survive XLA's CPU pipeline. Other backends save the input as it is.


def _stored(x: Array, anchor: Array) -> Array:
  """`x`, passed through a conditional whose predicate is always true.

  The predicate comes from `anchor` (a kernel: replicated, so no device
  needs another's data) and holds for every value, NaN included; XLA cannot
  fold it, so the conditional stays.
  """
  v = anchor.reshape(-1)[0]
  return jax.lax.cond((v == v) | (v != v), lambda u: u, jnp.zeros_like, x)


def _conv_apply(x: Array, kernel: Array, spec: tuple[int, int, int]) -> Array:
  stride, padding, dilation = spec
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride,) * 2, padding=((padding, padding),) * 2,
      rhs_dilation=(dilation,) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_nhwc(x: Array, kernel: Array, spec: tuple[int, int, int]) -> Array:
  """NHWC x HWIO convolution, `spec` = (stride, padding, dilation), symmetric padding."""
  return _conv_apply(x, kernel, spec)


def _conv_fwd(x, kernel, spec):
  saved = jax.lax.platform_dependent(x, kernel, cpu=_stored, default=lambda u, _: u)
  return _conv_apply(x, kernel, spec), (saved, kernel)


def _conv_bwd(spec, residuals, g):
  # The convolution is linear in each argument: transpose each map (no forward pass).
  x, kernel = residuals
  (dx,) = jax.linear_transpose(lambda u: _conv_apply(u, kernel, spec), x)(g)
  (dkernel,) = jax.linear_transpose(lambda k: _conv_apply(x, k, spec), kernel)(g)
  return dx, dkernel


conv_nhwc.defvjp(_conv_fwd, _conv_bwd)


def _square(values: Sequence[int] | int, what: str) -> int:
  values = (values, values) if isinstance(values, int) else tuple(values)
  if len(set(values)) != 1:
    raise ValueError(f'cpu.Conv handles square {what} only, got {values}')
  return int(values[0])


class Conv(nn.Module):
  """`nn.Conv` for square kernels with explicit symmetric padding, for the CPU's backward pass.

  The same arguments (those the models use), the same `kernel` (HWIO) and
  `bias`; the convolution is `conv_nhwc` and the bias is added by `add_bias`.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | int = 1
  padding: Any = 0
  kernel_dilation: Sequence[int] | int = 1
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = _square(self.kernel_size, 'kernels')
    pads = self.padding
    if isinstance(pads, int):
      p = pads
    else:
      flat = {v for pair in pads for v in pair}
      if len(flat) != 1:
        raise ValueError(f'cpu.Conv handles equal padding on every side, got {pads}')
      p = flat.pop()
    dtype = self.dtype or x.dtype
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    y = conv_nhwc(x.astype(dtype), kernel.astype(dtype),
                  (_square(self.strides, 'strides'), int(p),
                   _square(self.kernel_dilation, 'dilations')))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = add_bias(y, bias.astype(dtype))
    return y


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over the last axis, with its variable names and arithmetic.

  Batch statistics are `channel_sum`s (see above); the running averages
  follow `momentum` as in Flax (0.9 is PyTorch's 0.1), the variance is the
  biased `E[x^2] - E[x]^2` (Flax's fast variance), and with `axis_name` the
  statistics are averaged over that axis.
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (c,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      n = x32.size // c
      moments = jnp.stack([channel_sum(x32), channel_sum(x32 * x32)]) / n
      if self.axis_name is not None and not self.is_initializing():
        moments = jax.lax.pmean(moments, self.axis_name)
      mean = moments[0]
      var = jnp.maximum(0.0, moments[1] - mean * mean)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x32 * mul + (bias - mean * mul)
    return y.astype(self.dtype or x.dtype)
