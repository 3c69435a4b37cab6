"""Command line: train, evaluate or detect with one config file.

  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default
  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default --mode=eval
  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default \
      --mode=detect --config.detect.input=path/to/images

Everything else is in the config (`--config.key=value` overrides any entry).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

import smallssd_jax  # noqa: F401  (CPU XLA defaults before any backend starts)
from smallssd_jax import config_lib
from smallssd_jax import runner

config_lib.register_flag_parsers()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'detect'],
                          'train (then evaluate and draw detections), eval, or detect.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runner.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == '__main__':
  app.run(main)
