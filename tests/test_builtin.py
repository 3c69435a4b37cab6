"""The generated 'builtin_small' dataset: deterministic, split-disjoint, valid."""

import hashlib

import numpy as np
import pytest

from smallssd_jax import config_blocks
from smallssd_jax.datasets import builtin
from smallssd_jax.datasets import sources


def _cfg(**overrides):
  cfg = config_blocks.data().builtin
  cfg.update(overrides)
  return cfg


def _digest(example):
  h = hashlib.sha1(example['image'].tobytes())
  h.update(example['boxes'].tobytes())
  return h.hexdigest()


def test_deterministic_by_seed_split_index():
  cfg = _cfg()
  a = builtin.render(cfg, 'train', 7)
  b = builtin.render(cfg, 'train', 7)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['boxes'], b['boxes'])
  np.testing.assert_array_equal(a['labels'], b['labels'])
  assert _digest(builtin.render(cfg, 'train', 8)) != _digest(a)
  assert _digest(builtin.render(_cfg(seed=1), 'train', 7)) != _digest(a)


def test_splits_are_disjoint():
  cfg = _cfg()
  train = {_digest(builtin.render(cfg, 'train', i)) for i in range(12)}
  test = {_digest(builtin.render(cfg, 'test', i)) for i in range(12)}
  assert len(train) == 12 and len(test) == 12
  assert not train & test
  # 'val' is the test split's alias, never a third stream.
  assert _digest(builtin.render(cfg, 'val', 3)) == _digest(builtin.render(cfg, 'test', 3))
  with pytest.raises(ValueError):
    builtin.render(cfg, 'holdout', 0)


def test_examples_are_valid_small_object_data():
  cfg = _cfg()
  sides, counts = [], []
  for i in range(20):
    ex = builtin.render(cfg, 'train', i)
    img, boxes, labels = ex['image'], ex['boxes'], ex['labels']
    assert img.shape == (300, 300, 3) and img.dtype == np.uint8
    assert boxes.dtype == np.float32 and labels.dtype == np.int32
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert np.all((labels >= 1) & (labels <= cfg.num_classes))
    assert not ex['ignore'].any()
    assert tuple(ex['orig_size']) == (300, 300) and ex['image_id'] == i
    counts.append(len(boxes))
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) * 300
    sides.extend(side.tolist())
    # Objects stand out from the background: the box interior differs from
    # the pixels just around it.
    for (y0, x0, y1, x1) in (boxes * 300).astype(int)[:3]:
      inside = img[y0:y1, x0:x1].reshape(-1, 3).astype(float).mean(0)
      around = img[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3].reshape(-1, 3).astype(float)
      assert np.abs(around - inside).max() > 30
  sides = np.array(sides)
  assert max(counts) <= cfg.max_objects and min(counts) >= 2
  assert sides.min() >= cfg.min_size * 0.7 and sides.max() <= cfg.max_size * 1.3
  assert np.mean(sides < 32) > 0.55  # most objects are COCO-small


def test_every_class_appears_and_num_classes_is_respected():
  seen = set()
  for i in range(6):
    seen.update(builtin.render(_cfg(num_classes=9), 'train', i)['labels'].tolist())
  assert seen == set(range(1, 10))
  with pytest.raises(ValueError):
    builtin.render(_cfg(num_classes=len(builtin.SHAPES) + 1), 'train', 0)


def test_source_interface():
  data = config_blocks.data()
  data.builtin.num_test = 5
  src = sources.get_source(data, 'test')
  assert len(src) == 5
  assert src.class_names == builtin.SHAPES[:6] == sources.class_names(data)
  ex = src[4]
  assert ex['image'].shape == (300, 300, 3)
  with pytest.raises(IndexError):
    src.record(5)
  small = config_blocks.data()
  small.builtin.image_size = 96
  assert sources.get_source(small, 'train')[0]['image'].shape == (96, 96, 3)


def test_distractors_are_unlabelled_shapes_added_after_the_objects():
  plain = _cfg(min_size=4.0, max_size=24.0, min_objects=16, max_objects=48)
  busy = _cfg(min_size=4.0, max_size=24.0, min_objects=16, max_objects=48,
              min_distractors=4, max_distractors=16)
  for i in range(4):
    a, b = builtin.render(plain, 'train', i), builtin.render(busy, 'train', i)
    # The same objects (distractors draw from the random stream after them), more shapes.
    np.testing.assert_array_equal(a['boxes'], b['boxes'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
    changed = np.any(a['image'] != b['image'], axis=-1)
    assert changed.mean() > 0.002
    # Nothing is drawn over an object beyond the allowed overlap.
    px = np.round(a['boxes'] * 300).astype(int)
    inside = np.zeros_like(changed)
    for y0, x0, y1, x1 in px:
      inside[y0:y1, x0:x1] = True
    assert changed[inside].mean() < builtin._MAX_OVERLAP
  with pytest.raises(ValueError, match='shapes outside'):
    builtin.render(_cfg(num_classes=len(builtin.SHAPES), max_distractors=2), 'train', 0)
