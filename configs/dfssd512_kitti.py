"""DF-SSD512 on KITTI 2D object, 3 grouped classes (docs/design.md §4).

Paper: 68.9 mAP vs SSD512 62.1 (VOC-style AP@0.5 over the 3 classes).

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/dfssd512_kitti.py --workdir=runs/dfssd512_kitti

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/dfssd512_kitti.py --workdir=runs/dfssd512_kitti --mode=eval
  python -m smallssd_jax.main --config=configs/dfssd512_kitti.py --workdir=runs/dfssd512_kitti --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/dfssd512_kitti.py:runlocal --workdir=/tmp/dfssd512_kitti
"""

from smallssd_jax import presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, runlocal=False)
  config = presets.paper_config(
      presets.dfssd_model(512, num_classes=4), presets.kitti_data(), metric='kitti',
      batch_size=32, steps=120_000, boundaries=(80_000, 100_000))
  return presets.runlocal(config) if arg.runlocal else config
