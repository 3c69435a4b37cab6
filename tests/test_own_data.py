"""Your own data: the YOLO reader and its bad input, classes from the dataset, fine-tuning
to new classes, and prior coverage with suggested priors."""

import itertools
import shlex
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from smallssd_jax import anchors as anchors_lib
from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import config_blocks
from smallssd_jax import coverage
from smallssd_jax import errors
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import records
from smallssd_jax.datasets import sources
from smallssd_jax.datasets import yolo
from smallssd_jax.tools import export_builtin

REPO = pathlib.Path(__file__).parents[1]


def _yolo_folder(root: pathlib.Path, labels: dict[str, str], names=('cat', 'dog'),
                 images=None, size=(40, 50)) -> pathlib.Path:
  (root / 'images' / 'train').mkdir(parents=True)
  (root / 'labels' / 'train').mkdir(parents=True)
  (root / 'data.yaml').write_text('names: [' + ', '.join(names) + ']\n')
  for stem in images if images is not None else labels:
    Image.new('RGB', (size[1], size[0])).save(root / 'images' / 'train' / f'{stem}.jpg')
  for stem, text in labels.items():
    (root / 'labels' / 'train' / f'{stem}.txt').write_text(text)
  return root


def test_yolo_reads_boxes_classes_and_images_without_labels(tmp_path):
  root = _yolo_folder(tmp_path, {'a': '0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.1 0.1\n'},
                      images=['a', 'b'])
  source = yolo.YoloSource(str(root), 'train')
  assert source.class_names == ('cat', 'dog') and len(source) == 2
  a = source.record(0)
  np.testing.assert_allclose(a['boxes'], [[0.3, 0.4, 0.7, 0.6], [0.7, 0.2, 0.8, 0.3]], atol=1e-6)
  np.testing.assert_array_equal(a['labels'], [1, 2])
  assert tuple(a['orig_size']) == (40, 50)
  b = source.record(1)               # an image without a label file: no objects
  assert b['boxes'].shape == (0, 4) and len(b['labels']) == 0


@pytest.mark.parametrize('text, message', [
    ('0 0.5 0.5 0.2\n', r'line 1: expected `class cx cy w h`'),
    ('0 0.5 0.5 0.2 0.2\n\n1 0.5 0.5 0.1 0.1\n', r'line 2 is empty'),
    ('2 0.5 0.5 0.2 0.2\n', r'line 1: class index 2 is not among the 2 names'),
    ('0 0.5 1.7 0.2 0.2\n', r'line 1: coordinates .* outside \[0, 1\]'),
    ('0 half 0.5 0.2 0.2\n', r'line 1: not numbers'),
])
def test_yolo_bad_lines_name_the_file_and_the_line(tmp_path, text, message):
  root = _yolo_folder(tmp_path, {'a': text})
  source = yolo.YoloSource(str(root), 'train')
  with pytest.raises(records.BadExampleError, match=rf'labels/train/a.txt: {message}'):
    source.record(0)
  # With on_bad_example='skip' the example is a counted, logged skip.
  loader = pipeline.ExampleLoader(source, [], 8, 'skip')
  before = sum(pipeline.skipped.values())
  assert loader(0, None) is None
  assert sum(pipeline.skipped.values()) == before + 1


def test_a_label_without_an_image(tmp_path, caplog):
  root = _yolo_folder(tmp_path, {'a': '0 0.5 0.5 0.2 0.2\n', 'ghost': '1 0.5 0.5 0.2 0.2\n'},
                      images=['a'])
  with pytest.raises(records.BadExampleError, match=r'ghost.txt.*without an image'):
    yolo.YoloSource(str(root), 'train')
  with caplog.at_level(logging.WARNING):
    source = yolo.YoloSource(str(root), 'train', on_bad_example='skip')
  assert len(source) == 1 and source.orphan_labels[0].endswith('ghost.txt')
  assert any('without an image' in r.getMessage() for r in caplog.records)


def test_class_names_from_yaml_map_or_classes_txt(tmp_path):
  (tmp_path / 'data.yaml').write_text('names:\n  0: person\n  1: bike\n')
  assert yolo.class_names(str(tmp_path)) == ('person', 'bike')
  (tmp_path / 'data.yaml').unlink()
  (tmp_path / 'classes.txt').write_text('boat\nbottle\n')
  assert yolo.class_names(str(tmp_path)) == ('boat', 'bottle')
  (tmp_path / 'classes.txt').unlink()
  with pytest.raises(FileNotFoundError, match='data.yaml'):
    yolo.class_names(str(tmp_path))


@pytest.mark.parametrize('fmt', ['yolo', 'voc'])
def test_the_custom_config_takes_its_classes_from_the_data(tmp_path, fmt):
  cfg = config_blocks.load_config(str(REPO / 'configs' / 'default.py')).data.builtin
  cfg.num_classes = 4
  writer = {'yolo': export_builtin.write_yolo, 'voc': export_builtin.write_voc}[fmt]
  root = writer(cfg, str(tmp_path / fmt), {'train': 3, 'val': 2})
  config = config_blocks.load_config(str(REPO / 'configs' / 'custom.py'))
  config.data.root = root
  config.data.format = fmt
  config_blocks.finalize(config)
  assert config.model.num_classes == 5
  assert sources.class_names(config.data) == ('circle', 'square', 'triangle', 'cross')
  # The exported boxes read back as the generated ones (VOC: to the pixel).
  source = sources.get_source(config.data, 'val')
  from smallssd_jax.datasets import builtin  # pylint: disable=g-import-not-at-top
  for i in range(2):
    want = builtin.render(cfg, 'test', i)
    got = source[i]
    np.testing.assert_array_equal(got['labels'], want['labels'])
    np.testing.assert_allclose(got['boxes'], want['boxes'], atol=1e-5 if fmt == 'yolo' else 4e-3)
    np.testing.assert_array_equal(got['image'], want['image'])


# ------------------------------------------------------------ fine-tuning ---


def _tree(classes, anchors=4, neck_width=8):
  return {'params': {
      'backbone': {'conv1_1': {'kernel': np.ones((3, 3, 3, 8), np.float32)}},
      'neck': {'fused': {'conv': {'kernel': np.ones((3, 3, neck_width, neck_width))}}},
      'head': {'classification': {'level0': {'kernel': np.ones((3, 3, 8, anchors * classes)),
                                             'bias': np.ones((anchors * classes,))}},
               'regression': {'level0': {'kernel': np.ones((3, 3, 8, anchors * 4)),
                                         'bias': np.ones((anchors * 4,))}}}}}


def test_fine_tuning_reinitialises_the_heads_that_do_not_fit():
  source, target = _tree(classes=21), _tree(classes=5)
  target['params']['backbone']['conv1_1']['kernel'] *= 0     # "initialised" values
  merged, report = ckpt_lib.merge_for_finetuning(source, target, 'the other run')
  # Everything that fits comes from the source ...
  np.testing.assert_array_equal(merged['params']['backbone']['conv1_1']['kernel'], 1.0)
  # ... the class heads of another class count stay initialised, and say so.
  assert merged['params']['head']['classification']['level0']['kernel'].shape[-1] == 20
  assert 'class heads re-initialised (another number of classes)' in report[0]
  assert 'head/classification/level0/kernel' in report[0]
  # Another prior scheme: the box heads too.
  merged, report = ckpt_lib.merge_for_finetuning(_tree(5, anchors=6), _tree(5, anchors=4), 'x')
  assert any('box heads re-initialised (another prior scheme)' in line for line in report)
  # Anything else that does not fit is an error naming the array and both shapes.
  with pytest.raises(errors.CheckpointError,
                     match=r'params/neck/fused/conv/kernel is \[3, 3, 16, 16\] in x, '
                           r'\[3, 3, 8, 8\] in the model'):
    ckpt_lib.merge_for_finetuning(_tree(5, neck_width=16), _tree(5), 'x')


# --------------------------------------------------------------- coverage ---


def _loop_coverage(boxes, priors, size, threshold):
  """The obviously-correct version: every box against every prior, in Python."""
  best, count = [], []
  for b in boxes:
    ious = []
    for cy, cx, h, w in priors:
      p = (cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2)
      ih = max(0.0, min(b[2], p[2]) - max(b[0], p[0]))
      iw = max(0.0, min(b[3], p[3]) - max(b[1], p[1]))
      inter = ih * iw
      union = (b[2] - b[0]) * (b[3] - b[1]) + h * w - inter
      ious.append(inter / union)
    best.append(max(ious))
    count.append(sum(i >= threshold for i in ious))
  sizes = [size * np.sqrt((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]
  rows = []
  for lo, hi in coverage.BUCKETS:
    sel = [i for i, s in enumerate(sizes) if lo <= s < hi]
    rows.append((len(sel), np.mean([best[i] >= threshold for i in sel]) if sel else None,
                 np.mean([count[i] for i in sel]) if sel else None,
                 np.median([best[i] for i in sel]) if sel else None))
  return rows


def test_coverage_equals_a_python_loop():
  rng = np.random.default_rng(0)
  yx = rng.uniform(0, 0.8, (60, 2))
  hw = np.exp(rng.uniform(np.log(0.01), np.log(0.5), (60, 2)))
  boxes = np.concatenate([yx, np.minimum(yx + hw, 1.0)], 1)
  priors = np.array([[0.25 + 0.5 * i, 0.25 + 0.5 * j, s, s * r] for i, j, s, r in
                     itertools.product(range(2), range(2), (0.05, 0.2, 0.5), (0.5, 1.0, 2.0))])
  got = coverage.coverage(boxes, priors, 300, 0.5)
  want = _loop_coverage(boxes, priors, 300, 0.5)
  for row, (n, covered, positives, median) in zip(got['buckets'], want):
    assert row['objects'] == n
    if n:
      assert row['covered'] == pytest.approx(covered)
      assert row['mean_positives'] == pytest.approx(positives)
      assert row['median_best_iou'] == pytest.approx(median)


def test_suggested_priors_cover_objects_the_defaults_miss_and_the_printed_flags_reproduce_it():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from smallssd_jax import config_lib  # pylint: disable=g-import-not-at-top
  # 10-14 px objects at 300: SSD300's smallest priors are 30 px (IoU < 0.25).
  rng = np.random.default_rng(1)
  side = rng.uniform(10, 14, 300) / 300
  yx = rng.uniform(0.05, 0.9, (300, 2))
  boxes = np.stack([yx[:, 0], yx[:, 1], yx[:, 0] + side, yx[:, 1] + side], 1)
  config = config_blocks.load_config(str(REPO / 'configs' / 'ssd300_voc0712.py'))
  found = coverage.suggest(boxes, config.anchors, 300)
  assert found['before']['covered'] < 0.05
  assert found['after']['covered'] > 0.5
  # The printed command line, split as a shell splits it and parsed as main.py parses it.
  config_lib.register_flag_parsers()
  flat = shlex.split(coverage.command_line(found['overrides']))
  values = flags.FlagValues()
  argv = ['prog', f'--config={REPO / "configs" / "ssd300_voc0712.py"}'] + flat
  holder = config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  values(argv)
  again = coverage.coverage(boxes, anchors_lib.from_config(holder.value.anchors), 300)
  assert again['covered'] == pytest.approx(found['after']['covered'])
  assert anchors_lib.anchors_per_location(holder.value.anchors) == \
      anchors_lib.anchors_per_location(config.anchors)


def test_level_prior_sizes_are_the_configs():
  config = config_blocks.load_config(str(REPO / 'configs' / 'ssd300_voc0712.py'))
  sizes = coverage.level_prior_sizes(config.anchors, 300)
  assert sizes[0][0] == 30.0 and min(sizes[1]) == 60.0
  assert len(sizes) == 6
