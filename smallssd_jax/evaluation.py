"""Evaluation and detection: restore, predict on device, score on the host.

The jitted device part returns padded detections plus a mask
(`postprocess.detect`); the detections of every process are gathered, the
metric (VOC / COCO / KITTI through `smallssd_jax.metrics.evaluate`) runs once,
on process 0, over the whole split, and its results are broadcast to the
other processes (which need them to keep the same best checkpoint).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any, Iterable

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import metrics as metrics_lib
from smallssd_jax import pixels as pixels_lib
from smallssd_jax import postprocess
from smallssd_jax import presets
from smallssd_jax import train as train_lib
from smallssd_jax import writers
from smallssd_jax.datasets import pipeline
from smallssd_jax.metrics import plots

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.webp')


def predict(variables, images, *, detector: train_lib.Detector, post_cfg, variances):
  """Forward + decode + per-class NMS for a batch (uint8 RGB or float model input)."""
  images = pixels_lib.model_input({'image': images}, detector.pixels)
  outputs = detector.module.apply(variables, images, train=False)
  return postprocess.detect(outputs, detector.anchors, post_cfg, variances=tuple(variances),
                            two_step=detector.two_step)


def make_predict_fn(detector, config, mesh):
  fn = functools.partial(predict, detector=detector, post_cfg=config.post,
                         variances=config.loss.variances)
  return jax.jit(fn, in_shardings=(train_lib.replicated(mesh), train_lib.batch_sharding(mesh)),
                 out_shardings=train_lib.replicated(mesh))


def variables_of(state) -> dict[str, Any]:
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def broadcast_from_process_0(value):
  """Process 0's JSON-serialisable `value` on every process (the others pass anything)."""
  if jax.process_count() == 1:
    return value
  payload = np.zeros(0, np.uint8)
  if jax.process_index() == 0:
    payload = np.frombuffer(json.dumps(value, default=float).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
  buffer = np.zeros(size, np.uint8)
  buffer[:payload.size] = payload
  buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return json.loads(buffer.tobytes().decode())


def _to_pixels(boxes: np.ndarray, size_hw: np.ndarray) -> np.ndarray:
  h, w = float(size_hw[0]), float(size_hw[1])
  return boxes * np.array([h, w, h, w], np.float32)


def small_object_class_ids(class_names: list[str] | None) -> list[int] | None:
  if not class_names:
    return None
  ids = [i + 1 for i, n in enumerate(class_names) if n in presets.VOC_SMALL_OBJECT_CLASSES]
  return ids or None


class Evaluator:
  """Runs the split through the model and scores it; reusable across steps."""

  def __init__(self, config: ml_collections.ConfigDict, detector: train_lib.Detector,
               mesh: jax.sharding.Mesh, split: str | None = None):
    self.config = config
    self.detector = detector
    self.mesh = mesh
    self.split = split or config.data.eval_split
    self.class_names = pipeline.class_names(config.data)
    self.predict = make_predict_fn(detector, config, mesh)

  def collect(self, variables) -> tuple[list[dict], list[dict]]:
    """Ground truth and detections, in original-image pixels, for every example."""
    gts, dets = [], []
    batches = pipeline.make_eval_batches(self.config, self.split, jax.process_index(),
                                         jax.process_count())
    for local in batches:
      batch = train_lib.to_global_batch(local, self.mesh)
      out = self.predict(variables, batch['image'])
      host = {k: _gather(v) for k, v in batch.items() if k != 'image'}
      out = {k: _gather(v) for k, v in out.items()}
      for i in np.flatnonzero(host['example_mask']):
        size = host['orig_size'][i]
        m = host['mask'][i]
        gts.append({
            'boxes': _to_pixels(host['boxes'][i][m], size),
            'labels': host['labels'][i][m],
            'ignore': host['ignore'][i][m],
            'image_size': (int(size[0]), int(size[1])),
            'image_id': int(host['image_id'][i]),
        })
        v = out['valid'][i]
        dets.append({
            'boxes': _to_pixels(out['boxes'][i][v], size),
            'scores': out['scores'][i][v],
            'labels': out['labels'][i][v],
        })
      if self.config.eval.num_examples and len(gts) >= self.config.eval.num_examples:
        gts, dets = gts[:self.config.eval.num_examples], dets[:self.config.eval.num_examples]
        break
    return gts, dets

  def run(self, state, step: int, workdir: str, writer: writers.MetricWriter | None = None,
          ) -> dict[str, float]:
    """Predicts on every process; scores and reports on process 0; returns its results."""
    t0 = time.perf_counter()
    gts, dets = self.collect(variables_of(state))
    t_predict = time.perf_counter() - t0
    results = None
    if jax.process_index() == 0:
      t0 = time.perf_counter()
      results = metrics_lib.evaluate(gts, dets, self.config.eval.metric,
                                     class_names=self.class_names,
                                     small_object_classes=small_object_class_ids(self.class_names))
      results = dict(results, num_images=float(len(gts)), predict_seconds=t_predict,
                     metric_seconds=time.perf_counter() - t0)
      self._report(results, gts, dets, step, workdir, writer)
    return broadcast_from_process_0(results)

  def _report(self, results, gts, dets, step, workdir, writer):
    out_dir = pathlib.Path(workdir) / 'eval' / f'step_{step}'
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / 'results.json', 'w') as f:
      json.dump({'step': step, 'metric': self.config.eval.metric, 'split': self.split,
                 'results': {k: (None if isinstance(v, float) and np.isnan(v) else v)
                             for k, v in results.items()}}, f, indent=2)
    table = metrics_lib.format_table(results, self.class_names)
    (out_dir / 'table.txt').write_text(table + '\n')
    print(f'\nEvaluation at step {step} on {self.config.data.name}:{self.split} '
          f'({len(gts)} images, metric {self.config.eval.metric}):\n{table}', flush=True)
    if self.config.eval.pr_curves:
      curves = metrics_lib.precision_recall(gts, dets, metric=self.config.eval.metric,
                                            num_classes=len(self.class_names))
      plots.plot_pr_curves(curves, self.class_names, str(out_dir / 'pr'))
    if writer is not None:
      writer.write(step, results, prefix='eval/')
    logging.info('Eval step %d: mAP %.4f (predict %.1fs, metric %.2fs)', step,
                 results['mAP'], results['predict_seconds'], results['metric_seconds'])


# ------------------------------------------------------------ entry points ---


def restore_for_inference(config, workdir):
  """Model + variables from `config.eval.checkpoint`, else the workdir's latest."""
  mesh = train_lib.make_mesh()
  detector = train_lib.build(config)
  state = train_lib.abstract_train_state(detector, config, mesh)
  source = config.eval.checkpoint or workdir
  state, step = ckpt_lib.restore_variables(source, state)
  return detector, state, step, mesh


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  detector, state, step, mesh = restore_for_inference(config, workdir)
  return Evaluator(config, detector, mesh).run(state, step=step, workdir=workdir)


def _image_paths(spec: str) -> list[pathlib.Path]:
  path = pathlib.Path(spec)
  if path.is_dir():
    paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
      raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {path}')
    return paths
  if path.is_file():
    return [path]
  raise FileNotFoundError(f'detect.input not found: {spec}')


def draw_detections(image: np.ndarray, boxes_px: np.ndarray, scores: np.ndarray,
                    labels: np.ndarray, class_names: list[str], out_path: str) -> None:
  """Draws yxyx pixel boxes with class names and scores; writes a PNG."""
  palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
             (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
  pil = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(pil)
  for (y0, x0, y1, x1), s, c in zip(boxes_px, scores, labels):
    color = palette[(int(c) - 1) % len(palette)]
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    name = class_names[int(c) - 1] if 0 < int(c) <= len(class_names) else str(int(c))
    draw.text((x0 + 2, max(0, y0 - 11)), f'{name} {s:.2f}', fill=color)
  pil.save(out_path)


def detect_images(config, workdir, images: Iterable[tuple[str, np.ndarray]], out_dir: str,
                  detector=None, state=None, mesh=None) -> list[dict]:
  """Runs detection on (name, uint8 HWC RGB image) pairs; writes PNGs and detections.json."""
  if detector is None:
    detector, state, _, mesh = restore_for_inference(config, workdir)
  predict_fn = make_predict_fn(detector, config, mesh)
  variables = variables_of(state)
  class_names = pipeline.class_names(config.data)
  os.makedirs(out_dir, exist_ok=True)
  records = []
  threshold = config.detect.score_threshold
  for name, image in images:
    prepared = pipeline.preprocess_for_inference(image, config)
    # One image, repeated so that the batch divides evenly over the mesh.
    batch = {'image': np.repeat(prepared[None], mesh.size, 0)}
    out = jax.device_get(predict_fn(variables, train_lib.to_global_batch(batch, mesh)['image']))
    keep = out['valid'][0] & (out['scores'][0] >= threshold)
    h, w = image.shape[:2]
    boxes = _to_pixels(out['boxes'][0][keep], np.array([h, w]))
    scores, labels = out['scores'][0][keep], out['labels'][0][keep]
    stem = pathlib.Path(name).stem
    draw_detections(image, boxes, scores, labels, class_names, os.path.join(out_dir, f'{stem}.png'))
    records.append({'image': name, 'detections': [
        {'box_yxyx_px': [round(float(v), 2) for v in b], 'score': float(s), 'label': int(c),
         'class': class_names[int(c) - 1] if 0 < int(c) <= len(class_names) else str(int(c))}
        for b, s, c in zip(boxes, scores, labels)]})
  with open(os.path.join(out_dir, 'detections.json'), 'w') as f:
    json.dump(records, f, indent=1)
  return records


def detect(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """`--mode=detect`: every image of `config.detect.input` (a folder or one file)."""
  if not config.detect.input:
    raise ValueError('--mode=detect needs --config.detect.input=FOLDER_OR_IMAGE')
  images = ((str(p), pipeline.load_image_rgb(str(p))) for p in _image_paths(config.detect.input))
  out_dir = os.path.join(workdir, 'detect')
  records = detect_images(config, workdir, images, out_dir)
  print(f'Wrote {len(records)} images with detections to {out_dir}', flush=True)
  return records


def detect_eval_examples(config, workdir, detector, state, mesh, count: int) -> str:
  """Pictures of detections on the first `count` examples of the eval split."""
  source = pipeline.get_source(config.data, config.data.eval_split)
  images = ((f'{config.data.name}_{config.data.eval_split}_{i}', source[i]['image'])
            for i in range(min(count, len(source))))
  out_dir = os.path.join(workdir, 'detect')
  detect_images(config, workdir, images, out_dir, detector, state, mesh)
  return out_dir
