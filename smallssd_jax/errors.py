"""The errors a run can end with, and the exit status each gives (README "When things go wrong").

Every error the library raises on purpose for a run derives from `RunError`;
`main.py` prints its message and exits with its `exit_code`. Anything else is
a bug or an environment failure and exits 1 with a traceback.
"""


class RunError(Exception):
  """A run ended early for a reason the message explains."""
  exit_code = 1


class ConfigError(RunError, ValueError):
  """The config (or command line) is invalid; nothing was trained."""
  exit_code = 2


class EvaluationFailed(RunError):
  """Training finished and its checkpoint is saved, but an evaluation failed."""
  exit_code = 3


class StoppedOnRequest(RunError):
  """SIGTERM / Ctrl-C: a checkpoint was saved; the same command resumes."""
  exit_code = 4


class NonFiniteLossError(RunError, RuntimeError):
  """The loss or gradient went NaN / inf; the last good checkpoint is kept."""
  exit_code = 5


class CheckpointError(RunError):
  """No intact checkpoint could be read where one was needed."""
  exit_code = 6


class WorkdirBusy(RunError):
  """Another live process is training in the same workdir."""
  exit_code = 7


class InputError(RunError, ValueError):
  """An input to detect or export (an image, a video) cannot be used; the message names it."""
  exit_code = 8


class MissingExtra(RunError, ImportError):
  """An optional feature's packages are not installed; the message gives the pip line."""
  exit_code = 9
