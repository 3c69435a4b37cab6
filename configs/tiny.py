"""The main job's recipe on a harder built-in dataset where tiny objects dominate.

Same detectors, width, schedule and evaluation as `configs/default.py` (it
takes the same arguments); only the data differ: 16-48 objects per image,
4-24 pixels (sqrt of the box area, log-uniform, so about two thirds are
under 12 px), and 4-16 unlabelled distractors per image drawn from the
shapes of the classes left out (diamonds, frames, stripes, half discs), as
clear as the objects. Every object is COCO-small.

  python -m smallssd_jax.main --config=configs/tiny.py:dfssd --workdir=runs/tiny_dfssd
"""

import pathlib

from smallssd_jax import config_blocks


def get_config(arg=None):
  default = pathlib.Path(__file__).with_name('default.py')
  config = config_blocks.load_config(f'{default}:{arg}' if arg else str(default))
  config.data.builtin.update(dict(
      min_size=4.0, max_size=24.0,
      min_objects=16, max_objects=48,
      min_distractors=4, max_distractors=16,
  ))
  config.data.max_boxes = 64          # >= max_objects
  return config
