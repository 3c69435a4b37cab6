"""Command line: train, evaluate or detect with one config file.

  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default
  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default --mode=eval
  python -m smallssd_jax.main --config=configs/default.py --workdir=runs/default \
      --mode=detect --config.detect.input=path/to/images

Everything else is in the config: `--config.key=value` overrides any field
(lists too: `--config.optim.boundaries=0.6,0.8`), after the config file and
its arguments (`configs/x.py:runlocal`), so the command line always wins.

Exit status: 0 done; 2 invalid config (nothing trained); 3 trained and saved
but an evaluation failed; 4 stopped on request (resume with the same
command); 5 non-finite loss; 6 no intact checkpoint; 7 workdir in use by
another run; 8 unreadable input (an image, a video); 9 an optional extra is
not installed (the message names the pip line); 1 anything else (a traceback
follows).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from smallssd_jax import _xla
from smallssd_jax import config_blocks
from smallssd_jax import config_lib
from smallssd_jax import console
from smallssd_jax import errors
from smallssd_jax import runner

config_lib.register_flag_parsers()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'detect'],
                          'train (then evaluate and draw detections), eval, or detect.')
_LOG_LIBRARIES = flags.DEFINE_bool('log_libraries', False,
                                   "Also show JAX's, orbax's and grain's INFO logging.")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _xla.apply_cpu_xla_defaults()      # before any JAX backend starts
  console.quiet_library_logs(not _LOG_LIBRARIES.value)
  config = config_blocks.finalize(_CONFIG.value)
  try:
    runner.run(config, _WORKDIR.value, _MODE.value)
  except errors.RunError as e:
    print(f'\n{type(e).__name__}: {e}', file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


if __name__ == '__main__':
  app.run(main)
