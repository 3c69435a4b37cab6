"""SSD300 on VOC07+12 trainval, tested on VOC07 test: the baseline (docs/design.md §3).

Paper reference: 77.2 mAP (VOC07 11-point). Recipe: SGD 0.9, wd 5e-4, batch 32,
lr 1e-3 with steps at 80k and 100k, 120k iterations.

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/ssd300_voc0712.py --workdir=runs/ssd300_voc0712

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/ssd300_voc0712.py --workdir=runs/ssd300_voc0712 --mode=eval
  python -m smallssd_jax.main --config=configs/ssd300_voc0712.py --workdir=runs/ssd300_voc0712 --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/ssd300_voc0712.py:runlocal --workdir=/tmp/ssd300_voc0712
"""

from smallssd_jax import presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, runlocal=False)
  config = presets.paper_config(
      presets.ssd_model(300, num_classes=21), presets.voc0712_data(), metric='voc07',
      batch_size=32, steps=120_000, boundaries=(80_000, 100_000))
  return presets.runlocal(config) if arg.runlocal else config
