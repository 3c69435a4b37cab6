"""Detect mode: detections drawn on images, and their JSON record."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from smallssd_jax import boxes as box_lib
from smallssd_jax import errors
from smallssd_jax import sharding
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import records as dataset_records

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.webp')
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def image_paths(spec: str) -> list[pathlib.Path]:
  """The images of a folder (sorted), or the one image `spec` names."""
  path = pathlib.Path(spec)
  if path.is_dir():
    paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
      raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {path}')
    return paths
  if path.is_file():
    return [path]
  raise FileNotFoundError(f'detect.input not found: {spec}')


def class_name(class_names, label: int) -> str:
  return class_names[label - 1] if 0 < label <= len(class_names) else str(label)


def draw_detections(image: np.ndarray, boxes_px: np.ndarray, scores: np.ndarray,
                    labels: np.ndarray, class_names, out_path: str) -> None:
  """Draws yxyx pixel boxes with class names and scores; writes a PNG."""
  pil = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(pil)
  for (y0, x0, y1, x1), s, c in zip(boxes_px, scores, labels):
    color = _PALETTE[(int(c) - 1) % len(_PALETTE)]
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    draw.text((x0 + 2, max(0, y0 - 11)), f'{class_name(class_names, int(c))} {s:.2f}', fill=color)
  pil.save(out_path)


def output_names(names: list[str]) -> list[str]:
  """A distinct picture name per input: its stem, or stem_suffix where stems repeat (a.jpg, a.png)."""
  paths = [pathlib.Path(n) for n in names]
  stems = [p.stem for p in paths]
  out = []
  for p, stem in zip(paths, stems):
    clash = stems.count(stem) > 1
    out.append(f'{stem}_{p.suffix.lstrip(".").lower()}.png' if clash and p.suffix else f'{stem}.png')
  if len(set(out)) != len(out):
    out = [f'{i:05d}_{name}' for i, name in enumerate(out)]
  return out


def detect_images(config: ml_collections.ConfigDict, predict_fn: Callable, variables,
                  mesh: jax.sharding.Mesh, images: list[tuple[str, Callable[[], np.ndarray]]],
                  out_dir: str) -> list[dict]:
  """Detection on (name, load) pairs, `load()` giving uint8 HWC RGB; writes PNGs and detections.json.

  An image that cannot be read is skipped with a warning naming it and recorded
  in detections.json with its error (its record has no detections); when no
  image can be read the run fails.
  """
  class_names = pipeline.class_names(config.data)
  os.makedirs(out_dir, exist_ok=True)
  records, skipped = [], []
  threshold = config.detect.score_threshold
  spec = pipeline.input_spec(config)
  for (name, load), picture in zip(images, output_names([n for n, _ in images])):
    try:
      image = load()
    except (dataset_records.BadExampleError, OSError, ValueError) as e:
      logging.warning('Skipping %s: %s', name, e)
      skipped.append(name)
      records.append({'image': name, 'error': str(e), 'detections': []})
      continue
    prepared = pipeline.preprocess_for_inference(image, config, spec)
    # One image, repeated so that the batch divides evenly over the mesh.
    batch = {'image': np.repeat(prepared[None], mesh.size, 0)}
    out = jax.device_get(predict_fn(variables, sharding.to_global_batch(batch, mesh)['image']))
    keep = out['valid'][0] & (out['scores'][0] >= threshold)
    h, w = image.shape[:2]
    boxes = box_lib.normalised_to_pixels(out['boxes'][0][keep], (h, w))
    scores, labels = out['scores'][0][keep], out['labels'][0][keep]
    draw_detections(image, boxes, scores, labels, class_names, os.path.join(out_dir, picture))
    records.append({'image': name, 'picture': picture, 'detections': [
        {'box_yxyx_px': [round(float(v), 2) for v in b], 'score': float(s), 'label': int(c),
         'class': class_name(class_names, int(c))}
        for b, s, c in zip(boxes, scores, labels)]})
  with open(os.path.join(out_dir, 'detections.json'), 'w') as f:
    json.dump(records, f, indent=1)
  if skipped:
    print(f'Skipped {len(skipped)} unreadable image(s): {", ".join(skipped)}', flush=True)
    if len(skipped) == len(records):
      raise errors.RunError(f'none of the {len(skipped)} images could be read (see the warnings)')
  return records


def eval_examples(config: ml_collections.ConfigDict, count: int):
  """(name, load) of the first `count` examples of the eval split."""
  source = pipeline.get_source(config.data, config.data.eval_split)
  return [(f'{config.data.name}_{config.data.eval_split}_{i}',
           lambda i=i: source[i]['image']) for i in range(min(count, len(source)))]


def folder_images(spec: str):
  """(path, load) for every image of `detect.input` (a folder, or one image)."""
  return [(str(p), lambda p=p: pipeline.load_image_rgb(str(p))) for p in image_paths(spec)]
