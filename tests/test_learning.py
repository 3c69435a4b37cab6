"""Every detector learns under the shipped recipe: its loss falls, and its detections beat
an untrained model's on the images it trained on.

A regression in any neck (DF-SSD's fusion, SkipFPN-GRF's pyramid and two-step
head) that stops a detector from learning fails here, at runlocal scale: the
default recipe (`configs/default.py`: backbone BatchNorm, small head
initialisation, SGD with warm-up and the gradient clip), on 8 built-in
training images without augmentation.
"""

import pathlib

import jax
import numpy as np
import pytest

from smallssd_jax import metrics
from smallssd_jax import predictor as predictor_lib
from smallssd_jax import sharding
from smallssd_jax import task as task_lib
from smallssd_jax import train
from smallssd_jax.config_blocks import load_config
from smallssd_jax.datasets import pipeline

pytestmark = pytest.mark.slow

CONFIG = str(pathlib.Path(__file__).parents[1] / 'configs' / 'default.py')
STEPS = 60
IMAGES = 8


def overfit_config(model: str):
  cfg = load_config(f'{CONFIG}:model={model},runlocal')
  cfg.data.builtin.num_train = IMAGES
  cfg.data.augment = []
  cfg.num_train_steps = STEPS
  cfg.optim.warmup_steps = 10
  cfg.optim.boundaries = [0.9, 0.95]
  cfg.post.score_threshold = 0.05
  return cfg


def train_map(cfg, variables) -> float:
  """VOC07 mAP of `variables` on the training images themselves."""
  source = pipeline.get_source(cfg.data, cfg.data.train_split)
  examples = [source[i] for i in range(IMAGES)]
  predictor = predictor_lib.Predictor.from_config(cfg, variables, class_names=())
  found = predictor([e['image'] for e in examples], score_threshold=0.05)
  truth = [{'boxes': e['boxes'] * np.tile(e['image'].shape[:2], 2), 'labels': e['labels']}
           for e in examples]
  dets = [{'boxes': d.boxes, 'scores': d.scores, 'labels': d.classes} for d in found]
  return metrics.evaluate(truth, dets, 'voc07',
                          num_classes=cfg.model.num_classes - 1)['mAP']


@pytest.mark.parametrize('model', ['ssd', 'dfssd', 'skipfpn'])
def test_each_detector_learns(model):
  cfg = overfit_config(model)
  mesh = sharding.make_mesh()
  task = task_lib.build_task(cfg)
  state = task_lib.create_train_state(task, cfg, task_lib.init_rng(cfg.seed), mesh)
  untrained = jax.device_get(task_lib.variables_of(state))
  step_fn = train.jit_train_step(task, cfg, mesh, state)
  batches = pipeline.make_train_iterator(cfg)
  rng = jax.random.key(0)
  history = []
  for _ in range(STEPS):
    state, out = step_fn(state, sharding.to_global_batch(next(batches), mesh), rng)
    history.append(float(out['loss']))
  assert np.all(np.isfinite(history)) and int(state.bad_step) == -1
  first, last = np.mean(history[:5]), np.mean(history[-5:])
  assert last < 0.6 * first, history
  before = train_map(cfg, untrained)
  after = train_map(cfg, jax.device_get(task_lib.variables_of(state)))
  assert after > before + 0.05, (before, after)
