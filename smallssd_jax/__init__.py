"""smallssd_jax: single-shot detectors for small objects in JAX/Flax.

The public surface (docs/design.md §8) is re-exported here; everything else may
move between releases. Submodules load on first use, so `import smallssd_jax`
stays cheap. Importing the package changes no process state: the command-line
entry points set XLA's CPU flags (`apply_cpu_xla_defaults`), a program that
imports the library gets XLA's defaults unless it calls that function before
JAX starts a backend.
"""

import importlib

__version__ = '0.1.0'

_PUBLIC = {
    'iou': 'smallssd_jax.boxes',
    'encode_boxes': 'smallssd_jax.boxes',
    'decode_boxes': 'smallssd_jax.boxes',
    'batched_nms': 'smallssd_jax.postprocess',
    'evaluate': 'smallssd_jax.metrics',
    'load_torchvision_ssd300': 'smallssd_jax.weights',
    'apply_cpu_xla_defaults': 'smallssd_jax._xla',
    'Predictor': 'smallssd_jax.predictor',
    'Detections': 'smallssd_jax.predictor',
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
