"""Every config file loads, documents its command, and builds a consistent detector."""

import pathlib

import pytest

from smallssd_jax import anchors as anchors_lib
from smallssd_jax import models
from smallssd_jax import config_blocks
from smallssd_jax.config_blocks import load_config

CONFIGS = sorted(p for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py'))


def test_there_are_configs_for_every_paper_setting():
  names = {p.stem for p in CONFIGS}
  for want in ('default', 'ssd300_voc0712', 'ssd512_voc0712', 'dfssd300_voc0712',
               'dfssd512_voc0712', 'dfssd300_kitti', 'dfssd512_kitti', 'skipfpn320_voc0712',
               'skipfpn512_voc0712', 'skipfpn320_coco', 'skipfpn512_coco'):
    assert want in names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_docstring_holds_its_command(path):
  text = path.read_text()
  assert f'--config=configs/{path.name}' in text


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_full_config_priors_match_the_model(path):
  config = load_config(str(path))
  if path.stem == 'custom':   # the classes come from the user's data at finalize
    assert config.model.num_classes == 0
    config.model.num_classes = 4
  priors = anchors_lib.from_config(config.anchors)
  assert priors.shape[0] == anchors_lib.prior_count(config.anchors)
  module = models.build_detector(config.model, anchors_lib.anchors_per_location(config.anchors))
  models.check_anchor_count(module, config.model, priors.shape[0])   # eval_shape only
  assert config.model.num_classes >= 2
  assert config.eval.metric in ('voc07', 'voc', 'coco', 'kitti')


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_runlocal_variant_is_small_and_self_contained(path):
  config = load_config(f'{path}:runlocal')
  assert config.model.width <= 0.125
  assert config.num_train_steps <= 50
  assert config.data.name == 'builtin_small'
  assert config.model.num_classes == config.data.builtin.num_classes + 1


def test_parse_arg():
  arg = config_blocks.parse_arg('ssd,runlocal,width=0.5', model='dfssd', runlocal=False, width=0.125)
  assert (arg.model, arg.runlocal, arg.width) == ('ssd', True, 0.5)
  with pytest.raises(ValueError, match='unknown'):
    config_blocks.parse_arg('depth=3', model='dfssd')
  assert config_blocks.parse_arg('runlocal=False', runlocal=True).runlocal is False
  with pytest.raises(ValueError, match='runlocal must be True or False'):
    config_blocks.parse_arg('runlocal=maybe', runlocal=False)


def test_default_config_rejects_unknown_model():
  with pytest.raises(ValueError, match='yolo'):
    load_config(f'{CONFIGS[0].parent / "default.py"}:yolo')


@pytest.mark.parametrize('text,want', [
    ('[100, 200]', [100, 200]), ('100,200', [100, 200]), ('flip, zoom_out', ['flip', 'zoom_out']),
    ("['nconv4_3']", ['nconv4_3']), ('nconv4_3', ['nconv4_3']), ('', []), ('[]', []),
    ('[[2], [2, 3]]', [[2], [2, 3]]), ('(1.5, 2)', [1.5, 2])])
def test_list_fields_parse_from_the_command_line(text, want):
  from smallssd_jax import config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.parse_list(text) == want


def test_config_flag_overrides_list_fields():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from smallssd_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.register_flag_parsers()
  values = flags.FlagValues()
  path = str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py')
  argv = ['prog', f'--config={path}', '--config.optim.boundaries=10,20',
          '--config.data.augment=flip', '--config.data.mean=[1.0, 2.0, 3.0]']
  holder = config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                           sys_argv=argv)
  values(argv)
  assert list(holder.value.optim.boundaries) == [10, 20]
  assert list(holder.value.data.augment) == ['flip']
  assert list(holder.value.data.mean) == [1.0, 2.0, 3.0]
