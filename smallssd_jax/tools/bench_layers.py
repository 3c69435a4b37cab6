r"""Per-convolution speed of a config's detector, against the machine's matmul rate and PyTorch.

  python -m smallssd_jax.tools.bench_layers --config=configs/ssd300_voc0712.py [--batch=8] \
      [--steps=3] [--compare-torch] [--json=layers.json] [--config.key=value ...]

Finds every convolution of the model's forward pass (from its jaxpr, so any
detector works), groups identical ones, and times each distinct one alone at
--batch: the forward pass, and forward + backward (the gradients of input and
kernel, what a train step computes). Each is reported in GFLOP/s and as a
share of the rate of this backend's float32 matrix multiply (a 4096^3
`jnp.dot`, timed the same way; large convolutions can exceed it), so one sees
how close the convolutions run to what the machine does best, and how much of
a whole train step they account for (the sum over the model of count x
time).

With --compare-torch (torch installed) the same convolutions run in PyTorch
(`torch.nn.functional.conv2d`, NCHW, `set_num_threads(os.cpu_count())`),
taking turns with ours (`timing.paired_seconds`); the ratio is the median per-round ratio
(above 1: ours is faster). Timings mean something only on an otherwise idle
machine.
"""

from __future__ import annotations

import collections
import os
import statistics
from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags
import jax
import jax.extend
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from smallssd_jax import _xla
from smallssd_jax.tools import bench
from smallssd_jax.tools import timing
from smallssd_jax import task as task_lib

_STEPS = 3


def _jaxprs(value) -> list:
  """The jaxprs inside an equation parameter (calls, custom rules, control flow)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax.extend.core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _jaxprs(v)]
  return []


def find_convolutions(fn: Callable, *args) -> list[dict[str, Any]]:
  """The distinct `conv_general_dilated`s of `fn(*args)` with their counts, in order."""
  counts: collections.OrderedDict = collections.OrderedDict()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive is jax.lax.conv_general_dilated_p:
        lhs, rhs = (v.aval for v in eqn.invars)
        params = tuple(sorted(eqn.params.items()))
        key = (lhs.shape, str(lhs.dtype), rhs.shape, str(rhs.dtype), params)
        counts[key] = counts.get(key, 0) + 1
      for value in eqn.params.values():
        for sub in _jaxprs(value):
          walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return [{'lhs': lhs, 'rhs': rhs, 'dtype': dtype, 'params': dict(params), 'count': n}
          for (lhs, dtype, rhs, _, params), n in counts.items()]


def conv_flops(conv: dict[str, Any]) -> float:
  """Forward FLOPs (2 per multiply-add) of one convolution."""
  out = jax.eval_shape(lambda x, w: jax.lax.conv_general_dilated_p.bind(x, w, **conv['params']),
                       jax.ShapeDtypeStruct(conv['lhs'], conv['dtype']),
                       jax.ShapeDtypeStruct(conv['rhs'], conv['dtype']))
  rhs_spec = conv['params']['dimension_numbers'].rhs_spec  # (out, in, *spatial)
  taps = int(np.prod([conv['rhs'][d] for d in rhs_spec[1:]]))  # in-features (per group) x window
  return 2.0 * float(np.prod(out.shape)) * taps


def matmul_rate(steps: int, n: int = 4096) -> float:
  """GFLOP/s of a float32 n^3 matrix product on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  seconds = timing.median_seconds(lambda: jax.block_until_ready(dot(a, a)), max(3, steps), 1)
  return 2.0 * n ** 3 / seconds / 1e9


def jax_conv_fns(conv: dict[str, Any]):
  """(forward, forward + backward) jitted on fixed random operands, each blocking."""
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, conv['lhs'], conv['dtype'])
  w = jax.random.normal(key_w, conv['rhs'], conv['dtype']) * 0.05
  apply = lambda x, w: jax.lax.conv_general_dilated_p.bind(x, w, **conv['params'])
  forward = jax.jit(apply)
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.square(apply(x, w))), argnums=(0, 1)))
  return (lambda: jax.block_until_ready(forward(x, w)),
          lambda: jax.block_until_ready(grads(x, w)))


def torch_conv(conv: dict[str, Any]):
  """The same convolution in PyTorch (NCHW): (x, w, apply), or None when it has no
  plain `conv2d` equivalent. x and w are random, w in OIHW."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  p = conv['params']
  dn = p['dimension_numbers']
  if (len(conv['lhs']) != 4 or any(d != 1 for d in p['lhs_dilation']) or
      p['batch_group_count'] != 1 or conv['dtype'] != 'float32'):
    return None
  lhs = [conv['lhs'][d] for d in dn.lhs_spec]   # N, C, H, W
  rhs = [conv['rhs'][d] for d in dn.rhs_spec]   # O, I, kh, kw
  (pt, pb), (pl, pr) = p['padding']
  symmetric = (pt, pl) == (pb, pr)
  torch.manual_seed(0)
  x = torch.randn(*lhs, requires_grad=True)
  w = (torch.randn(*rhs) * 0.05).requires_grad_(True)

  def apply():
    return F.conv2d(x if symmetric else F.pad(x, (pl, pr, pt, pb)), w,
                    stride=tuple(p['window_strides']), padding=(pt, pl) if symmetric else 0,
                    dilation=tuple(p['rhs_dilation']), groups=p['feature_group_count'])

  return x, w, apply


def torch_conv_fns(conv: dict[str, Any]):
  """(forward under no_grad, forward + backward) of `torch_conv`, or None."""
  import torch  # pylint: disable=g-import-not-at-top
  made = torch_conv(conv)
  if made is None:
    return None
  x, w, apply = made

  def forward():
    with torch.no_grad():
      apply()

  def train():
    x.grad = w.grad = None
    apply().square().sum().backward()

  return forward, train


def model_convolutions(config, batch: int) -> list[dict[str, Any]]:
  """The distinct convolutions of the config's detector's forward pass at `batch`."""
  detector = task_lib.build_task(config)
  s = int(config.model.input_size)
  image = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: detector.module.init(jax.random.key(0), x, train=False),
                             image)
  return find_convolutions(lambda v, x: detector.module.apply(v, x, train=False), variables,
                           image)


def time_convolutions(convs: list[dict[str, Any]], steps: int, compare_torch: bool,
                      matmul_size: int = 4096) -> dict[str, Any]:
  """Times each convolution alone (and in PyTorch, alternating, when asked and installed)."""
  torch_ok = False
  if compare_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(os.cpu_count() or 1)
      torch_ok = True
    except ImportError:
      torch_ok = False
  peak = matmul_rate(steps, matmul_size)
  rows = []
  for conv in convs:
    flops = conv_flops(conv)
    ours = jax_conv_fns(conv)
    theirs = torch_conv_fns(conv) if torch_ok else None
    row = {'input': list(conv['lhs']), 'kernel': list(conv['rhs']), 'count': conv['count'],
           'stride': list(conv['params']['window_strides']),
           'dilation': list(conv['params']['rhs_dilation']), 'gflop': flops / 1e9}
    for name, index in (('forward', 0), ('train', 1)):
      fns = {'ours': ours[index]}
      if theirs is not None:
        fns['torch'] = theirs[index]
      for fn in fns.values():
        fn()  # compile / warm up
      times = timing.paired_seconds(fns, steps)
      seconds = statistics.median(times['ours'])
      # Forward + backward is three convolutions' worth of FLOPs.
      work = flops * (1 if name == 'forward' else 3)
      row[name] = {'ms': 1e3 * seconds, 'gflops_per_s': work / seconds / 1e9,
                   'of_matmul': work / seconds / 1e9 / peak}
      if 'torch' in times:
        row[name]['torch_ms'] = 1e3 * statistics.median(times['torch'])
        row[name]['ratio'] = statistics.median(
            t / o for o, t in zip(times['ours'], times['torch']))
    rows.append(row)
  total = {name: sum(r['count'] * r[name]['ms'] for r in rows) for name in ('forward', 'train')}
  return {'backend': jax.default_backend(), 'batch': int(convs[0]['lhs'][0]) if convs else 0,
          'matmul_size': matmul_size, 'matmul_gflops_per_s': peak, 'torch': torch_ok,
          'convolutions': rows, 'total_ms': total}


def run(config, batch: int, steps: int, compare_torch: bool) -> dict[str, Any]:
  return time_convolutions(model_convolutions(config, batch), steps, compare_torch)


def format_report(results: dict[str, Any]) -> str:
  n = results['matmul_size']
  lines = [f"{results['backend']}, batch {results['batch']}: float32 {n}^3 matmul "
           f"{results['matmul_gflops_per_s']:.0f} GFLOP/s (the 'x mm' columns: GFLOP/s "
           "as a share of it)",
           f"{'input':>20s} {'kernel':>18s} {'n':>2s} {'GFLOP':>6s} | {'fwd ms':>7s} "
           f"{'x mm':>7s} | {'fwd+bwd ms':>10s} {'x mm':>7s} | torch ratio fwd, fwd+bwd"]
  for r in results['convolutions']:
    ratio = (f"{r['forward']['ratio']:.2f}, {r['train']['ratio']:.2f}"
             if 'ratio' in r['forward'] else '-')
    lines.append(f"{'x'.join(map(str, r['input'])):>20s} {'x'.join(map(str, r['kernel'])):>18s} "
                 f"{r['count']:>2d} {r['gflop']:6.2f} | {r['forward']['ms']:7.1f} "
                 f"{r['forward']['of_matmul']:7.0%} | {r['train']['ms']:10.1f} "
                 f"{r['train']['of_matmul']:7.0%} | {ratio}")
  t = results['total_ms']
  lines.append(f"all convolutions (count x time): forward {t['forward'] / 1e3:.2f} s, "
               f"forward + backward {t['train'] / 1e3:.2f} s per batch")
  return '\n'.join(lines)


def define_flags() -> None:
  """The command line's flags; defined on demand so that importing the module defines none."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:arg]).',
                                  lock_config=False)
  flags.DEFINE_integer('batch', 8, 'Images per batch.')
  flags.DEFINE_integer('steps', _STEPS, 'Timed calls per convolution (median).')
  flags.DEFINE_bool('compare-torch', False, 'Time PyTorch on the same convolutions.')
  flags.DEFINE_string('json', '', 'Also write the results here.')


def main(argv):
  bench.check_command_line(argv)
  f = flags.FLAGS
  results = run(f.config, f.batch, f.steps, f['compare-torch'].value)
  bench.print_and_save(format_report(results), results, f.json)


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()     # before any JAX backend starts
  define_flags()
  app.run(main)
