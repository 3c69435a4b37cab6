"""SSD300 on COCO 2017 (train2017 -> val2017): the COCO baseline (25.1 AP in the SSD paper).

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco --mode=eval
  python -m smallssd_jax.main --config=configs/ssd300_coco.py --workdir=runs/ssd300_coco --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/ssd300_coco.py:runlocal --workdir=/tmp/ssd300_coco
"""

from smallssd_jax import presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, runlocal=False)
  config = presets.paper_config(
      presets.ssd_model(300, num_classes=81), presets.coco_data(), metric='coco',
      batch_size=32, steps=400_000, boundaries=(280_000, 360_000))
  return presets.runlocal(config) if arg.runlocal else config
