"""PASCAL VOC in its native VOCdevkit layout.

  <root>/VOC2007/Annotations/<id>.xml
  <root>/VOC2007/JPEGImages/<id>.jpg
  <root>/VOC2007/ImageSets/Main/<split>.txt

VOC pixel coordinates are 1-based; like the devkit (and ssd.pytorch) we
subtract 1 from all four before normalising by the image size, so a box is
`[ymin - 1, xmin - 1, ymax - 1, xmax - 1] / (h, w, h, w)`. (tfds `voc` divides
without the offset; see tfds_sources.py.) `difficult` objects are kept with
`ignore=True`.
"""

from __future__ import annotations

import os
from xml.etree import ElementTree

import numpy as np

from smallssd_jax.datasets import records

VOC_CLASSES = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat',
    'chair', 'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person',
    'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor',
)

# The papers' small-object VOC classes (the DF-SSD tables; docs/design.md §4, §6).
SMALL_OBJECT_CLASSES = ('boat', 'bottle', 'chair', 'pottedplant', 'tvmonitor', 'bird')
_CLASS_TO_LABEL = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}


class VocSource(records.Source):
  """One VOCdevkit year folder and one ImageSets/Main split.

  Args:
    year_dir: e.g. `<VOCdevkit>/VOC2007` (the folder holding Annotations/).
    split: a file name in ImageSets/Main without `.txt` ('trainval', 'test').
    class_names: the classes (default VOC's 20); a name outside them is a bad example.
  """

  def __init__(self, year_dir: str, split: str, class_names: tuple[str, ...] = VOC_CLASSES):
    self.year_dir = year_dir
    self.split = split
    self.class_names = tuple(class_names)
    self._label_of = {name: i + 1 for i, name in enumerate(self.class_names)}
    split_file = os.path.join(year_dir, 'ImageSets', 'Main', f'{split}.txt')
    if not os.path.isfile(split_file):
      raise FileNotFoundError(
          f'VOC split file not found: {split_file} (is data.root a VOCdevkit '
          'folder, and is the split spelled like "VOC2007/trainval"?)')
    with open(split_file) as f:
      self.ids = [line.split()[0] for line in f if line.strip()]

  def __len__(self) -> int:
    return len(self.ids)

  def __repr__(self) -> str:
    return f'VocSource({self.year_dir!r}, {self.split!r}, {len(self)} images)'

  def record(self, index: int) -> records.Example:
    index = self.check_index(index)
    image_id = self.ids[index]
    xml_path = os.path.join(self.year_dir, 'Annotations', f'{image_id}.xml')
    image_path = os.path.join(self.year_dir, 'JPEGImages', f'{image_id}.jpg')
    xml_key = records.file_key(xml_path, os.path.dirname(self.year_dir))
    image_key = records.file_key(image_path, os.path.dirname(self.year_dir))
    names, boxes, difficult = parse_voc_xml(xml_path, xml_key, self._label_of)
    image = records.EncodedImage.read(image_path, image_key)
    h, w = image.size()
    problems: list[str] = []
    # Devkit convention: 1-based pixel indices, hence the -1.
    boxes_norm, keep = records.boxes_from_pixels(boxes - 1.0, h, w, problems)
    labels = np.array([self._label_of[n] for n in names], np.int32)
    return records.make_example(
        image=image, boxes=boxes_norm, labels=labels[keep], ignore=difficult[keep],
        image_id=index, orig_size=(h, w), key=image_key, problems=problems)


def parse_voc_xml(path: str, key: str, label_of: dict[str, int] | None = None
                  ) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Reads one VOC annotation file.

  Returns:
    (class names [N], boxes float64 [N, 4] `[xmin, ymin, xmax, ymax]` in the
    file's 1-based pixels, difficult bool [N]).

  Raises:
    BadExampleError: missing or unparsable file, unknown class, bad numbers.
  """
  try:
    root = ElementTree.parse(path).getroot()
  except FileNotFoundError as e:
    raise records.BadExampleError(key, 'annotation file is missing') from e
  except ElementTree.ParseError as e:
    raise records.BadExampleError(key, f'annotation XML does not parse: {e}') from e
  label_of = _CLASS_TO_LABEL if label_of is None else label_of
  names, boxes, difficult = [], [], []
  for obj in root.iter('object'):
    name = (obj.findtext('name') or '').strip()
    if name not in label_of:
      raise records.BadExampleError(key, f'unknown class name {name!r} (classes: '
                                    f'{", ".join(label_of)})')
    bndbox = obj.find('bndbox')
    if bndbox is None:
      raise records.BadExampleError(key, f'object {name!r} has no <bndbox>')
    try:
      box = [float(bndbox.findtext(t)) for t in ('xmin', 'ymin', 'xmax', 'ymax')]
    except (TypeError, ValueError) as e:
      raise records.BadExampleError(key, f'object {name!r} has a bad <bndbox>: {e}') from e
    names.append(name)
    boxes.append(box)
    difficult.append((obj.findtext('difficult') or '0').strip() == '1')
  return names, np.array(boxes, np.float64).reshape(-1, 4), np.array(difficult, bool)


def folder_class_names(root: str, split: str) -> tuple[str, ...]:
  """The classes of a VOC-style folder of your own: its classes.txt, else every object
  name in the split's annotations, sorted."""
  listed = os.path.join(root, 'classes.txt')
  if os.path.isfile(listed):
    with open(listed) as f:
      return tuple(line.strip() for line in f if line.strip())
  split_file = os.path.join(root, 'ImageSets', 'Main', f'{split}.txt')
  if not os.path.isfile(split_file):
    raise FileNotFoundError(f'VOC split file not found: {split_file}')
  with open(split_file) as f:
    ids = [line.split()[0] for line in f if line.strip()]
  names = set()
  for image_id in ids:
    path = os.path.join(root, 'Annotations', f'{image_id}.xml')
    try:
      tree = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
      continue      # the example itself reports it when it is read
    names.update((obj.findtext('name') or '').strip() for obj in tree.iter('object'))
  names.discard('')
  if not names:
    raise ValueError(f'no object names in the annotations of {split_file}; add a classes.txt')
  return tuple(sorted(names))
