"""SSD300 on COCO 2017 (train2017 -> val2017): the COCO baseline (25.1 AP in the SSD paper).

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco --mode=eval
  python -m smallssd_jax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/ssd300_coco.py:runlocal --workdir=/tmp/ssd300_coco
"""

from smallssd_jax import config_blocks as blocks


def get_config(arg=None):
  arg = blocks.parse_arg(arg, runlocal=False)
  config = blocks.ConfigDict()
  # Model: VGG16 reduced-fc + SSD extra layers, SSD head (docs/design.md §3); 81 classes with
  # the background.
  config.update(blocks.ssd_model(input_size=300, num_classes=81))   # model, anchors, loss
  config.post = blocks.postprocess(max_detections=100)
  # Data: COCO 2017 train2017 -> val2017 (--config.data.root, json + images).
  config.data = blocks.coco_data()
  # Schedule: batch 32, SGD momentum 0.9, weight decay 5e-4, lr 1e-3 divided by 10
  # at 280k, 360k, 400k iterations, a 1k-step warm-up.
  config.batch_size = 32
  config.num_train_steps = 400_000
  config.optim = blocks.sgd(lr=1e-3, boundaries=[280_000, 360_000], warmup_steps=1000)
  # Evaluation: COCO AP@[.5:.95], AP50/75, APs/m/l (pycocotools-equal), at most 100 per image,
  # every 10k steps and at the end.
  config.eval = blocks.evaluation('coco')
  config.eval_every_steps = 10_000
  config.detect = blocks.detection()
  config.seed = 0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  config.init_from = ''      # e.g. vgg16_reducedfc.pth (ImageNet VGG16, as the papers start)
  config.runlocal = arg.runlocal
  return blocks.shrink_for_runlocal(config) if arg.runlocal else config
