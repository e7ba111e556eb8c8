"""Datasets of u2net-jax: readers, Wald's protocol, preparers, TFDS builders and demo data.

Modules:
  pancollection: random-access HDF5 readers (PanCollection and the Deng-lab CAVE/Harvard layout)
    with validation of keys, shapes, band counts and values (sampled, or full and cached), and
    `H5Writer`, the one streaming, atomic HDF5 writer.
  wald: Wald's protocol (MTF-matched or Gaussian blur, decimation, 23-tap interpolation).
  prepare_pansharpening: `python -m u2net_jax.data.prepare_pansharpening` for users' own scenes.
  prepare_cave: `python -m u2net_jax.data.prepare_cave` for the raw CAVE (and Harvard) scenes.
  demo: SYNTHETIC data generated in-process for both tasks (no download).
  tfds_builders: the `pan_collection`, `cave` and `u2net_demo` TFDS builders (ArrayRecord);
    `python -m u2net_jax.data.tfds_builders` builds one.

The command lines take absl flags (`--help` lists them); each module's `main(argv)` runs one from
Python with its own flag values, so they can be called from a notebook or a test.

Every example is a dict with the project's roles: 'gt', 'lms', 'ms' and 'guide' (the PAN or the
RGB image). On disk the arrays are N x C x H x W; the readers return H x W x C float32 arrays
divided by the sensor maximum (`config.data.max_value`).

Bad input is a `DataError` naming the file and what is wrong: the preparers check their arguments
(`check_arguments`) and inputs (`load_npy` & co.) before writing, and the values they generate
before keeping a file (`pancollection.H5Writer(check_values=True)`).
"""

import os
import sys
from collections.abc import Callable, Sequence

# Role -> dataset name inside the HDF5 files, per file layout: PanCollection's pansharpening files
# and the Deng-lab HISR files (CAVE, Harvard). `config.data.h5_keys` takes one of them.
H5_KEYS = {
  'pancollection': {'gt': 'gt', 'lms': 'lms', 'ms': 'ms', 'guide': 'pan'},
  'hisr': {'gt': 'GT', 'lms': 'HSI_up', 'ms': 'LRHSI', 'guide': 'RGB'},
}


class DataError(ValueError):
  """A dataset file is missing, malformed or does not match the configuration.

  The message names the file, the key, the expected and the found shape (or value), and for a
  missing file the command that prepares it.
  """


def check_arguments(checks) -> None:
  """Refuses a preparer's bad arguments together, before anything is read or written.

  Args:
    checks: (flag name, value, acceptable?, what is expected) tuples.

  Raises:
    DataError: naming every refused flag, its value and what it must be.
  """
  bad = [f'--{flag}={value!r} must be {expected}' for flag, value, ok, expected in checks if not ok]
  if bad:
    raise DataError('invalid arguments: ' + '; '.join(bad))


def load_npy(path):
  """Reads a numeric, non-empty `.npy` array (never a pickle) or raises `DataError`.

  Args:
    path: the file.

  Returns:
    The array.

  Raises:
    DataError: a folder, an unreadable, object-dtype (pickled) or empty array, naming the file.
  """
  import numpy as np  # Here: the package's import stays light.

  if os.path.isdir(path):
    raise DataError(f'{path}: is a folder; expected a .npy file')
  try:
    a = np.load(path, allow_pickle=False)
  except ValueError as e:  # Object arrays need pickle, which may run code: refused.
    raise DataError(f'{path}: not a plain numeric .npy array ({e})') from e
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: unreadable .npy file ({e})') from e
  if not isinstance(a, np.ndarray) or a.dtype.kind not in 'biuf':
    raise DataError(f'{path}: holds {getattr(a, "dtype", type(a).__name__)}; expected numbers')
  if a.size == 0:
    raise DataError(f'{path}: the array is empty (shape {a.shape})')
  return a


def run_command(
  name: str, define_flags: Callable, run: Callable, argv: Sequence[str] | None = None
) -> int:
  """Runs a data command line with its own flag values (from Python) or as `__main__`.

  Args:
    name: the program name (for messages).
    define_flags: defines the command's flags on the `FlagValues` it is given.
    run: runs the command from parsed flag values; returns the exit status.
    argv: the flags (no program name), e.g. from a notebook or a test; None runs the process's
      own command line through absl's app (`python -m u2net_jax.data.NAME --flag=...`) and exits.

  Returns:
    The exit status (0, or 2 when the input is refused), when `argv` is given.
  """
  from absl import app, flags  # Here: the package's import stays light.

  if argv is not None:
    fv = flags.FlagValues()
    define_flags(fv)
    fv([name, *argv])
    return run(fv)

  def app_main(args):
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments {args[1:]} (flags take the form --name=value)')
    return run(flags.FLAGS)

  define_flags(flags.FLAGS)
  app.run(app_main, argv=[name, *sys.argv[1:]])
  return 0  # Not reached: app.run exits.
