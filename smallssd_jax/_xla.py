"""CPU defaults for XLA, applied by the command-line entry points (and on request).

On the CPU, XLA's default pipeline hands convolutions to YNNPACK library
fusions whose backward pass is about 3x slower than Eigen's; disabling the
`dot-library-rewriter` pass routes them to Eigen, which makes a VGG16-SSD
train step as fast as PyTorch's on the same machine (forward speed is about
equal either way). The flag must be in `XLA_FLAGS` before the first backend
starts, so the entry points (`python -m smallssd_jax.main` and the tools) add
it first thing, and only when no accelerator plugin is installed: GPU and
TPU builds keep XLA's defaults. Importing the package does not: call
`smallssd_jax.apply_cpu_xla_defaults()` before using JAX to get the same.

Set `SMALLSSD_JAX_XLA_DEFAULTS=0` to leave `XLA_FLAGS` untouched.
"""

from __future__ import annotations

import importlib.util
import os
import sys

CPU_FLAGS = ('--xla_disable_hlo_passes=dot-library-rewriter',)

_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')


def accelerator_plugin_installed() -> bool:
  return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def _backends_started() -> bool:
  # Only look if JAX is already loaded: importing it here would pull JAX into
  # every process that imports the package (grain workers included).
  xla_bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(getattr(xla_bridge, '_backends', None))


def apply_cpu_xla_defaults() -> bool:
  """Adds CPU_FLAGS to XLA_FLAGS when it can still take effect; returns whether it did."""
  if os.environ.get('SMALLSSD_JAX_XLA_DEFAULTS', '1') == '0':
    return False
  if os.environ.get('JAX_PLATFORMS', '').split(',')[0] not in ('', 'cpu'):
    return False
  if accelerator_plugin_installed() and os.environ.get('JAX_PLATFORMS', '') != 'cpu':
    return False
  if _backends_started():
    return False
  flags = os.environ.get('XLA_FLAGS', '')
  missing = [f for f in CPU_FLAGS if f.split('=')[0] not in flags]
  if missing:
    os.environ['XLA_FLAGS'] = ' '.join([flags, *missing]).strip()
  return True
