"""DF-SSD300 on KITTI 2D object, 3 grouped classes (docs/design.md §4).

pedestrian = Pedestrian + Person_sitting, vehicle = Car + Van + Truck + Tram,
other = Cyclist + Misc; DontCare ignored. Metric: VOC-style AP@0.5 ('kitti').
Native folder: --config.data.root=/data/kitti (training/image_2, label_2),
deterministic train/val split; without root, tfds kitti.

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/dfssd300_kitti.py --workdir=runs/dfssd300_kitti

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/dfssd300_kitti.py --workdir=runs/dfssd300_kitti --mode=eval
  python -m smallssd_jax.main --config=configs/dfssd300_kitti.py --workdir=runs/dfssd300_kitti --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/dfssd300_kitti.py:runlocal --workdir=/tmp/dfssd300_kitti
"""

from smallssd_jax import presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, runlocal=False)
  config = presets.paper_config(
      presets.dfssd_model(300, num_classes=4), presets.kitti_data(), metric='kitti',
      batch_size=32, steps=120_000, boundaries=(80_000, 100_000))
  return presets.runlocal(config) if arg.runlocal else config
