"""KITTI 2D object detection in its native layout, with the papers' 3 classes.

  <root>/training/image_2/<id>.png
  <root>/training/label_2/<id>.txt

The 8 KITTI types are grouped as in DF-SSD (docs/design.md §4): pedestrian =
Pedestrian + Person_sitting, vehicle = Car + Van + Truck + Tram, other =
Cyclist + Misc. `DontCare` regions are kept as ignored boxes, one copy per
class, because the KITTI protocol ignores detections of *any* class inside
them while our ignore flag (like VOC's difficult) works per class. Pixel
coordinates are used as written (0-based, continuous).

KITTI's test images have no labels, so `train` / `val` are a deterministic
split of `training/` (a fixed-seed permutation, independent of config.seed):
`data.kitti_val_fraction` of the images go to `val`.
"""

from __future__ import annotations

import os

import numpy as np

from smallssd_jax.datasets import records

KITTI_CLASSES = ('pedestrian', 'vehicle', 'other')
KITTI_TYPE_TO_CLASS = {
    'Pedestrian': 'pedestrian', 'Person_sitting': 'pedestrian',
    'Car': 'vehicle', 'Van': 'vehicle', 'Truck': 'vehicle', 'Tram': 'vehicle',
    'Cyclist': 'other', 'Misc': 'other',
}
_LABEL = {name: i + 1 for i, name in enumerate(KITTI_CLASSES)}
_SPLIT_SEED = 20240601  # fixed: the split must not move with config.seed
SPLIT_ALIASES = {'validation': 'val', 'test': 'val', 'all': 'trainval'}


def type_label(kitti_type: str) -> int | None:
  """1..3 for the 8 object types, None for DontCare; KeyError otherwise."""
  if kitti_type == 'DontCare':
    return None
  return _LABEL[KITTI_TYPE_TO_CLASS[kitti_type]]


def split_ids(ids: list[str], split: str, val_fraction: float) -> list[str]:
  """The deterministic train / val / trainval selection of sorted ids."""
  split = SPLIT_ALIASES.get(split, split)
  ids = sorted(ids)
  if split == 'trainval':
    return ids
  if split not in ('train', 'val'):
    raise ValueError(f'KITTI split must be train, val or trainval, got {split!r}')
  perm = np.random.default_rng(_SPLIT_SEED).permutation(len(ids))
  n_val = int(round(val_fraction * len(ids)))
  chosen = perm[:n_val] if split == 'val' else perm[n_val:]
  return [ids[i] for i in sorted(chosen)]


class KittiSource(records.Source):
  """Native KITTI `training/` folder, grouped into 3 classes."""

  class_names = KITTI_CLASSES

  def __init__(self, root: str, split: str = 'train', val_fraction: float = 0.2):
    self.root = root
    self.split = split
    self.label_dir = os.path.join(root, 'training', 'label_2')
    self.image_dir = os.path.join(root, 'training', 'image_2')
    if not os.path.isdir(self.label_dir):
      raise FileNotFoundError(
          f'KITTI label folder not found: {self.label_dir} (data.root must hold '
          'training/label_2 and training/image_2)')
    ids = [f[:-4] for f in os.listdir(self.label_dir) if f.endswith('.txt')]
    self.ids = split_ids(ids, split, val_fraction)

  def __len__(self) -> int:
    return len(self.ids)

  def __repr__(self) -> str:
    return f'KittiSource({self.root!r}, {self.split!r}, {len(self)} images)'

  def record(self, index: int) -> records.Example:
    index = self.check_index(index)
    stem = self.ids[index]
    label_path = os.path.join(self.label_dir, f'{stem}.txt')
    image_path = os.path.join(self.image_dir, f'{stem}.png')
    label_key = records.file_key(label_path, self.root)
    image_key = records.file_key(image_path, self.root)
    labels, boxes, ignore = parse_kitti_label(label_path, label_key)
    image = records.EncodedImage.read(image_path, image_key)
    h, w = image.size()
    problems: list[str] = []
    boxes_norm, keep = records.boxes_from_pixels(boxes, h, w, problems)
    return records.make_example(
        image=image, boxes=boxes_norm, labels=labels[keep], ignore=ignore[keep],
        image_id=index, orig_size=(h, w), key=image_key, problems=problems)


def parse_kitti_label(path: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads one label_2 file.

  Returns:
    (labels int32 [N] in 1..3, boxes float64 [N, 4] `[left, top, right,
    bottom]` pixels, ignore bool [N]); each DontCare line gives 3 ignored
    boxes, one per class.

  Raises:
    BadExampleError: missing file, short or non-numeric line, unknown type.
  """
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError as e:
    raise records.BadExampleError(key, 'label file is missing') from e
  except (OSError, UnicodeDecodeError) as e:
    raise records.BadExampleError(key, f'cannot read label file: {e}') from e
  labels, boxes, ignore = [], [], []
  for line_no, line in enumerate(lines, 1):
    fields = line.split()
    if not fields:
      continue
    if len(fields) < 8:
      raise records.BadExampleError(
          key, f'line {line_no} has {len(fields)} fields, expected 15: {line!r}')
    try:
      box = [float(v) for v in fields[4:8]]
    except ValueError as e:
      raise records.BadExampleError(key, f'line {line_no}: bad box numbers: {e}') from e
    try:
      label = type_label(fields[0])
    except KeyError as e:
      raise records.BadExampleError(key, f'line {line_no}: unknown type {fields[0]!r}') from e
    if label is None:
      for lab in range(1, len(KITTI_CLASSES) + 1):
        labels.append(lab)
        boxes.append(box)
        ignore.append(True)
    else:
      labels.append(label)
      boxes.append(box)
      ignore.append(False)
  return (np.array(labels, np.int32), np.array(boxes, np.float64).reshape(-1, 4),
          np.array(ignore, bool))
