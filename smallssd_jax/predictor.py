"""From a checkpoint to detections: the model restored for inference, and `Predictor`.

    import smallssd_jax as ssj
    predictor = ssj.Predictor.from_workdir('runs/default')
    found = predictor('street.jpg')                # or a uint8 [H, W, 3] RGB array
    for box, name, score in zip(found.boxes, found.class_names, found.scores):
      print(name, score, box)                      # box: [ymin, xmin, ymax, xmax] pixels

`Predictor` runs what evaluation runs (task.predict: normalisation, the
network, decode, per-class NMS) behind the host's resize, on images of any
size; detect mode (`--mode=detect`) and the exported models are built on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from smallssd_jax import boxes as box_lib
from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import config_blocks
from smallssd_jax import errors
from smallssd_jax import sharding
from smallssd_jax import task as task_lib
from smallssd_jax.datasets import pipeline

def restore_for_inference(config: ml_collections.ConfigDict, source: str,
                          step: int | None = None):
  """(task, state, step, mesh): the model saved in `source` (a workdir, its
  `checkpoints/` or one step's folder), at `step` or the newest intact one.

  Only parameters and BatchNorm statistics are restored, into an abstract
  state (nothing is initialised only to be overwritten).
  """
  mesh = sharding.make_mesh()
  task = task_lib.build_task(config)
  state = task_lib.abstract_train_state(task, config, mesh)
  state, step = ckpt_lib.restore_variables(source, state, step)
  return task, state, step, mesh


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run recorded in `workdir/config.json`."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError:
    raise errors.ConfigError(f'{path} not found: {workdir} is not a training run\'s workdir; '
                             'pass config= (a ConfigDict or "configs/x.py:args")') from None
  except ValueError as e:
    raise errors.ConfigError(f'{path} is not valid JSON ({e})') from None


def run_class_names(config: ml_collections.ConfigDict, source: str | None) -> tuple[str, ...] | None:
  """The class names the run of `source` recorded (train.dump_config writes
  `classes.json` next to `checkpoints/`), else the data's when it is readable,
  else None."""
  if source:
    directory, _ = ckpt_lib.checkpoint_location(source)
    path = os.path.join(os.path.dirname(directory.rstrip('/')), 'classes.json')
    if os.path.exists(path):
      with open(path) as f:
        return tuple(json.load(f))
  try:
    return tuple(pipeline.class_names(config.data))
  except (OSError, ValueError, KeyError) as e:
    logging.warning('No class names (%s): detections carry class ids only.', e)
    return None


@dataclasses.dataclass(frozen=True)
class Detections:
  """One image's detections, best first.

  Attributes:
    boxes: float32 `[n, 4]`, `[ymin, xmin, ymax, xmax]` in pixels of the image
      the predictor was given (not of the model input).
    scores: float32 `[n]`, class probabilities after NMS.
    classes: int32 `[n]`, 1..C-1 (0 is the background, never returned).
    class_names: the name of each detection's class, or None when the run
      recorded none.
  """
  boxes: np.ndarray
  scores: np.ndarray
  classes: np.ndarray
  class_names: tuple[str, ...] | None

  def __len__(self) -> int:
    return len(self.scores)

  @property
  def boxes_xyxy(self) -> np.ndarray:
    """The boxes as `[xmin, ymin, xmax, ymax]` pixels."""
    return self.boxes[:, [1, 0, 3, 2]]

  def to_json(self) -> list[dict[str, Any]]:
    names = self.class_names or [str(int(c)) for c in self.classes]
    return [{'box_yxyx_px': [round(float(v), 2) for v in b], 'score': float(s), 'label': int(c),
             'class': name} for b, s, c, name in zip(self.boxes, self.scores, self.classes, names)]


def check_image(image: Any, where: str) -> np.ndarray:
  """A uint8 `[H, W, 3]` RGB array, or a ValueError naming what is wrong with `image`."""
  image = np.asarray(image)
  if image.ndim == 2:
    raise ValueError(f'{where}: a single-channel image {image.shape}; the detector takes RGB '
                     '[H, W, 3] (np.stack([image] * 3, -1) for grey)')
  if image.ndim != 3:
    raise ValueError(f'{where}: an image is [H, W, 3], got shape {image.shape}')
  if image.shape[-1] != 3:
    hint = ' (drop the alpha channel: image[..., :3])' if image.shape[-1] == 4 else ''
    raise ValueError(f'{where}: {image.shape[-1]} channels, the detector takes 3 (RGB){hint}')
  if image.dtype != np.uint8:
    raise ValueError(f'{where}: dtype {image.dtype}; images are uint8 RGB 0..255')
  if min(image.shape[:2]) < 1:
    raise ValueError(f'{where}: an empty image {image.shape}')
  return image


def _as_image_list(images) -> tuple[list[Any], bool]:
  """(list of images / paths, whether one image was given)."""
  if isinstance(images, (str, os.PathLike)):
    return [images], True
  if isinstance(images, np.ndarray) or isinstance(images, jax.Array):
    if images.ndim == 4:
      return list(np.asarray(images)), False
    return [images], True
  if isinstance(images, Sequence):
    return list(images), False
  raise TypeError(f'images: a path, a uint8 [H, W, 3] array, a [B, H, W, 3] array or a list of '
                  f'those, got {type(images).__name__}')


class Predictor:
  """Images in, detections out, with a trained detector.

  Resize (the run's evaluation resize, on the host), normalisation, the
  network, decode and per-class NMS (on the device) in one compiled function
  per batch size, reused across calls. Batches are split over the local
  devices (and padded to a multiple of their count).
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: dict[str, Any], *,
               class_names: Sequence[str] | None = None, step: int | None = None,
               task: task_lib.Task | None = None):
    self.config = config
    self.step = step
    self.class_names = tuple(class_names) if class_names is not None else None
    self.task = task if task is not None else task_lib.build_task(config)
    self.spec = self.task.inputs
    self.input_size = int(config.model.input_size)
    self.mesh = sharding.make_mesh(jax.local_devices())
    self.variables = jax.device_put(variables, sharding.replicated(self.mesh))
    self._predict = task_lib.make_predict_fn(self.task, config, self.mesh)
    self.post_threshold = float(config.post.score_threshold)
    self.max_outputs = int(config.post.max_detections)
    self._warned_threshold = False

  # ------------------------------------------------------------ builders ---

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, which: str = 'latest',
                   config: ml_collections.ConfigDict | str | None = None) -> 'Predictor':
    """The detector a training run saved.

    Args:
      workdir: the run's `--workdir`.
      step: a given checkpoint step (overrides `which`).
      which: 'latest' (the newest intact checkpoint) or 'best' (the step with
        the highest evaluated mAP among the run's `eval/step_N/` records).
      config: the run's config (a ConfigDict, or 'configs/x.py:args'); by
        default the `config.json` the run recorded.
    """
    if which not in ('latest', 'best'):
      raise ValueError(f"which={which!r}: 'latest' or 'best'")
    if isinstance(config, str):
      config = config_blocks.load_config(config)
    config = config if config is not None else read_run_config(workdir)
    if step is None and which == 'best':
      step = ckpt_lib.BestEvaluated(workdir).best_step()
      if step is None:
        raise errors.CheckpointError(f'which="best": no evaluation with a finite mAP in '
                                     f'{os.path.join(workdir, "eval")}')
    return cls.from_checkpoint(config, workdir, step=step)

  @classmethod
  def from_checkpoint(cls, config: ml_collections.ConfigDict, source: str,
                      step: int | None = None) -> 'Predictor':
    """The detector `config` describes, restored from `source` (a workdir, its
    `checkpoints/` or one step's folder) at `step` or the newest intact one."""
    task, state, step, _ = restore_for_inference(config, source, step)
    return cls(config, task_lib.variables_of(state), step=step, task=task,
               class_names=run_class_names(config, source))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | str, variables: dict[str, Any],
                  class_names: Sequence[str] | None = None) -> 'Predictor':
    """A detector from a config and its Flax variables (`params`, `batch_stats`)."""
    if isinstance(config, str):
      config = config_blocks.load_config(config)
    task = task_lib.build_task(config)
    expected = jax.eval_shape(lambda: task_lib.init_variables(task, config, task_lib.init_rng(0)))
    missing = sorted(set(expected) - set(variables))
    if missing:
      raise errors.CheckpointError(f'variables lack {missing} (the model needs {sorted(expected)})')
    given = {k: np.shape(v) for k, v in ckpt_lib.flat_arrays(dict(variables)).items()}
    ckpt_lib.check_shapes(given, dict(expected), 'the given variables', source='the variables')
    if class_names is None:
      class_names = run_class_names(config, None)
    return cls(config, variables, class_names=class_names, task=task)

  # ----------------------------------------------------------- inference ---

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """One uint8 RGB image -> the model's evaluation input for it (resized)."""
    return pipeline.preprocess_for_inference(image, self.config, self.spec)

  def _check_limits(self, score_threshold, max_detections) -> tuple[float, int]:
    threshold = (float(self.config.detect.score_threshold) if score_threshold is None
                 else float(score_threshold))
    if threshold < self.post_threshold and not self._warned_threshold:
      self._warned_threshold = True
      logging.warning('score_threshold=%g is below post.score_threshold=%g: candidates under '
                      '%g were already dropped before NMS (lower post.score_threshold to see '
                      'them).', threshold, self.post_threshold, self.post_threshold)
    count = self.max_outputs if max_detections is None else int(max_detections)
    if not 0 < count <= self.max_outputs:
      raise ValueError(f'max_detections={count}: 1..{self.max_outputs} (post.max_detections)')
    return threshold, count

  def raw(self, prepared: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed-size outputs of `task.predict` for prepared `[B, S, S, 3]` inputs.

    `boxes` are normalised yxyx; `valid` marks the filled slots. The batch is
    padded to a multiple of the local device count and trimmed after.
    """
    n = prepared.shape[0]
    pad = -n % self.mesh.size
    if pad:
      prepared = np.concatenate([prepared, np.repeat(prepared[-1:], pad, 0)])
    images = jax.device_put(prepared, sharding.batch_sharding(self.mesh))
    out = jax.device_get(self._predict(self.variables, images))
    return {k: v[:n] for k, v in out.items()}

  def __call__(self, images, *, score_threshold: float | None = None,
               max_detections: int | None = None):
    """Detections for one image (a `Detections`) or a batch (a list of them).

    Args:
      images: a uint8 `[H, W, 3]` RGB array or an image file path (one
        image), or a `[B, H, W, 3]` array or a list of arrays / paths of any
        sizes (a batch).
      score_threshold: keep detections scoring at least this (default
        `config.detect.score_threshold`).
      max_detections: at most this many per image (default and upper bound
        `config.post.max_detections`).
    """
    items, single = _as_image_list(images)
    threshold, count = self._check_limits(score_threshold, max_detections)
    if not items:
      return []
    arrays = []
    for i, item in enumerate(items):
      if isinstance(item, (str, os.PathLike)):
        arrays.append(pipeline.load_image_rgb(str(item)))
      else:
        arrays.append(check_image(item, f'image {i}' if not single else 'the image'))
    prepared = np.stack([self.preprocess(a) for a in arrays])
    out = self.raw(prepared)
    results = [self._detections(out, i, a.shape[:2], threshold, count)
               for i, a in enumerate(arrays)]
    return results[0] if single else results

  def _detections(self, out, i: int, size, threshold: float, count: int) -> Detections:
    keep = out['valid'][i] & (out['scores'][i] >= threshold)
    keep &= np.cumsum(keep) <= count
    boxes = box_lib.normalised_to_pixels(out['boxes'][i][keep], size).astype(np.float32)
    classes = out['labels'][i][keep].astype(np.int32)
    names = None
    if self.class_names is not None:
      names = tuple(self.class_names[c - 1] if 0 < c <= len(self.class_names) else str(c)
                    for c in classes)
    return Detections(boxes=boxes, scores=out['scores'][i][keep].astype(np.float32),
                      classes=classes, class_names=names)

  def stream(self, frames: Iterable[np.ndarray], batch_size: int = 1, **kwargs
             ) -> Iterator[tuple[np.ndarray, Detections]]:
    """(frame, detections) for each frame of an iterable (a video reader, a camera).

    Frames are grouped `batch_size` at a time (one compiled function per
    size: the last group of a finite stream may be smaller).
    """
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size}: at least 1')
    group = []
    for frame in frames:
      group.append(frame)
      if len(group) == batch_size:
        yield from zip(group, self(group, **kwargs))
        group = []
    if group:
      yield from zip(group, self(group, **kwargs))
