"""Random-access readers for HDF5 fusion datasets (PanCollection and the Deng-lab HISR layout).

PanCollection (Deng et al.) stores each split as one HDF5 file holding four datasets,
N x C x H x W on the sensor scale (0..2047 for WV3/WV2/QB, 0..1023 for GF-2):

  gt  (N, C, 4h, 4w)  reference (absent in full-resolution test files)
  lms (N, C, 4h, 4w)  the MS upsampled to the PAN size (23-tap interpolator)
  ms  (N, C, h, w)    the low-resolution MS
  pan (N, 1, 4h, 4w)  the PAN

The CAVE/Harvard files have the same layout under other names (`GT`, `HSI_up`, `LRHSI`, `RGB`,
values in [0, 1]); `config.data.h5_keys` maps the project's roles to the names in the file.

`H5Source` validates a file before use (keys, shapes, band counts, finite values, the sensor
maximum) and then reads one example at a time, so a 5 GB training file is never loaded whole.
Each example is transposed once, here, to H x W x C float32 and divided by the sensor maximum.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from u2net_jax.data import DataError

ROLES = ('gt', 'lms', 'ms', 'guide')
# Interpolated images (lms) ring a little above the sensor maximum near sharp edges (the 23-tap
# kernel has negative lobes), so only gross overshoots of lms count as a wrong sensor maximum.
_LMS_OVERSHOOT = 1.5
# Values are read in slabs of at most this many elements when scanning a file.
_SCAN_ELEMENTS = 1 << 25


def _shape_str(shape: Sequence[int]) -> str:
  return '(' + ','.join(str(int(s)) for s in shape) + ')'


def open_h5(path: str | os.PathLike) -> h5py.File:
  """Opens an HDF5 file for reading, turning every failure into a `DataError`.

  Args:
    path: the file.

  Returns:
    The open `h5py.File`.

  Raises:
    DataError: the file is missing, empty, truncated or not HDF5.
  """
  path = Path(path)
  if not path.exists():
    raise DataError(f'{path}: file not found')
  if path.stat().st_size == 0:
    raise DataError(f'{path}: file is empty (0 bytes)')
  try:
    return h5py.File(path, 'r')
  except OSError as e:
    raise DataError(f'{path}: not a readable HDF5 file (truncated or corrupt?): {e}') from e


def validate_h5(
  f: h5py.File,
  path: str | os.PathLike,
  *,
  keys: Mapping[str, str],
  spectral_bands: int,
  guide_bands: int,
  scale: int = 4,
  require_gt: bool = True,
) -> tuple[dict[str, str], int]:
  """Checks keys, ranks, example counts, band counts and the scale ratio of an open file.

  Args:
    f: the open file.
    path: its path (for messages).
    keys: role -> dataset name in the file ('gt', 'lms', 'ms', 'guide').
    spectral_bands: C, the number of MS/HSI bands (`config.model.spectral_bands`).
    guide_bands: c, 1 for a PAN, 3 for an RGB guide (`config.model.guide_bands`).
    scale: the resolution ratio between the guide and the MS.
    require_gt: whether the file must hold a reference (training, validation and reduced-
      resolution test files); full-resolution test files have none.

  Returns:
    (roles, n): role -> dataset name for the roles present in the file, and the example count.

  Raises:
    DataError: naming the file, the key, the expected and the found shape.
  """
  name = str(path)
  roles = {}
  for role in ROLES:
    key = keys[role]
    if key in f:
      if not isinstance(f[key], h5py.Dataset):
        raise DataError(f'{name}: key {key!r} (role {role!r}) is a group, expected a dataset')
      roles[role] = key
    elif role != 'gt' or require_gt:
      raise DataError(
        f'{name}: key {key!r} (role {role!r}) is missing; found keys {sorted(f.keys())}'
      )
  for key in roles.values():
    if f[key].ndim != 4:
      raise DataError(
        f'{name}: key {key!r} has shape {_shape_str(f[key].shape)}; '
        'expected 4 dimensions N x C x H x W'
      )
  n, c, h, w = f[roles['ms']].shape
  if n == 0:
    raise DataError(
      f'{name}: key {roles["ms"]!r} holds no examples (shape {_shape_str((n, c, h, w))})'
    )
  big = (scale * h, scale * w)
  expected = {
    'ms': (n, spectral_bands, h, w),
    'lms': (n, spectral_bands) + big,
    'gt': (n, spectral_bands) + big,
    'guide': (n, guide_bands) + big,
  }
  for role in sorted(roles, key=('ms', 'gt', 'lms', 'guide').index):
    key = roles[role]
    found = tuple(f[key].shape)
    if found == expected[role]:
      continue
    why = ''
    if found[0] != n:
      why = f' = as many examples as {roles["ms"]!r} ({n})'
    elif found[1] != expected[role][1]:
      what = 'guide_bands' if role == 'guide' else 'spectral_bands'
      why = f' = config.model.{what} ({expected[role][1]})'
    elif role != 'ms':
      why = f' = {scale}x the {roles["ms"]!r} size ({h},{w})'
    raise DataError(
      f'{name}: key {key!r} has shape {_shape_str(found)}; expected '
      f'{_shape_str(expected[role])}{why}'
    )
  return roles, n


def scan_values(
  f: h5py.File, path: str | os.PathLike, roles: Mapping[str, str], max_value: float, *, full: bool
) -> None:
  """Checks that the values are finite and on the scale that `max_value` describes.

  Two mistakes are caught: data above the configured maximum (e.g. 11-bit data given to a GF-2
  config whose maximum is 1023) and data already divided to [0, 1] given to a config whose
  maximum is 2047 or 1023.

  Args:
    f: the open file.
    path: its path (for messages).
    roles: role -> dataset name, as `validate_h5` returns.
    max_value: `config.data.max_value`.
    full: scan every value (in slabs); otherwise only the first and the last slab of each key.

  Raises:
    DataError: naming the file, the key and the offending value.
  """
  name = str(path)
  peak = 0.0
  for role, key in roles.items():
    ds = f[key]
    per = max(1, _SCAN_ELEMENTS // max(1, int(np.prod(ds.shape[1:]))))
    starts = list(range(0, ds.shape[0], per))
    if not full:
      starts = sorted({starts[0], starts[-1]})
    top = -np.inf
    lo = np.inf
    for s in starts:
      try:
        x = np.asarray(ds[s : s + per])
      except (OSError, RuntimeError) as e:  # A truncated file fails only when read.
        raise DataError(f'{name}: key {key!r} cannot be read (truncated file?): {e}') from e
      if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        bad[0] += s
        where = tuple(int(i) for i in bad)
        raise DataError(f'{name}: key {key!r} holds non-finite values (first at index {where})')
      top = max(top, float(x.max()))
      lo = min(lo, float(x.min()))
    limit = max_value * (_LMS_OVERSHOOT if role == 'lms' else 1.0) * (1 + 1e-6)
    if top > limit:
      bound = f'{_LMS_OVERSHOOT:g} x ' if role == 'lms' else ''
      raise DataError(
        f'{name}: key {key!r} has values up to {top:g}; expected at most '
        f'{bound}config.data.max_value = {max_value:g} (wrong sensor maximum? 2047 for 11-bit '
        'WV3/WV2/QB, 1023 for GF-2, 1 for CAVE/Harvard)'
      )
    if lo < -0.5 * max_value:  # Interpolation rings slightly below 0; data never go far below.
      raise DataError(
        f'{name}: key {key!r} has values down to {lo:g}; expected values >= 0 on a '
        f'0..{max_value:g} scale'
      )
    if role != 'lms':
      peak = max(peak, top)
  if max_value > 1.0 and peak <= 1.0:
    raise DataError(
      f'{name}: every value is at most {peak:g} but config.data.max_value = {max_value:g}: the '
      'data look already divided to [0, 1] (wrong sensor maximum?)'
    )


class H5Source:
  """Random-access source over one HDF5 file: `len()` and `[i]` -> dict of H x W x C float32.

  The file is validated when the source is made and opened lazily in each process, so the
  source can be pickled into grain worker processes.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    *,
    keys: Mapping[str, str],
    max_value: float,
    spectral_bands: int,
    guide_bands: int,
    scale: int = 4,
    require_gt: bool = True,
    check_values: str = 'full',
  ):
    """Opens and validates the file.

    Args:
      path: the HDF5 file.
      keys: role -> dataset name (`config.data.h5_keys`).
      max_value: the sensor maximum every value is divided by (`config.data.max_value`).
      spectral_bands: C (`config.model.spectral_bands`).
      guide_bands: c (`config.model.guide_bands`).
      scale: the guide / MS resolution ratio (`config.model.scale`).
      require_gt: whether the file must hold 'gt' (false only for full-resolution test files).
      check_values: 'full' (scan every value), 'sample' (first and last slab) or 'off'.

    Raises:
      DataError: the file is missing, unreadable, or does not match the configuration.
    """
    self.path = str(path)
    self.max_value = float(max_value)
    with open_h5(path) as f:
      self.roles, self._len = validate_h5(
        f,
        path,
        keys=keys,
        spectral_bands=spectral_bands,
        guide_bands=guide_bands,
        scale=scale,
        require_gt=require_gt,
      )
      if check_values != 'off':
        scan_values(f, path, self.roles, self.max_value, full=check_values == 'full')
    self._file = None
    self._pid = None

  def __len__(self) -> int:
    return self._len

  def _handle(self) -> h5py.File:
    # HDF5 handles do not survive fork(): reopen in every process (grain workers).
    if self._file is None or self._pid != os.getpid():
      self._file = open_h5(self.path)
      self._pid = os.getpid()
    return self._file

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Returns example `index`: role -> (H, W, C) float32 divided by the sensor maximum."""
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f'{self.path}: index {index} out of range [0, {self._len})')
    f = self._handle()
    out = {}
    for role, key in self.roles.items():
      x = np.asarray(f[key][index], dtype=np.float32)  # (C, H, W) as stored.
      out[role] = np.ascontiguousarray(x.transpose(1, 2, 0)) / np.float32(self.max_value)
    return out

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_file'] = None
    state['_pid'] = None
    return state

  def __repr__(self) -> str:
    return f'H5Source({self.path!r}, n={self._len}, roles={self.roles})'


class ArraySource:
  """Random-access source over in-memory N x H x W x C arrays (demo data, tests)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    """Args: arrays: role -> (N, H, W, C) float32, already divided by the sensor maximum."""
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise DataError(f'ArraySource: roles have different lengths {lengths}')
    self.arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    self.roles = {k: k for k in self.arrays}
    self._len = lengths.pop()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[int(index)] for k, v in self.arrays.items()}


def write_h5(
  path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, attrs: Mapping | None = None
) -> None:
  """Writes N x C x H x W arrays atomically: a temporary file in the same folder, then rename.

  Each dataset is chunked one example per chunk so that readers get random access cheaply.

  Args:
    path: the destination file.
    arrays: dataset name -> (N, C, H, W) array, written as given (dtype kept).
    attrs: optional file attributes (provenance).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  try:
    with h5py.File(tmp, 'w') as f:
      for key, value in arrays.items():
        value = np.asarray(value)
        chunks = (1,) + value.shape[1:] if value.ndim == 4 and value.shape[0] else None
        f.create_dataset(key, data=value, chunks=chunks)
      for k, v in (attrs or {}).items():
        f.attrs[k] = v
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
