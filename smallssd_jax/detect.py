"""Detect mode: detections drawn on images, and their JSON record."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

from absl import logging
import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from smallssd_jax import errors
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


def draw_detections(image: np.ndarray, boxes_px: np.ndarray, scores: np.ndarray,
                    labels: np.ndarray, names, out_path: str | None = None) -> np.ndarray:
  """Draws yxyx pixel boxes with their class names (one per box) and scores.

  Returns the drawn uint8 RGB image; writes it as a PNG when `out_path` is given.
  """
  pil = Image.fromarray(image).convert('RGB')
  draw = ImageDraw.Draw(pil)
  names = list(names) or [str(int(c)) for c in labels]
  for (y0, x0, y1, x1), s, c, name in zip(boxes_px, scores, labels, names):
    color = _PALETTE[(int(c) - 1) % len(_PALETTE)]
    draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
    draw.text((x0 + 2, max(0, y0 - 11)), f'{name} {s:.2f}', fill=color)
  if out_path:
    pil.save(out_path)
  return np.asarray(pil)


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


def detect_images(predictor: Callable, images: list[tuple[str, Callable[[], np.ndarray]]],
                  out_dir: str, batch_size: int = 8) -> list[dict]:
  """Detection on (name, load) pairs, `load()` giving uint8 HWC RGB; writes PNGs and detections.json.

  `predictor`: a `predictor.Predictor` (any callable taking a list of images
  and returning their `Detections`). An image that cannot be read is skipped
  with a warning naming it and recorded in detections.json with its error
  (its record has no detections); when no image can be read the run fails.
  """
  os.makedirs(out_dir, exist_ok=True)
  records, skipped, pending = [], [], []

  def flush():
    for (name, picture, image, record), found in zip(pending, predictor([p[2] for p in pending])):
      draw_detections(image, found.boxes, found.scores, found.classes, found.class_names or (),
                      os.path.join(out_dir, picture))
      record.update(picture=picture, detections=found.to_json())
    pending.clear()

  for (name, load), picture in zip(images, output_names([n for n, _ in images])):
    try:
      image = load()
    except (dataset_records.BadExampleError, OSError, ValueError) as e:
      logging.warning('Skipping %s: %s', name, e)
      skipped.append(name)
      records.append({'image': name, 'error': str(e), 'detections': []})
      continue
    records.append({'image': name})
    pending.append((name, picture, image, records[-1]))
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
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
