"""Config -> dataset source: `get_source(data_cfg, split)` and `class_names(data_cfg)`.

`data.name` picks the reader and `data.root` whether it reads a native folder
or tensorflow-datasets:

  builtin_small         generated (builtin.py); splits train, test
  voc   + root          VOCdevkit folder (voc.py); split 'VOC2007/trainval',
                        a union 'VOC2007/trainval+VOC2012/trainval', or a plain
                        'test' when only one year folder has that split (or
                        root is itself a year folder)
  voc   without root    tfds voc/2007, voc/2012 with the same split spelling
                        (trainval -> tfds train+validation)
  kitti + root          KITTI training/ folder (kitti.py); train, val, trainval
  kitti without root    tfds kitti; train, validation, test
  coco  + root          COCO json + images (coco.py); train2017, val2017
  coco  without root    tfds coco/2017 (needs TensorFlow)
  tfds:<name>           any of the tfds datasets above, split in tfds syntax
  custom + root         your own data, `data.format`: 'yolo' (yolo.py: images/<split>,
                        labels/<split>, data.yaml or classes.txt), 'voc' (a VOC-style
                        folder: Annotations/, JPEGImages/, ImageSets/Main/<split>.txt;
                        classes from classes.txt or the train split's annotations),
                        'coco' (annotations/instances_<split>.json, <split>/); the
                        classes are the dataset's
"""

from __future__ import annotations

import os

from smallssd_jax.datasets import builtin
from smallssd_jax.datasets import coco as coco_lib
from smallssd_jax.datasets import kitti as kitti_lib
from smallssd_jax.datasets import records
from smallssd_jax.datasets import tfds_sources
from smallssd_jax.datasets import voc as voc_lib
from smallssd_jax.datasets import yolo as yolo_lib

_YEAR_PREFIX = 'VOC'


def _voc_native(root: str, split: str) -> records.Source:
  parts = []
  for part in split.split('+'):
    part = part.strip()
    if '/' in part:
      year, name = part.rsplit('/', 1)
      parts.append(voc_lib.VocSource(os.path.join(root, year), name))
      continue
    if os.path.isdir(os.path.join(root, 'Annotations')):
      parts.append(voc_lib.VocSource(root, part))
      continue
    years = sorted(d for d in os.listdir(root) if d.startswith(_YEAR_PREFIX) and os.path.isfile(
        os.path.join(root, d, 'ImageSets', 'Main', f'{part}.txt'))) if os.path.isdir(root) else []
    if len(years) != 1:
      raise ValueError(
          f'VOC split {part!r} under {root} is ambiguous or missing (found it in {years}); '
          "spell it like 'VOC2007/test' or 'VOC2007/trainval+VOC2012/trainval'")
    parts.append(voc_lib.VocSource(os.path.join(root, years[0]), part))
  return parts[0] if len(parts) == 1 else records.ConcatSource(parts)


def _voc_tfds(data_cfg, split: str) -> records.Source:
  parts = []
  for part in split.split('+'):
    year, _, name = part.strip().rpartition('/')
    year = year.replace(_YEAR_PREFIX, '') or '2007'
    parts.append(_tfds(data_cfg, f'voc/{year}', tfds_sources.VOC_SPLITS.get(name, name)))
  return parts[0] if len(parts) == 1 else records.ConcatSource(parts)


def _tfds(data_cfg, name: str, split: str) -> records.Source:
  return tfds_sources.TfdsSource(
      name, split, data_cfg.tfds_data_dir,
      kitti_flipped=data_cfg.tfds_kitti_flipped)


def get_source(data_cfg, split: str) -> records.Source:
  """The dataset source of `split` for the `config.data` settings (see module doc)."""
  name = data_cfg.name
  root = data_cfg.root
  if name == 'builtin_small':
    return builtin.BuiltinSmallSource(data_cfg.builtin, split)
  if name.startswith('tfds:'):
    return _tfds(data_cfg, name[len('tfds:'):], split)
  if name == 'voc':
    return _voc_native(root, split) if root else _voc_tfds(data_cfg, split)
  if name == 'kitti':
    if root:
      return kitti_lib.KittiSource(root, split, float(data_cfg.kitti_val_fraction))
    return _tfds(data_cfg, 'kitti', {'val': 'validation'}.get(split, split))
  if name == 'coco':
    if root:
      return coco_lib.CocoSource(*coco_lib.coco_paths(root, split))
    tfds_split = {'val': 'validation', 'train2017': 'train', 'val2017': 'validation'}
    return _tfds(data_cfg, 'coco/2017', tfds_split.get(split, split))
  if name == 'custom':
    return _custom(data_cfg, split)
  raise ValueError(f"unknown data.name {name!r}: builtin_small, voc, kitti, coco, custom or "
                   "'tfds:<name>'")


FORMATS = ('yolo', 'voc', 'coco')


def _custom(data_cfg, split: str) -> records.Source:
  root, fmt = data_cfg.root, data_cfg.format
  if not root:
    raise ValueError("data.name='custom' reads your own folder: set --config.data.root=DIR")
  if fmt == 'yolo':
    return yolo_lib.YoloSource(root, split, data_cfg.on_bad_example)
  if fmt == 'voc':
    return voc_lib.VocSource(root, split,
                             voc_lib.folder_class_names(root, data_cfg.train_split))
  if fmt == 'coco':
    return coco_lib.CocoSource(*coco_lib.coco_paths(root, split))
  raise ValueError(f'data.format must be one of {FORMATS}, got {fmt!r}')


def class_names(data_cfg) -> tuple[str, ...]:
  """Class names in label order (label k is `class_names[k - 1]`)."""
  name = data_cfg.name.removeprefix('tfds:').split('/')[0].split(':')[0]
  if name == 'builtin_small':
    return builtin.SHAPES[:int(data_cfg.builtin.num_classes)]
  if name == 'voc':
    return voc_lib.VOC_CLASSES
  if name == 'kitti':
    return kitti_lib.KITTI_CLASSES
  if name == 'custom' and data_cfg.format == 'yolo':
    return yolo_lib.class_names(data_cfg.root)
  if name == 'custom' and data_cfg.format == 'voc':
    return voc_lib.folder_class_names(data_cfg.root, data_cfg.train_split)
  # COCO-format data defines its own categories.
  return tuple(get_source(data_cfg, data_cfg.eval_split).class_names)
