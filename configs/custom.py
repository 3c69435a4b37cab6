"""Your own small-object data: YOLO, VOC-style or COCO-json folders; the classes are the dataset's.

  python -m smallssd_jax.main --config=configs/custom.py --workdir=runs/mine \
      --config.data.root=/data/mine [--config.data.format=yolo|voc|coco]

Layouts (README "Train on your own data"; datasets/sources.py):

  yolo  <root>/data.yaml (names) or classes.txt, images/{train,val}/*.jpg,
        labels/{train,val}/*.txt (`class cx cy w h`, normalised)
  voc   <root>/Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{train,val}.txt
        (classes from classes.txt, else the names in the train annotations)
  coco  <root>/annotations/instances_{train,val}.json, <root>/{train,val}/

The recipe is the built-in data's (from scratch: BatchNorm in the backbone,
small head initialisation, SGD with warm-up and a gradient clip), at full
width. To start from a run trained on other classes (fine-tuning), pass
`--config.init_from=runs/other`: everything that fits is loaded and the class
heads are re-initialised (logged). Arguments: `model=ssd|dfssd|skipfpn`,
`width=`, `steps=`, `batch=`, `seed=`, `runlocal`.
"""

from smallssd_jax import config_blocks as blocks


def get_config(arg=None):
  arg = blocks.parse_arg(arg, model='ssd', runlocal=False, width=1.0, steps=12_000, batch=32,
                         seed=0)
  config = blocks.ConfigDict()
  # Model: a registered detector at its paper input size; the classes come from the
  # data (num_classes 0 = set by finalize from the dataset in data.root).
  config.update(blocks.model(arg.model, num_classes=0))   # model, anchors, loss
  config.model.width = arg.width
  config.model.backbone_batch_norm = True
  config.model.head_init = 'small'
  config.post = blocks.postprocess()
  # Data: your folder (--config.data.root), its splits 'train' and 'val'.
  config.data = blocks.custom_data('yolo')
  # Schedule: SGD lr 1e-2 after a linear warm-up (5% of the run, at most 1000 steps),
  # /10 at 70% and 90% of the run, global gradient clip at 10.
  config.batch_size = arg.batch
  config.num_train_steps = arg.steps
  config.optim = blocks.sgd(lr=1e-2, boundaries=[0.7, 0.9],
                            warmup_steps=min(1000, arg.steps // 20), grad_clip_norm=10.0)
  # Evaluation: VOC07 11-point mAP and AP by object size, every 2000 steps and at the end.
  config.eval = blocks.evaluation('voc07', batch_size=16)
  config.eval_every_steps = 2000
  config.detect = blocks.detection(score_threshold=0.3, max_images=8)
  config.seed = arg.seed
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.init_from = ''
  config.runlocal = arg.runlocal
  if arg.runlocal:
    blocks.shrink_for_runlocal(config, width=arg.width / 8, steps=20)
    config.eval_every_steps = 0
  return config
