"""Console verbosity in one place: quiet by default, everything back with `-v 1`/`--verbosity=1`.

Libraries the project uses talk a lot on every run: orbax logs a dozen INFO lines per checkpoint
read or write and two WARNINGs on every read-only restore ("CheckpointManagerOptions.read_only=
True, setting save_interval_steps=0", "Given directory is read only"), jax logs at INFO which
accelerator backends it could not find, and libtpu's C++ logging prints INFO banners. None of it
is something a user can act on. `configure()` hides it:

- records of orbax and jax's backend discovery below WARNING, and the two orbax warnings above
  (they describe the read-only restore the project asks for), are dropped from the console;
- the C++ INFO logging of XLA/libtpu is switched off (`TF_CPP_MIN_LOG_LEVEL=1`) unless the user
  set that variable; it must be set before jax starts a backend, so call `configure()` early.

Every other record passes, the project's own INFO lines included, and so does every WARNING or
ERROR that is not on the list. `python train.py ... -v 1` (absl's `--verbosity`) shows
everything again; so does `configure(verbosity=1)` in a notebook.
"""

from __future__ import annotations

import logging as logging_std
import os

from absl import logging

# Loggers or source folders whose INFO chatter is internal (matched against the record's logger
# name and its source path).
_CHATTY_SOURCES = ('orbax', 'libtpu', 'jax._src.xla_bridge', 'jax/_src/xla_bridge')
# Warnings about what the project does on purpose: a read-only CheckpointManager for restores, a
# params-only checkpoint (converted weights) saved without the best-checkpoint metric.
_EXPECTED_WARNINGS = (
  'CheckpointManagerOptions.read_only=True',
  'Given directory is read only',
  'Requested `tracked_metric`; did not provide metrics',
)


class QuietFilter(logging_std.Filter):
  """Drops the chatter described in the module docstring; passes every other record."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno >= logging_std.ERROR:
      return True
    where = f'{record.name} {record.pathname}'
    if not any(source in where for source in _CHATTY_SOURCES):
      return True
    if record.levelno < logging_std.WARNING:
      return False
    message = str(record.msg)
    return not any(message.startswith(expected) for expected in _EXPECTED_WARNINGS)


_FILTER = QuietFilter()


def _targets() -> list:
  """Where records pass: absl's logger (orbax logs through it), absl's handler, root handlers."""
  root = logging_std.getLogger()
  return [logging_std.getLogger('absl'), logging.get_absl_handler(), *root.handlers]


def configure(verbosity: int | None = None) -> int:
  """Quiets library chatter unless the verbosity is 1 or more.

  Idempotent; a later call with a higher verbosity removes the filter again.

  Args:
    verbosity: absl's verbosity (`-v N`); None reads the one in force (the `--verbosity` flag
      once absl has parsed the command line, 0 by default).

  Returns:
    The verbosity in force.
  """
  if verbosity is None:
    verbosity = logging.get_verbosity()
  verbose = verbosity >= 1
  for target in _targets():
    if verbose:
      target.removeFilter(_FILTER)
    elif _FILTER not in target.filters:
      target.addFilter(_FILTER)
  if not verbose:
    # XLA/libtpu C++ INFO lines; must be set before the first backend starts to take effect.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  return verbosity


def show_info() -> None:
  """Prints the project's INFO lines in a notebook (absl's default outside `app.run` is WARNING).

  Also quiets the library chatter (`configure`).
  """
  logging.set_verbosity(logging.INFO)
  if logging.get_absl_handler() not in logging_std.getLogger().handlers:
    logging.use_absl_handler()
  configure(0)
