"""COCO-format detection data (instances json + image folder) via pycocotools.

  <root>/annotations/instances_<split>.json
  <root>/<split>/<file_name>

COCO category ids (1..90 with gaps for COCO 2017) are mapped to contiguous
labels 1..K in increasing id order; `category_ids[k - 1]` maps label k back,
and `coco_image_ids[index]` the example index back, for writing results in
COCO's own ids. `iscrowd` annotations become ignored boxes. Images without
annotations are kept (they test false positives).
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np

from smallssd_jax.datasets import records

# COCO 2017 has no public test labels; the papers report on val (minival).
SPLIT_ALIASES = {'train': 'train2017', 'val': 'val2017', 'validation': 'val2017',
                 'test': 'val2017'}


class CocoSource(records.Source):
  """A COCO instances json with its image folder.

  Args:
    annotation_file: path of `instances_<split>.json`.
    image_dir: folder the json's `file_name`s are relative to.

  The annotations are flattened into arrays at construction, so the source
  pickles quickly into the data-loading worker processes.
  """

  def __init__(self, annotation_file: str, image_dir: str):
    from pycocotools import coco as coco_lib  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(annotation_file):
      raise FileNotFoundError(f'COCO annotation file not found: {annotation_file}')
    self.annotation_file = annotation_file
    self.image_dir = image_dir
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
      coco = coco_lib.COCO(annotation_file)
    self.category_ids = tuple(sorted(coco.cats))
    self.class_names = tuple(coco.cats[c]['name'] for c in self.category_ids)
    label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
    self.coco_image_ids = sorted(coco.imgs)
    self._files, self._sizes, offsets, boxes, labels, crowd = [], [], [0], [], [], []
    for img_id in self.coco_image_ids:
      info = coco.imgs[img_id]
      self._files.append(info['file_name'])
      self._sizes.append((int(info['height']), int(info['width'])))
      anns = coco.imgToAnns.get(img_id, [])
      for a in anns:
        boxes.append(a['bbox'])
        labels.append(label_of.get(a['category_id'], -1))
        crowd.append(bool(a.get('iscrowd', 0)))
      offsets.append(offsets[-1] + len(anns))
    self._offsets = np.array(offsets, np.int64)
    self._boxes_xywh = np.array(boxes, np.float64).reshape(-1, 4)
    self._labels = np.array(labels, np.int32)
    self._crowd = np.array(crowd, bool)

  def __len__(self) -> int:
    return len(self.coco_image_ids)

  def __repr__(self) -> str:
    return f'CocoSource({self.annotation_file!r}, {len(self)} images)'

  def record(self, index: int) -> records.Example:
    index = self.check_index(index)
    path = os.path.join(self.image_dir, self._files[index])
    key = records.file_key(path, os.path.dirname(self.image_dir))
    lo, hi = self._offsets[index], self._offsets[index + 1]
    labels = self._labels[lo:hi]
    if np.any(labels < 0):
      raise records.BadExampleError(key, 'annotation with a category id missing from categories')
    xywh = self._boxes_xywh[lo:hi]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    h, w = self._sizes[index]
    if h <= 0 or w <= 0:
      raise records.BadExampleError(key, f'image size in the json is {h}x{w}')
    problems: list[str] = []
    boxes, keep = records.boxes_from_pixels(xyxy, h, w, problems)
    if not os.path.isfile(path):
      raise records.BadExampleError(key, 'image file is missing')
    return records.make_example(
        image=records.EncodedImage(name=key, path=path), boxes=boxes,
        labels=labels[keep], ignore=self._crowd[lo:hi][keep], image_id=index,
        orig_size=(h, w), key=key, problems=problems)


def coco_paths(root: str, split: str) -> tuple[str, str]:
  """(annotation json, image folder) of a split in the standard COCO layout."""
  split = SPLIT_ALIASES.get(split, split)
  return (os.path.join(root, 'annotations', f'instances_{split}.json'),
          os.path.join(root, split))
