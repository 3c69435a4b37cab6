"""What a run prints: the library's own messages, not every dependency's INFO logging.

Orbax, grain and JAX log dozens of INFO lines (whole option reprs) before a
run's first step; on a terminal they bury the progress bar, in a cluster log
the run itself. The command-line entry points keep third-party records below
WARNING out (`--log_libraries` brings them back); the library's own INFO
records and every warning and error stay.
"""

from __future__ import annotations

import logging
import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


# Warnings that say nothing to a user: orbax's note that a checkpoint folder
# opened for reading is read-only.
_EXPECTED = ('Given directory is read only',)


class _OwnOrImportant(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    return record.levelno >= logging.WARNING and not str(record.msg).startswith(_EXPECTED)


_FILTER = _OwnOrImportant()


def quiet_library_logs(quiet: bool = True) -> None:
  """Drops third-party log records below WARNING (or, with quiet=False, stops doing so)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handlers = [absl_logging.get_absl_handler()] + logging.getLogger().handlers
  for handler in handlers:
    handler.removeFilter(_FILTER)
    if quiet:
      handler.addFilter(_FILTER)
