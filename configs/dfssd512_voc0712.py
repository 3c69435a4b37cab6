"""DF-SSD512 on VOC07+12, tested on VOC07 test (docs/design.md §4).

Paper: 82.6 mAP; small-object classes 71.7.

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/dfssd512_voc0712.py --workdir=runs/dfssd512_voc0712

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/dfssd512_voc0712.py --workdir=runs/dfssd512_voc0712 --mode=eval
  python -m smallssd_jax.main --config=configs/dfssd512_voc0712.py --workdir=runs/dfssd512_voc0712 --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/dfssd512_voc0712.py:runlocal --workdir=/tmp/dfssd512_voc0712
"""

from smallssd_jax import presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, runlocal=False)
  config = presets.paper_config(
      presets.dfssd_model(512, num_classes=21), presets.voc0712_data(), metric='voc07',
      batch_size=32, steps=120_000, boundaries=(80_000, 100_000))
  return presets.runlocal(config) if arg.runlocal else config
