"""The augmentation ops of a config: `data.augment` by name, then the resize (and normalisation).

Every op is `op(example, rng) -> example` over the whole example; a pipeline
is a list of ops applied in order (`apply`). `train_ops` / `eval_ops` build
the lists from the config and its batch layout (batch_layout.py).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np

from smallssd_jax import batch_layout
from smallssd_jax.datasets import geometry
from smallssd_jax.datasets import photometric
from smallssd_jax.datasets import records
from smallssd_jax.datasets import resize as resize_lib

Example = records.Example
Op = Callable[[Example, np.random.Generator | None], Example]

def op_registry(data_cfg, spec: batch_layout.InputSpec, train: bool = False) -> dict[str, Op]:
  """Name -> op with its parameters from the config (names valid in `data.augment`).

  `train`: the train pipeline's `resize`, which only places the decoded source
  on the `RESAMPLE` layout (the step resamples).
  """
  photo, crop = data_cfg.photometric, data_cfg.crop
  device_pixels = spec.layout(train) != batch_layout.Layout.HOST
  return {
      'photometric': functools.partial(
          photometric.photometric, on_device=device_pixels, prob=float(photo.prob),
          brightness_delta=float(photo.brightness_delta), contrast=tuple(photo.contrast),
          saturation=tuple(photo.saturation), hue_delta=float(photo.hue_delta)),
      'zoom_out': functools.partial(geometry.zoom_out, max_ratio=float(data_cfg.zoom_out_max),
                                    prob=float(data_cfg.zoom_out_prob)),
      'min_iou_crop': functools.partial(
          geometry.min_iou_crop, min_ious=tuple(crop.min_ious), max_trials=int(crop.max_trials),
          scale=tuple(crop.scale), aspect=tuple(crop.aspect)),
      'flip': functools.partial(geometry.flip, prob=float(data_cfg.flip_prob)),
      'resize': functools.partial(
          resize_lib.resize, size=spec.size, fill=batch_layout.fill_colour(data_cfg),
          method=str(data_cfg.resize_method),
          source_canvas=(spec.canvas if spec.layout(train) == batch_layout.Layout.RESAMPLE
                         else None)),
      'normalize': functools.partial(resize_lib.normalize, mean=spec.mean, std=spec.std,
                                     bgr=spec.bgr),
  }


def train_ops(data_cfg, spec: batch_layout.InputSpec) -> list[Op]:
  """The ops of `data.augment`, then resize and (on the host layout) normalize unless listed."""
  registry = op_registry(data_cfg, spec, train=True)
  names = list(data_cfg.augment)
  unknown = [n for n in names if n not in registry]
  if unknown:
    raise ValueError(f'unknown data.augment op(s) {unknown}; known: {sorted(registry)}')
  finals = ['resize']
  if spec.train_layout != batch_layout.Layout.HOST:
    if 'normalize' in names:
      raise ValueError("data.augment lists 'normalize', but with data.pixels_on_device=True "
                       'the train step normalises; drop one of the two')
  else:
    finals.append('normalize')
  names += [n for n in finals if n not in names]
  return [registry[n] for n in names]


def eval_ops(data_cfg, spec: batch_layout.InputSpec, host_normalize: bool | None = None
             ) -> list[Op]:
  """Evaluation: bilinear resize, then normalize on the host layout.

  Args:
    host_normalize: normalise here even on a device layout (for callers that
      feed the model float input themselves); None = the spec's layout.
  """
  ops = [functools.partial(resize_lib.resize, size=spec.size,
                           fill=batch_layout.fill_colour(data_cfg))]
  if host_normalize or (host_normalize is None and spec.eval_layout == batch_layout.Layout.HOST):
    ops.append(functools.partial(resize_lib.normalize, mean=spec.mean, std=spec.std, bgr=spec.bgr))
  return ops


def apply(ops: Sequence[Op], example: Example, rng: np.random.Generator | None) -> Example:
  for op in ops:
    example = op(example, rng)
  return example
