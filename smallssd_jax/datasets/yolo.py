"""YOLO-format folders, the layout most labelled datasets are exported in.

  <root>/data.yaml (`names: [a, b]` or `names: {0: a, 1: b}`) or <root>/classes.txt
  <root>/images/<split>/**/<name>.jpg|jpeg|png|bmp|webp
  <root>/labels/<split>/**/<name>.txt   one object per line: `class cx cy w h`,
                                        normalised to [0, 1] by the image size

Class k of the files is label k + 1 here (0 is the background of the models).
An image without a label file is an image without objects. Bad input (a
malformed or empty line, a class index not among the names, a coordinate
outside [0, 1]) raises `records.BadExampleError` naming the file and the line,
which the pipeline turns into an error or a counted, logged skip
(`data.on_bad_example`); a label file without an image is found when the
source is opened: an error, or with 'skip' a logged count.
"""

from __future__ import annotations

import os
import pathlib

from absl import logging
import numpy as np

from smallssd_jax.datasets import records

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
# YOLO coordinates are written with a few decimals: a hair outside [0, 1] is rounding.
_TOLERANCE = 1e-3


def class_names(root: str) -> tuple[str, ...]:
  """The class names of a YOLO folder, from data.yaml (`names`) or classes.txt."""
  yaml_path, txt_path = os.path.join(root, 'data.yaml'), os.path.join(root, 'classes.txt')
  if os.path.isfile(yaml_path):
    import yaml  # pylint: disable=g-import-not-at-top
    with open(yaml_path) as f:
      spec = yaml.safe_load(f) or {}
    names = spec.get('names') if isinstance(spec, dict) else None
    if isinstance(names, dict):
      keys = sorted(names)
      if keys != list(range(len(keys))):
        raise ValueError(f'{yaml_path}: names must be numbered 0..{len(keys) - 1}, got {keys}')
      names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
      raise ValueError(f'{yaml_path}: expected `names:` as a list or a {{index: name}} map')
    return tuple(str(n) for n in names)
  if os.path.isfile(txt_path):
    with open(txt_path) as f:
      names = [line.strip() for line in f if line.strip()]
    if not names:
      raise ValueError(f'{txt_path} lists no class names')
    return tuple(names)
  raise FileNotFoundError(f'{root}: a YOLO folder needs data.yaml (with `names`) or classes.txt')


def parse_label_file(path: str, key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(boxes [N, 4] normalised `[xmin, ymin, xmax, ymax]`, class indices [N]) of a label file."""
  boxes, classes = [], []
  with open(path) as f:
    lines = f.read().splitlines()
  for number, line in enumerate(lines, start=1):
    where = f'line {number}'
    fields = line.split()
    if not fields:
      raise records.BadExampleError(key, f'{where} is empty')
    if len(fields) != 5:
      raise records.BadExampleError(key, f'{where}: expected `class cx cy w h`, got {line!r}')
    try:
      values = [float(v) for v in fields]
    except ValueError:
      raise records.BadExampleError(key, f'{where}: not numbers: {line!r}') from None
    c = values[0]
    if c != int(c) or not 0 <= c < num_classes:
      raise records.BadExampleError(
          key, f'{where}: class index {fields[0]} is not among the {num_classes} names (0..'
          f'{num_classes - 1})')
    cx, cy, w, h = values[1:]
    if not all(-_TOLERANCE <= v <= 1 + _TOLERANCE for v in (cx, cy, w, h)) or not (
        np.isfinite(values).all()):
      raise records.BadExampleError(
          key, f'{where}: coordinates {fields[1:]} outside [0, 1] (YOLO labels are '
          'normalised by the image size)')
    boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    classes.append(int(c))
  return np.array(boxes, np.float64).reshape(-1, 4), np.array(classes, np.int32)


class YoloSource(records.Source):
  """A YOLO folder's split (`images/<split>`, `labels/<split>`).

  Args:
    root: the folder holding data.yaml / classes.txt, images/ and labels/.
    split: 'train', 'val', ... (folder names under images/).
    on_bad_example: 'error' or 'skip': what a label file without an image is.
  """

  def __init__(self, root: str, split: str, on_bad_example: str = 'error'):
    self.root = root
    self.split = split
    self.class_names = class_names(root)
    image_dir = pathlib.Path(root, 'images', split)
    label_dir = pathlib.Path(root, 'labels', split)
    if not image_dir.is_dir():
      raise FileNotFoundError(f'YOLO split folder not found: {image_dir}')
    self._images = sorted(str(p) for p in image_dir.rglob('*')
                          if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    stems = {str(pathlib.Path(p).relative_to(image_dir).with_suffix('')) for p in self._images}
    orphans = sorted(str(p) for p in label_dir.rglob('*.txt')
                     if str(p.relative_to(label_dir).with_suffix('')) not in stems) \
        if label_dir.is_dir() else []
    if orphans:
      message = (f'{len(orphans)} label file(s) without an image in {image_dir}, e.g. '
                 f'{orphans[0]}')
      if on_bad_example == 'error':
        raise records.BadExampleError(orphans[0], message)
      logging.warning('%s: skipped', message)
    self.orphan_labels = orphans
    self._image_dir, self._label_dir = image_dir, label_dir

  def __len__(self) -> int:
    return len(self._images)

  def __repr__(self) -> str:
    return f'YoloSource({self.root!r}, {self.split!r}, {len(self)} images)'

  def label_path(self, index: int) -> pathlib.Path:
    relative = pathlib.Path(self._images[index]).relative_to(self._image_dir)
    return (self._label_dir / relative).with_suffix('.txt')

  def record(self, index: int) -> records.Example:
    index = self.check_index(index)
    path = self._images[index]
    key = records.file_key(path, self.root)
    image = records.EncodedImage.read(path, key)
    h, w = image.size()
    label_path = self.label_path(index)
    if label_path.is_file():
      xyxy, classes = parse_label_file(str(label_path), records.file_key(str(label_path),
                                                                          self.root),
                                       len(self.class_names))
    else:
      xyxy, classes = np.zeros((0, 4)), np.zeros(0, np.int32)
    problems: list[str] = []
    boxes, keep = records.boxes_from_pixels(xyxy * [w, h, w, h], h, w, problems)
    labels = classes[keep] + 1
    return records.make_example(image=image, boxes=boxes, labels=labels,
                                ignore=np.zeros(len(labels), bool), image_id=index,
                                orig_size=(h, w), key=key, problems=problems)
