"""The main job: a small detector trained and evaluated on the built-in small-object dataset.

No download, CPU-friendly. The README's first command:

  python -m smallssd_jax.main --config=configs/default.py:skipfpn --workdir=runs/default

trains a reduced-width SkipFPN-GRF320 on `builtin_small` (the detector the
comparison in docs/results.md finds best on small objects at this budget),
evaluates it (VOC07 mAP plus AP by object size) and draws its detections on
test images. The other two detectors on the same data, same width and schedule:

  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default_ssd
  python -m smallssd_jax.main --config=configs/default.py:dfssd --workdir=runs/default_dfssd

Arguments (comma separated): the model (`ssd` | `dfssd` | `skipfpn`),
`runlocal` (a few steps, for tests), `width=`, `steps=`, `seed=`.
"""

from smallssd_jax import config_blocks as blocks


def get_config(arg=None):
  arg = blocks.parse_arg(arg, model='ssd', runlocal=False, width=0.125, steps=200, seed=0)
  config = blocks.ConfigDict()
  # Model: one of the registered detectors at its paper input size (300, or 320 for
  # SkipFPN-GRF), 6 classes + background, 1/8 width, trained from scratch: BatchNorm
  # in the backbone and extra layers (ScratchDet: a plain VGG16 barely moves in a few
  # hundred steps), heads initialised near zero (normal 0.01) so the first steps are
  # not spent undoing large random logits (docs/design.md §9).
  config.update(blocks.model(arg.model, num_classes=7))   # model, anchors, loss
  config.model.width = arg.width
  config.model.backbone_batch_norm = True
  config.model.head_init = 'small'
  if arg.model == 'skipfpn':
    # The two-step head's step-two classification, weighted 8: from scratch, its class
    # head reads the freshly initialised pyramid and held 1% of the gradient, at chance
    # after 200 steps with weight 1 (measured in docs/results.md; docs/design.md §9).
    config.loss.odm_cls_weight = 8.0
  config.post = blocks.postprocess()
  # Data: the built-in small-object dataset at the model's input size: 4-32 shapes of
  # 6-64 px per image (docs/design.md §6). Horizontal flips only: a run sees at most
  # one pass over the 8192 training images, so no image repeats and the Caffe
  # zoom-out / crop / colour augmentation only moves the training objects away from
  # the test ones (measured in docs/results.md; docs/design.md §9).
  config.data = blocks.data('builtin_small', max_boxes=48, eval_split='test')
  config.data.builtin.image_size = config.model.input_size
  config.data.builtin.num_test = 150
  config.data.augment = ['flip']
  # Schedule: batch 8, SGD lr 1e-2 after a linear warm-up (a fifth of the run, at most
  # 100 steps), /10 at 70% and 90% of the run, global gradient clip at 10.
  config.batch_size = 8
  config.num_train_steps = arg.steps
  config.optim = blocks.sgd(lr=1e-2, boundaries=[0.7, 0.9], warmup_steps=min(100, arg.steps // 5),
                            grad_clip_norm=10.0)
  # Evaluation: VOC07 11-point mAP and AP by object size, once, at the end; then the
  # detections on 4 test images are drawn (scores of a short run are low: >= 0.15).
  config.eval = blocks.evaluation('voc07', batch_size=16)
  config.eval_every_steps = 0
  config.detect = blocks.detection(score_threshold=0.15, max_images=4)
  config.seed = arg.seed
  config.log_every_steps = 25
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.init_from = ''
  config.runlocal = arg.runlocal
  if arg.runlocal:
    blocks.shrink_for_runlocal(config, width=arg.width / 2, steps=6)
    config.data.builtin.num_test = 8
    config.eval.num_examples = 8
  return config
