"""SkipFPN-GRF512 on COCO 2017 (train2017 -> val2017) (docs/design.md §5).

Train and evaluate (GPU / TPU; set the data location first, see README):

  python -m smallssd_jax.main --config=configs/skipfpn512_coco.py --workdir=runs/skipfpn512_coco

Evaluate a checkpoint, or draw detections:

  python -m smallssd_jax.main --config=configs/skipfpn512_coco.py --workdir=runs/skipfpn512_coco --mode=eval
  python -m smallssd_jax.main --config=configs/skipfpn512_coco.py --workdir=runs/skipfpn512_coco --mode=detect --config.detect.input=IMAGES

Run-local check of the same setting (tiny width, built-in data, a minute on a CPU):

  python -m smallssd_jax.main --config=configs/skipfpn512_coco.py:runlocal --workdir=/tmp/skipfpn512_coco
"""

from smallssd_jax import presets


def get_config(arg=None):
  arg = presets.parse_arg(arg, runlocal=False)
  config = presets.paper_config(
      presets.skipfpn_model(512, num_classes=81), presets.coco_data(), metric='coco',
      batch_size=16, steps=140_000, boundaries=(80_000, 100_000, 120_000))
  return presets.runlocal(config) if arg.runlocal else config
