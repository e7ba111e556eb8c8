"""The project's error types: what an entry point reports as one line instead of a traceback.

Errors a user can act on (a config value, a data file, a workdir, a damaged checkpoint, a run
that diverged) have their own types; every other exception is a bug or an environment failure
and keeps its traceback. The data and output errors live beside the code that raises them
(`data.DataError`, `fileio.OutputError`); the config's (`ConfigError`, also
`config_utils.ConfigError`) and the run's own are here, and `user_errors()` lists them all for the
entry points:

  try:
    ...
  except errors.user_errors() as e:
    sys.exit(f'error: {e}')

Some subclass a builtin as well so that callers written against the builtin keep working
(`CheckpointError` is a `FileNotFoundError`, `DivergedError` a `FloatingPointError`).
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config field has a value it cannot have, or disagrees with another field.

  Here, not in `run.config_rules`, so that `user_errors` imports nothing of `run/` (every `run/`
  module imports this one).
  """


class RunError(Exception):
  """A training or evaluation run cannot go on for a reason its message explains."""


class WorkdirError(RunError):
  """The workdir is locked by another run, not shared by all hosts, or holds another config."""


class CheckpointError(RunError, FileNotFoundError):
  """No (intact) checkpoint where one is needed; the message names the folder and the damage."""


class CheckpointMismatchError(RunError):
  """An intact checkpoint whose arrays do not fit the config's model or optimizer."""


class DivergedError(RunError, FloatingPointError):
  """The loss, the gradients, the parameters or the validation figures became NaN or infinite."""


class Preempted(RunError):  # noqa: N818 (an event, not a failure)
  """The run was asked to stop (SIGTERM) and saved a checkpoint to resume from."""


class DistributedError(RunError):
  """The multi-process launch is incomplete or inconsistent (coordinator, process count, id)."""


class OptionError(RunError, ValueError):
  """A command-line flag (or the library argument behind it) has a value it cannot have.

  The message spells the flag as the command line does (`--max_value`, `--pan_key`).
  """


class Interrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT asked a command to stop (raised by its signal handler).

  A `KeyboardInterrupt`, so that no `except Exception` swallows it and every `finally` and
  context manager on the way out runs (temporary files are removed).

  Attributes:
    signal_name: 'SIGTERM' or 'SIGINT'.
    status: the exit status of a process that signal ended (128 + its number).
  """

  def __init__(self, signal_name: str, status: int):
    super().__init__(signal_name)
    self.signal_name, self.status = signal_name, status


def user_errors() -> tuple[type[BaseException], ...]:
  """Every error type an entry point turns into one clear line (the rest keep a traceback)."""
  # Imported here: this module must stay importable from every other one without cycles.
  from u2net_jax.data import DataError
  from u2net_jax.io import fileio

  return (RunError, ConfigError, DataError, fileio.OutputError)
