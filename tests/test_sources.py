"""Readers on tiny dataset folders written here, tfds records, and every bad input."""

import importlib.util
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from smallssd_jax import config_blocks
from smallssd_jax import batch_layout
from smallssd_jax.datasets import ops as ops_lib
from smallssd_jax.datasets import resize as resize_lib
from smallssd_jax.datasets import coco
from smallssd_jax.datasets import kitti
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import records
from smallssd_jax.datasets import sources
from smallssd_jax.datasets import tfds_sources
from smallssd_jax.datasets import voc


def _rgb(h=60, w=80, value=90):
  img = np.full((h, w, 3), value, np.uint8)
  img[10:20, 10:30] = (250, 20, 20)
  return img


def _jpeg_bytes(array, mode=None, fmt='JPEG'):
  pil = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
  buf = io.BytesIO()
  pil.save(buf, fmt, quality=95)
  return buf.getvalue()


def _voc_object(name, box, difficult=0):
  x0, y0, x1, y1 = box
  return (f'<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>'
          f'<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>'
          '</bndbox></object>')


def write_voc(root, year, entries, split='trainval'):
  """entries: {id: (image bytes or None for missing, objects xml or raw xml)}."""
  base = os.path.join(root, year)
  for sub in ('Annotations', 'JPEGImages', os.path.join('ImageSets', 'Main')):
    os.makedirs(os.path.join(base, sub), exist_ok=True)
  for image_id, (image, objects) in entries.items():
    if image is not None:
      with open(os.path.join(base, 'JPEGImages', f'{image_id}.jpg'), 'wb') as f:
        f.write(image)
    xml = objects if objects.startswith('RAW:') else (
        f'<annotation><filename>{image_id}.jpg</filename>{objects}</annotation>')
    with open(os.path.join(base, 'Annotations', f'{image_id}.xml'), 'w') as f:
      f.write(xml.removeprefix('RAW:'))
  with open(os.path.join(base, 'ImageSets', 'Main', f'{split}.txt'), 'w') as f:
    f.write('\n'.join(entries) + '\n')
  return base


# ---------------------------------------------------------------------------
# VOC
# ---------------------------------------------------------------------------


def test_voc_reader_subtracts_one_and_marks_difficult(tmp_path):
  img = _jpeg_bytes(_rgb())
  objects = _voc_object('dog', (11, 11, 30, 20)) + _voc_object('bottle', (41, 31, 60, 50), 1)
  write_voc(str(tmp_path), 'VOC2007', {'000001': (img, objects), '000002': (img, '')})
  src = voc.VocSource(str(tmp_path / 'VOC2007'), 'trainval')
  assert len(src) == 2
  ex = src[0]
  assert ex['image'].shape == (60, 80, 3) and ex['image'].dtype == np.uint8
  np.testing.assert_allclose(ex['boxes'], [[10 / 60, 10 / 80, 19 / 60, 29 / 80],
                                           [30 / 60, 40 / 80, 49 / 60, 59 / 80]], atol=1e-6)
  np.testing.assert_array_equal(ex['labels'], [voc.VOC_CLASSES.index('dog') + 1,
                                               voc.VOC_CLASSES.index('bottle') + 1])
  np.testing.assert_array_equal(ex['ignore'], [False, True])
  assert tuple(ex['orig_size']) == (60, 80) and ex['problems'] == []
  # Zero-object images are kept.
  empty = src[1]
  assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,)


def test_voc_union_split_and_plain_split(tmp_path):
  img = _jpeg_bytes(_rgb())
  write_voc(str(tmp_path), 'VOC2007', {'000001': (img, _voc_object('cat', (1, 1, 10, 10)))})
  write_voc(str(tmp_path), 'VOC2007', {'000003': (img, '')}, split='test')
  write_voc(str(tmp_path), 'VOC2012', {'2008_000001': (img, ''), '2008_000002': (img, '')})
  data = config_blocks.data('voc', root=str(tmp_path))
  union = sources.get_source(data, 'VOC2007/trainval+VOC2012/trainval')
  assert len(union) == 3
  assert [union.record(i)['image_id'] for i in range(3)] == [0, 1, 2]
  assert union.record(2)['key'].endswith('2008_000002.jpg')
  assert len(sources.get_source(data, 'test')) == 1  # only VOC2007 has test.txt
  with pytest.raises(ValueError, match='ambiguous'):
    sources.get_source(data, 'trainval')
  year_root = config_blocks.data('voc', root=str(tmp_path / 'VOC2012'))
  assert len(sources.get_source(year_root, 'trainval')) == 2
  with pytest.raises(FileNotFoundError, match='split file'):
    sources.get_source(data, 'VOC2007/val')
  assert sources.class_names(data) == voc.VOC_CLASSES


def _bad_voc(tmp_path, entries):
  write_voc(str(tmp_path), 'VOC2007', entries)
  return voc.VocSource(str(tmp_path / 'VOC2007'), 'trainval')


@pytest.mark.parametrize('case, reason', [
    ('corrupt', 'not a readable image'),
    ('truncated', 'corrupt or truncated'),
    ('missing', 'image file is missing'),
    ('unknown_class', "unknown class name 'unicorn'"),
    ('bad_xml', 'does not parse'),
    ('bad_number', 'bad <bndbox>'),
])
def test_voc_bad_inputs_name_file_and_reason(tmp_path, case, reason):
  noisy = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
  good = _jpeg_bytes(noisy)  # big enough that half of it still has the header
  obj = _voc_object('dog', (11, 11, 30, 20))
  entries = {
      'corrupt': {'000001': (b'this is not an image at all', obj)},
      'truncated': {'000001': (good[:len(good) // 2], obj)},
      'missing': {'000001': (None, obj)},
      'unknown_class': {'000001': (good, _voc_object('unicorn', (1, 1, 5, 5)))},
      'bad_xml': {'000001': (good, 'RAW:<annotation><object><name>dog</name>')},
      'bad_number': {'000001': (good, obj.replace('<xmin>11', '<xmin>eleven'))},
  }[case]
  src = _bad_voc(tmp_path, entries)
  with pytest.raises(records.BadExampleError, match=reason) as info:
    ex = src.record(0)
    resize_lib.resize(ex, size=32)  # decoding happens here for truncated files
  assert '000001' in str(info.value)
  assert 'VOC2007' in info.value.key


def test_voc_boxes_clipped_or_dropped_and_counted(tmp_path):
  img = _jpeg_bytes(_rgb())
  objects = (_voc_object('dog', (11, 11, 30, 20)) +      # fine
             _voc_object('cat', (61, 41, 120, 55)) +     # reaches outside -> clipped
             _voc_object('cow', (30, 10, 20, 25)) +      # xmax < xmin -> dropped
             _voc_object('car', (200, 200, 300, 300)))   # fully outside -> dropped
  ex = _bad_voc(tmp_path, {'000001': (img, objects)})[0]
  names = [voc.VOC_CLASSES[l - 1] for l in ex['labels']]
  assert names == ['dog', 'cat']
  np.testing.assert_allclose(ex['boxes'][1], [40 / 60, 60 / 80, 54 / 60, 1.0], atol=1e-6)
  assert any('clipped 1' in p for p in ex['problems'])
  assert any('dropped 2' in p for p in ex['problems'])


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'CMYK', 'P', 'I;16'])
def test_odd_image_modes_become_rgb_uint8(tmp_path, mode):
  base = _rgb()
  if mode == 'I;16':
    grey = (base[..., 0].astype(np.uint16) * 257)  # 16-bit: 250 -> 64250
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, 'PNG')
    data = buf.getvalue()
  elif mode in ('RGBA', 'P'):
    data = _jpeg_bytes(base, mode, fmt='PNG')
  else:
    data = _jpeg_bytes(base, mode)
  src = _bad_voc(tmp_path, {'000001': (data, _voc_object('dog', (11, 11, 30, 20)))})
  ex = src[0]
  assert ex['image'].shape == (60, 80, 3) and ex['image'].dtype == np.uint8
  red_area = ex['image'][12:18, 12:28].astype(int)
  if mode == 'I;16':
    assert np.all(np.abs(red_area - 250) <= 1)  # top 8 bits kept, not clipped to 255
  elif mode in ('L',):
    assert np.all(np.abs(red_area - red_area[..., :1]) <= 1)
  else:
    assert red_area[..., 0].mean() > 200 and red_area[..., 1].mean() < 70
  out = resize_lib.resize(src.record(0), size=40)
  assert out['image'].shape == (40, 40, 3) and out['image'].dtype == np.uint8


def test_more_objects_than_max_boxes(tmp_path):
  img = _jpeg_bytes(_rgb())
  objects = ''.join(_voc_object('dog', (2 + i, 2, 10 + i, 10)) for i in range(5))
  src = _bad_voc(tmp_path, {'000001': (img, objects)})
  ops = ops_lib.eval_ops(config_blocks.data(), batch_layout.InputSpec.from_config(config_blocks.data(), 32))
  loader = pipeline.ExampleLoader(src, ops, 4, 'error')
  with pytest.raises(records.BadExampleError, match='5 objects, more than data.max_boxes=4') as e:
    loader(0, None)
  assert '000001.jpg' in str(e.value)
  before = sum(pipeline.skipped.values())
  assert pipeline.ExampleLoader(src, ops, 4, 'skip')(0, None) is None
  assert sum(pipeline.skipped.values()) == before + 1
  assert pipeline.ExampleLoader(src, ops, 5, 'error')(0, None)['mask'].sum() == 5


def test_annotation_size_mismatch_is_bad(tmp_path):
  img = _jpeg_bytes(_rgb())
  ex = _bad_voc(tmp_path, {'000001': (img, '')}).record(0)
  ex['orig_size'] = np.array([61, 80], np.int32)
  with pytest.raises(records.BadExampleError, match='annotation says'):
    resize_lib.resize(ex, size=16)


# ---------------------------------------------------------------------------
# KITTI
# ---------------------------------------------------------------------------


def write_kitti(root, files):
  """files: {stem: (png bytes or None, label text)}."""
  img_dir = os.path.join(root, 'training', 'image_2')
  lab_dir = os.path.join(root, 'training', 'label_2')
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(lab_dir, exist_ok=True)
  for stem, (png, text) in files.items():
    if png is not None:
      with open(os.path.join(img_dir, f'{stem}.png'), 'wb') as f:
        f.write(png)
    with open(os.path.join(lab_dir, f'{stem}.txt'), 'w') as f:
      f.write(text)


def _kitti_line(kind, box):
  l, t, r, b = box
  return f'{kind} 0.00 0 -1.57 {l:.2f} {t:.2f} {r:.2f} {b:.2f} 1.5 1.6 3.9 1.0 1.7 20.0 -1.5\n'


def test_kitti_reader_groups_classes_and_ignores_dontcare(tmp_path):
  png = _jpeg_bytes(_rgb(), fmt='PNG')
  text = (_kitti_line('Car', (10, 10, 30, 20)) + _kitti_line('Person_sitting', (40, 5, 50, 40)) +
          _kitti_line('Misc', (0, 0, 5, 5)) + _kitti_line('DontCare', (60, 30, 70, 50)))
  write_kitti(str(tmp_path), {'000000': (png, text), '000001': (png, '')})
  src = kitti.KittiSource(str(tmp_path), 'trainval')
  ex = src[0]
  assert src.class_names == ('pedestrian', 'vehicle', 'other')
  np.testing.assert_array_equal(ex['labels'], [2, 1, 3, 1, 2, 3])
  np.testing.assert_array_equal(ex['ignore'], [False] * 3 + [True] * 3)
  np.testing.assert_allclose(ex['boxes'][0], [10 / 60, 10 / 80, 20 / 60, 30 / 80], atol=1e-6)
  np.testing.assert_allclose(ex['boxes'][3:], [[30 / 60, 60 / 80, 50 / 60, 70 / 80]] * 3,
                             atol=1e-6)
  assert len(src[1]['boxes']) == 0


def test_kitti_split_is_deterministic_and_disjoint(tmp_path):
  png = _jpeg_bytes(_rgb(8, 8), fmt='PNG')
  write_kitti(str(tmp_path), {f'{i:06d}': (png, '') for i in range(50)})
  train = kitti.KittiSource(str(tmp_path), 'train', 0.2).ids
  val = kitti.KittiSource(str(tmp_path), 'val', 0.2).ids
  assert len(val) == 10 and len(train) == 40 and not set(train) & set(val)
  assert kitti.KittiSource(str(tmp_path), 'val', 0.2).ids == val
  assert kitti.KittiSource(str(tmp_path), 'test', 0.2).ids == val  # alias: no labelled test set
  data = config_blocks.data('kitti', root=str(tmp_path))
  assert len(sources.get_source(data, 'train')) == 40


@pytest.mark.parametrize('text, reason', [
    ('Car 0 0 0 10 10\n', 'fields'),
    ('Car 0 0 0 a b c d 1 1 1 1 1 1 1\n', 'bad box numbers'),
    ('Boat 0 0 0 1 1 5 5 1 1 1 1 1 1 1\n', "unknown type 'Boat'"),
])
def test_kitti_bad_labels(tmp_path, text, reason):
  write_kitti(str(tmp_path), {'000000': (_jpeg_bytes(_rgb(), fmt='PNG'), text)})
  with pytest.raises(records.BadExampleError, match=reason) as info:
    kitti.KittiSource(str(tmp_path), 'trainval').record(0)
  assert 'label_2/000000.txt' in str(info.value)


def test_kitti_missing_image(tmp_path):
  write_kitti(str(tmp_path), {'000000': (None, _kitti_line('Car', (1, 1, 5, 5)))})
  with pytest.raises(records.BadExampleError, match='missing') as info:
    kitti.KittiSource(str(tmp_path), 'trainval').record(0)
  assert 'image_2/000000.png' in str(info.value)


# ---------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------


def test_coco_reader_maps_categories_and_crowd(tmp_path):
  os.makedirs(tmp_path / 'val2017')
  (tmp_path / 'val2017' / 'a.jpg').write_bytes(_jpeg_bytes(_rgb()))
  (tmp_path / 'val2017' / 'b.jpg').write_bytes(_jpeg_bytes(_rgb(40, 50)))
  ann = {
      'images': [{'id': 42, 'file_name': 'a.jpg', 'height': 60, 'width': 80},
                 {'id': 7, 'file_name': 'b.jpg', 'height': 40, 'width': 50}],
      'categories': [{'id': 90, 'name': 'toothbrush'}, {'id': 1, 'name': 'person'},
                     {'id': 5, 'name': 'airplane'}],
      'annotations': [
          {'id': 1, 'image_id': 42, 'category_id': 90, 'bbox': [10, 20, 30, 10], 'iscrowd': 0,
           'area': 300},
          {'id': 2, 'image_id': 42, 'category_id': 5, 'bbox': [0, 0, 80, 60], 'iscrowd': 1,
           'area': 4800},
          {'id': 3, 'image_id': 42, 'category_id': 1, 'bbox': [5, 5, 0, 10], 'iscrowd': 0,
           'area': 0},
      ],
  }
  os.makedirs(tmp_path / 'annotations')
  (tmp_path / 'annotations' / 'instances_val2017.json').write_text(json.dumps(ann))
  data = config_blocks.data('coco', root=str(tmp_path))
  src = sources.get_source(data, 'val')
  assert src.class_names == ('person', 'airplane', 'toothbrush')
  assert src.category_ids == (1, 5, 90)
  assert src.coco_image_ids == [7, 42]
  assert len(src[0]['boxes']) == 0  # image 7: no annotations, kept
  ex = src[1]
  np.testing.assert_array_equal(ex['labels'], [3, 2])
  np.testing.assert_array_equal(ex['ignore'], [False, True])
  np.testing.assert_allclose(ex['boxes'][0], [20 / 60, 10 / 80, 30 / 60, 40 / 80], atol=1e-6)
  assert any('dropped 1' in p for p in ex['problems'])  # the zero-width box
  assert sources.class_names(config_blocks.data('coco', root=str(tmp_path), eval_split='val2017')) == (
      'person', 'airplane', 'toothbrush')
  assert coco.coco_paths('/x', 'train')[0].endswith('instances_train2017.json')


# ---------------------------------------------------------------------------
# tfds records (fake: tfds mock data is not valid detection data)
# ---------------------------------------------------------------------------


def _kitti_record():
  """A 100x200 image with a bright car at rows 10..30, columns 50..90 (top of the image).

  The box is stored as tfds kitti stores it: bottom-left origin, so
  ymin = (h - bottom) / h.
  """
  img = np.full((100, 200, 3), 20, np.uint8)
  img[10:30, 50:90] = 240
  flipped = [(100 - 30) / 100, 50 / 200, (100 - 10) / 100, 90 / 200]
  return {'image': _jpeg_bytes(img, fmt='PNG'), 'image/file_name': '000001.png',
          'objects': {'bbox': np.array([flipped, [0.0, 0.0, 0.1, 0.1]], np.float32),
                      'type': np.array([0, 3])}}   # Car, Pedestrian


def _bright_under_box(example):
  img = example['image']
  h, w = img.shape[:2]
  y0, x0, y1, x1 = example['boxes'][0] * [h, w, h, w]
  return img[int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1].mean() > 200


def test_tfds_kitti_flip_is_undone_by_version():
  for version in ('3.1.0', '3.2.0', '3.3.0'):
    src = tfds_sources.TfdsSource('kitti', 'train', data_records=[_kitti_record()],
                                  version=version)
    ex = src[0]
    np.testing.assert_allclose(ex['boxes'][0], [0.1, 0.25, 0.3, 0.45], atol=1e-6)
    assert _bright_under_box(ex)
    np.testing.assert_array_equal(ex['labels'], [2, 1])  # vehicle, pedestrian
    assert tuple(ex['orig_size']) == (100, 200)
  # Reading the same record as if it were not flipped puts the box on the
  # dark bottom of the image: the check above catches a missing un-flip.
  raw = tfds_sources.TfdsSource('kitti', 'train', data_records=[_kitti_record()],
                                version='3.2.0', kitti_flipped=False)[0]
  assert not _bright_under_box(raw)


def test_kitti_flip_decision():
  assert tfds_sources.kitti_boxes_flipped('3.1.0')
  assert tfds_sources.kitti_boxes_flipped('3.2.0')
  assert tfds_sources.kitti_boxes_flipped('3.3.0')
  with pytest.raises(ValueError, match='tfds_kitti_flipped'):
    tfds_sources.kitti_boxes_flipped('4.0.0')
  assert not tfds_sources.kitti_boxes_flipped('4.0.0', override=False)
  # From the command line the 'auto' field arrives as a string.
  assert not tfds_sources.kitti_boxes_flipped('3.2.0', override='False')
  assert tfds_sources.kitti_boxes_flipped('4.0.0', override='true')
  with pytest.raises(ValueError, match='data.tfds_kitti_flipped'):
    tfds_sources.kitti_boxes_flipped('3.2.0', override='maybe')


def test_tfds_voc_records():
  rec = {'image': _jpeg_bytes(_rgb()), 'image/filename': '000005.jpg',
         'objects': {'bbox': np.array([[0.1, 0.2, 0.5, 0.6], [0.2, 0.2, 0.3, 0.3]], np.float32),
                     'label': np.array([4, 14]), 'is_difficult': np.array([False, True])}}
  src = tfds_sources.TfdsSource('voc/2007', 'test', data_records=[rec], version='5.0.0')
  ex = src[0]
  np.testing.assert_array_equal(ex['labels'], [5, 15])
  np.testing.assert_array_equal(ex['ignore'], [False, True])
  np.testing.assert_allclose(ex['boxes'], rec['objects']['bbox'])
  assert '000005.jpg' in ex['key'] and src.class_names == voc.VOC_CLASSES


@pytest.mark.skipif(importlib.util.find_spec('tensorflow') is not None,
                    reason='TensorFlow installed: tfds coco is available')
def test_tfds_coco_without_tensorflow_points_at_native_reader():
  with pytest.raises(ImportError, match='natively'):
    sources.get_source(config_blocks.data('coco'), 'validation')


def test_unprepared_tfds_data_names_the_fix(tmp_path):
  data = config_blocks.data('kitti', tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='tfds build kitti'):
    sources.get_source(data, 'train')


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match='unknown data.name'):
    sources.get_source(config_blocks.data('imagenet'), 'train')
