"""SSD512 on KITTI 2D object, 3 grouped classes: the DF-SSD paper's KITTI baseline.

Paper: 62.1 mAP (VOC-style AP@0.5 over the 3 classes).

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/ssd512_kitti.py --workdir=runs/ssd512_kitti

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/ssd512_kitti.py --workdir=runs/ssd512_kitti --mode=eval
  python -m smallssd_jax.main --config=configs/ssd512_kitti.py --workdir=runs/ssd512_kitti --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/ssd512_kitti.py:runlocal --workdir=/tmp/ssd512_kitti
"""

from smallssd_jax import config_blocks as blocks


def get_config(arg=None):
  arg = blocks.parse_arg(arg, runlocal=False)
  config = blocks.ConfigDict()
  # Model: VGG16 reduced-fc + SSD extra layers, SSD head (docs/design.md §3); 4 classes with
  # the background.
  config.update(blocks.ssd_model(input_size=512, num_classes=4))   # model, anchors, loss
  config.post = blocks.postprocess(max_detections=200)
  # Data: KITTI 2D object, 3 grouped classes, DontCare ignored (--config.data.root or tfds).
  config.data = blocks.kitti_data()
  # Schedule: batch 32, SGD momentum 0.9, weight decay 5e-4, lr 1e-3 divided by 10
  # at 80k, 100k, 120k iterations, a 1k-step warm-up.
  config.batch_size = 32
  config.num_train_steps = 120_000
  config.optim = blocks.sgd(lr=1e-3, boundaries=[80_000, 100_000], warmup_steps=1000)
  # Evaluation: VOC-style AP at IoU 0.5 over the 3 KITTI classes, and AP by object size, every
  # 10k steps and at the end.
  config.eval = blocks.evaluation('kitti')
  config.eval_every_steps = 10_000
  config.detect = blocks.detection()
  config.seed = 0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  config.init_from = ''      # e.g. vgg16_reducedfc.pth (ImageNet VGG16, as the papers start)
  config.runlocal = arg.runlocal
  return blocks.shrink_for_runlocal(config) if arg.runlocal else config
