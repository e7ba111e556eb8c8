"""The `.mat` reader: one test image in the benchmark toolbox layout (the `sources` kind 'mat').

The MATLAB toolbox (and the DLPan-Toolbox demos) keep a test image as one `.mat` file of
H x W x C arrays on the sensor scale:

  I_GT     (4h, 4w, C)  the reference (absent at full resolution)
  I_MS     (4h, 4w, C)  the MS upsampled to the PAN size (`lms`)
  I_MS_LR  (h, w, C)    the low-resolution MS
  I_PAN    (4h, 4w)     the PAN (or (4h, 4w, c) for an RGB guide)

`MatSource` reads such a file as a one-image source (`--test_files=mine=img.mat`), through the
same checks as every stored file (`value_checks.check_stored`). MATLAB v7.3 files (HDF5 underneath,
column-major) are read too (`mat_arrays`).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from u2net_jax.data import DataError, sources, value_checks

# Role -> the toolbox's variable name.
MAT_KEYS = {'gt': 'I_GT', 'lms': 'I_MS', 'ms': 'I_MS_LR', 'guide': 'I_PAN'}


def mat_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of a `.mat` file (v5 through scipy, v7.3 through h5py with the axes reversed).

  Raises:
    DataError: the file is not a readable MATLAB file.
  """
  path = Path(path)
  try:
    try:
      data = scipy.io.loadmat(path)
      return {k: v for k, v in data.items() if not k.startswith('__') and isinstance(v, np.ndarray)}
    except (NotImplementedError, ValueError):  # v7.3 is HDF5, column-major: reverse the axes.
      with h5py.File(path, 'r') as f:
        return {k: np.asarray(v).T for k, v in f.items() if isinstance(v, h5py.Dataset)}
  except (OSError, ValueError, TypeError, EOFError, scipy.io.matlab.MatReadError) as e:
    raise DataError(f'{path}: not a readable MATLAB file ({type(e).__name__}: {e})') from e


@sources.register('mat', suffixes=('.mat',))
class MatSource(sources.Source):
  """One toolbox test image (`MAT_KEYS`), read whole once: a one-image source."""

  def __init__(self, spec: sources.Spec):
    """Reads and checks `spec.location`.

    Raises:
      DataError: a missing or unreadable file, a missing variable, or data that do not fit.
    """
    path = Path(spec.location)
    if not path.is_file():
      raise DataError(f'{path}: file not found')
    value_checks.check_values_mode(path, spec.check_values)
    arrays = mat_arrays(path)
    self.file, self.max_value = str(path), float(spec.max_value)
    self.roles = {}
    stored = {}
    for role, key in MAT_KEYS.items():
      if key not in arrays:
        if role == 'gt' and not spec.require_gt:
          continue
        raise DataError(
          f'{path}: variable {key!r} (role {role!r}) is missing; found {sorted(arrays)}'
        )
      a = np.asarray(arrays[key])
      if a.dtype.kind not in 'biuf' or a.ndim not in (2, 3):
        raise DataError(
          f'{path}: variable {key!r} is {a.dtype} of shape {a.shape}; expected H x W x C numbers'
        )
      a = a[..., None] if a.ndim == 2 else a
      stored[key] = a.transpose(2, 0, 1)[None]  # (1, C, H, W): the stored layout of the checks.
      self.roles[role] = key
    value_checks.check_stored(path, stored, self.roles, spec)
    self._stored = stored

  @classmethod
  def from_spec(cls, spec: sources.Spec) -> MatSource:
    return cls(spec)

  def __len__(self) -> int:
    return 1

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ref = self.reference(index)
    return {role: x.astype(np.float32) / np.float32(self.max_value) for role, x in ref.items()}

  def reference(self, index: int, example=None) -> dict[str, np.ndarray]:
    """The image as stored: role -> (H, W, C) float64."""
    del example
    if int(index) != 0:
      raise IndexError(f'{self.file}: index {index} out of range [0, 1)')
    return {
      role: np.asarray(self._stored[key][0], np.float64).transpose(1, 2, 0)
      for role, key in self.roles.items()
    }
