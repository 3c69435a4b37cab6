"""tensorflow-datasets sources: `voc/2007`, `voc/2012`, `kitti`, `coco/2017`.

Read through `tfds.data_source` (random access over ArrayRecord files, no
TensorFlow needed for voc and kitti) with image decoding skipped, so the
augmentation decodes each JPEG once at the size it needs. The data must
already be prepared in the tfds data dir (nothing is downloaded here).

Differences from the native readers, kept on purpose and documented:

* voc: tfds divides VOC's 1-based pixel coordinates by the image size
  without subtracting 1 (the native reader subtracts it like the devkit), so
  tfds boxes sit up to one pixel right/below the devkit's. Kept as is: the
  data on disk is what it is and the shift is below the annotation noise.
* kitti: every released builder version (3.1.0, 3.2.0 and 3.3.0 as of tfds
  4.9.10, whose `_build_bounding_box` computes `ymin = (height - bottom) /
  height`) stores boxes with a bottom-left origin, i.e. vertically flipped,
  and drops DontCare objects. The flip is undone by builder version
  (`kitti_boxes_flipped`): the version is recorded in the prepared data's
  dataset_info, so the decision does not depend on the installed tfds code.
  DontCare regions cannot be recovered; use the native KITTI reader
  (data.root) for the paper's protocol with DontCare ignored.
* coco: the tfds coco builder's data source needs TensorFlow; without it the
  native COCO reader (data.root with annotations/instances_*.json) is the way.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Sequence

import numpy as np

from smallssd_jax import config_lib
from smallssd_jax.datasets import kitti as kitti_lib
from smallssd_jax.datasets import records
from smallssd_jax.datasets import voc as voc_lib

# tfds kitti `objects/type` ClassLabel names, in the builder's order.
TFDS_KITTI_TYPES = ('Car', 'Van', 'Truck', 'Pedestrian', 'Person_sitting',
                    'Cyclist', 'Tram', 'Misc')
# The newest builder version known to store flipped boxes (tfds 4.9.10).
_LAST_FLIPPED_KITTI_VERSION = (3, 3, 0)
# VOC's devkit split names -> tfds voc split names.
VOC_SPLITS = {'trainval': 'train+validation', 'val': 'validation'}


def _version_tuple(version: str) -> tuple[int, ...]:
  return tuple(int(p) for p in str(version).split('.'))


def kitti_boxes_flipped(version: str, override: Any = 'auto') -> bool:
  """Whether tfds kitti data of this builder version stores flipped boxes.

  Args:
    version: the builder version of the prepared data ('3.2.0').
    override: 'auto' decides by version; True / False force it (for data
      prepared by a future builder whose convention is known to the user).

  Raises:
    ValueError: 'auto' and a version newer than any known one.
  """
  override = config_lib.auto_bool(override, 'data.tfds_kitti_flipped')
  if override != 'auto':
    return override
  if _version_tuple(version) <= _LAST_FLIPPED_KITTI_VERSION:
    return True
  raise ValueError(
      f'tfds kitti version {version} is newer than the versions known to store '
      'vertically flipped boxes (<= 3.3.0); check its _build_bounding_box and set '
      'data.tfds_kitti_flipped to True or False')


def _objects(record: dict[str, Any]) -> dict[str, np.ndarray]:
  return record.get('objects', {})


def _image_field(record: dict[str, Any], name: str) -> records.EncodedImage | np.ndarray:
  image = record['image']
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
    return image  # decoded already (records built in memory)
  if isinstance(image, np.ndarray):
    image = image.tobytes() if image.dtype != object else image.item()
  return records.EncodedImage(name=name, data=bytes(image))


def _file_name(record: dict[str, Any], fallback: str) -> str:
  for field in ('image/file_name', 'image/filename'):
    if field in record:
      v = record[field]
      return v.decode() if isinstance(v, bytes) else str(v)
  return fallback


class TfdsSource(records.Source):
  """One tfds detection dataset split as a `Source`.

  Args:
    name: tfds name with config and optional version ('voc/2007', 'kitti',
      'kitti:3.2.0', 'coco/2017').
    split: tfds split spec ('train', 'train+validation', 'test').
    data_dir: tfds data dir ('' = tfds default).
    data_records: records to read instead of `tfds.data_source` (tests build
      fake records; tfds mock data is not valid detection data).
    version: builder version of `data_records` (read from the data otherwise).
    kitti_flipped: 'auto' | True | False, see `kitti_boxes_flipped`.
  """

  def __init__(self, name: str, split: str, data_dir: str = '', *,
               data_records: Sequence[dict[str, Any]] | None = None,
               version: str | None = None, kitti_flipped: Any = 'auto'):
    self.name = name
    self.split = split
    self.dataset = name.split('/')[0].split(':')[0]
    convert = {'voc': self._convert_voc, 'kitti': self._convert_kitti,
               'coco': self._convert_coco}.get(self.dataset)
    if convert is None:
      raise ValueError(f'tfds dataset {name!r} is not a supported detection dataset '
                       '(voc, kitti, coco)')
    self._convert: Callable[[dict[str, Any], int], records.Example] = convert
    label_names = None
    if data_records is None:
      if self.dataset == 'coco' and importlib.util.find_spec('tensorflow') is None:
        raise ImportError(
            "tfds 'coco/2017' needs TensorFlow, which is not installed. Read COCO "
            'natively instead: set data.name=coco and data.root to a folder with '
            'annotations/instances_<split>.json and <split>/ images.')
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        data_records = tfds.data_source(
            name, split=split, data_dir=data_dir or None, download=False,
            decoders={'image': tfds.decode.SkipDecoding()})
      except Exception as e:  # tfds raises assorted types for missing / TFRecord data
        raise FileNotFoundError(
            f'tfds {name!r} split {split!r} is not readable as a random-access data source '
            f'in {data_dir or "the default tfds data dir"} ({type(e).__name__}: {e}). Prepare it '
            f'with `tfds build {name} --file_format=array_record` (data.tfds_data_dir), or '
            'set data.root to the dataset in its native layout.') from e
      info = data_records.dataset_info
      version = str(info.version)
      objects = info.features['objects']
      label_feature = objects['type'] if self.dataset == 'kitti' else objects['label']
      label_names = tuple(label_feature.names)
    self._records = data_records
    self.version = version or '0.0.0'
    if self.dataset == 'kitti':
      self.class_names = kitti_lib.KITTI_CLASSES
      types = label_names or TFDS_KITTI_TYPES
      self._type_to_label = np.array([kitti_lib.type_label(t) for t in types], np.int32)
      self.boxes_flipped = kitti_boxes_flipped(self.version, kitti_flipped)
    elif self.dataset == 'voc':
      self.class_names = tuple(label_names or voc_lib.VOC_CLASSES)
    else:
      if label_names is None:
        raise ValueError('coco data_records need their label names from the builder')
      self.class_names = label_names

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, {self.split!r}, {len(self)} examples)'

  def record(self, index: int) -> records.Example:
    index = self.check_index(index)
    return self._convert(self._records[index], index)

  def _common(self, record: dict[str, Any], index: int, boxes: np.ndarray,
              labels: np.ndarray, ignore: np.ndarray) -> records.Example:
    key = f'{self.name}[{self.split}]#{index} ' + _file_name(record, '')
    key = key.strip()
    image = _image_field(record, key)
    if isinstance(image, np.ndarray):
      h, w = image.shape[:2]
    else:
      h, w = image.size()
    problems: list[str] = []
    # tfds boxes are already normalised yxyx; clip and drop like the native readers.
    boxes, keep = records.sanitize_normalized(boxes, problems)
    return records.make_example(
        image=image, boxes=boxes, labels=np.asarray(labels, np.int32)[keep],
        ignore=np.asarray(ignore, bool)[keep], image_id=index, orig_size=(h, w),
        key=key, problems=problems)

  def _convert_voc(self, record: dict[str, Any], index: int) -> records.Example:
    obj = _objects(record)
    labels = np.asarray(obj.get('label', []), np.int64) + 1
    n = len(labels)
    ignore = np.asarray(obj.get('is_difficult', np.zeros(n, bool)), bool)
    return self._common(record, index, np.asarray(obj.get('bbox', [])), labels, ignore)

  def _convert_kitti(self, record: dict[str, Any], index: int) -> records.Example:
    obj = _objects(record)
    types = np.asarray(obj.get('type', []), np.int64)
    boxes = np.asarray(obj.get('bbox', []), np.float64).reshape(-1, 4)
    if self.boxes_flipped:
      # Bottom-left origin -> top-left: y' = 1 - y, so ymin' = 1 - ymax.
      boxes = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], 1)
    labels = self._type_to_label[types] if len(types) else np.zeros(0, np.int32)
    return self._common(record, index, boxes, labels, np.zeros(len(types), bool))

  def _convert_coco(self, record: dict[str, Any], index: int) -> records.Example:
    obj = _objects(record)
    labels = np.asarray(obj.get('label', []), np.int64) + 1
    ignore = np.asarray(obj.get('is_crowd', np.zeros(len(labels), bool)), bool)
    return self._common(record, index, np.asarray(obj.get('bbox', [])), labels, ignore)
