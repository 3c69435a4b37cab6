"""The main job: a small detector trained and evaluated on the built-in small-object dataset.

No download, CPU-friendly. The README's first command:

  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default

trains a reduced-width SSD300 on `builtin_small`, evaluates it (VOC07 mAP
plus AP by object size) and draws its detections on test images. The other
two detectors on the same data, same width and schedule:

  python -m smallssd_jax.main --config=configs/default.py:dfssd --workdir=runs/default_dfssd
  python -m smallssd_jax.main --config=configs/default.py:skipfpn --workdir=runs/default_skipfpn

Arguments (comma separated): the model (`ssd` | `dfssd` | `skipfpn`),
`runlocal` (a few steps, for tests), `width=`, `steps=`, `seed=`.
"""

from smallssd_jax import presets

MODELS = {
    'dfssd': lambda n: presets.dfssd_model(300, num_classes=n),
    'ssd': lambda n: presets.ssd_model(300, num_classes=n),
    'skipfpn': lambda n: presets.skipfpn_model(320, num_classes=n),
}


def get_config(arg=None):
  arg = presets.parse_arg(arg, model='ssd', runlocal=False, width=0.125, steps=200, seed=0)
  if arg.model not in MODELS:
    raise ValueError(f'configs/default.py: model {arg.model!r} not in {sorted(MODELS)}')
  data = presets.data('builtin_small', max_boxes=48, eval_split='test')
  data.builtin.num_classes = 6
  config = presets.base_config(MODELS[arg.model](data.builtin.num_classes + 1))
  config.data = data
  config.data.builtin.image_size = config.model.input_size
  config.data.builtin.num_test = 150
  config.data.augment = ['photometric', 'zoom_out', 'min_iou_crop', 'flip']
  config.data.zoom_out_max = 2.0      # objects are already small; 4x would shrink them to nothing
  config.model.width = arg.width
  # From scratch, a plain VGG16 without BatchNorm barely moves in a few hundred
  # steps (SSD300 scored 0.0 mAP after 300); BN in the backbone and extra layers
  # (ScratchDet) makes SSD300 and SkipFPN-GRF train (DF-SSD300 does not under
  # this recipe: docs/results.md).
  config.model.backbone_batch_norm = True
  # ...and heads that start near zero, so the first steps are not spent
  # undoing logits of Xavier-initialised heads on unit-variance BN features.
  config.model.head_init = 'small'
  config.seed = arg.seed

  config.batch_size = 8
  config.num_train_steps = arg.steps
  config.optim = presets.sgd(lr=1e-2, boundaries=(int(arg.steps * 0.7), int(arg.steps * 0.9)),
                             warmup_steps=min(100, arg.steps // 5))
  config.optim.grad_clip_norm = 10.0
  config.log_every_steps = 25
  config.eval_every_steps = 0          # evaluate once, at the end
  config.checkpoint_every_steps = 500
  config.eval.metric = 'voc07'
  config.eval.batch_size = 16
  config.detect.max_images = 4
  config.detect.score_threshold = 0.15   # a short run's scores are low; draw what it finds

  if arg.runlocal:
    presets.runlocal(config, width=arg.width / 2, steps=6)
    config.data.builtin.num_test = 8
    config.eval.num_examples = 8
  return config
