"""DF-SSD300 on VOC07+12, tested on VOC07 test (docs/design.md §4).

Paper: 80.9 mAP (the text also says 81.4); small-object classes 68.0.
Training recipe as SSD300 (the paper does not give its own).

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/dfssd300_voc0712.py --workdir=runs/dfssd300_voc0712

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/dfssd300_voc0712.py --workdir=runs/dfssd300_voc0712 --mode=eval
  python -m smallssd_jax.main --config=configs/dfssd300_voc0712.py --workdir=runs/dfssd300_voc0712 --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/dfssd300_voc0712.py:runlocal --workdir=/tmp/dfssd300_voc0712
"""

from smallssd_jax import config_blocks as blocks


def get_config(arg=None):
  arg = blocks.parse_arg(arg, runlocal=False)
  config = blocks.ConfigDict()
  # Model: VGG16 reduced-fc + SSD extras, DF-SSD neck (deconvolution + weighted fusion), SSD
  # head (docs/design.md §4); 21 classes with the background.
  config.update(blocks.dfssd_model(input_size=300, num_classes=21))   # model, anchors, loss
  config.post = blocks.postprocess(max_detections=200)
  # Data: VOC07+12 trainval -> VOC07 test (tfds, or a VOCdevkit with --config.data.root).
  config.data = blocks.voc0712_data()
  # Schedule: batch 32, SGD momentum 0.9, weight decay 5e-4, lr 1e-3 divided by 10
  # at 80k, 100k, 120k iterations, a 1k-step warm-up.
  config.batch_size = 32
  config.num_train_steps = 120_000
  config.optim = blocks.sgd(lr=1e-3, boundaries=[80_000, 100_000], warmup_steps=1000)
  # Evaluation: VOC07 11-point mAP (the papers' metric) and AP by object size, every 10k steps
  # and at the end.
  config.eval = blocks.evaluation('voc07')
  config.eval_every_steps = 10_000
  config.detect = blocks.detection()
  config.seed = 0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  config.init_from = ''      # e.g. vgg16_reducedfc.pth (ImageNet VGG16, as the papers start)
  config.runlocal = arg.runlocal
  return blocks.shrink_for_runlocal(config) if arg.runlocal else config
