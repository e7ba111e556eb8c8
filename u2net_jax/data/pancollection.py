"""Random-access readers and the one writer for HDF5 fusion datasets (PanCollection, Deng-lab HISR).

PanCollection (Deng et al.) stores each split as one HDF5 file holding four datasets,
N x C x H x W on the sensor scale (0..2047 for WV3/WV2/QB, 0..1023 for GF-2):

  gt  (N, C, 4h, 4w)  reference (absent in full-resolution test files)
  lms (N, C, 4h, 4w)  the MS upsampled to the PAN size (23-tap interpolator)
  ms  (N, C, h, w)    the low-resolution MS
  pan (N, 1, 4h, 4w)  the PAN

The CAVE/Harvard files have the same layout under other names (`GT`, `HSI_up`, `LRHSI`, `RGB`,
values in [0, 1]); `config.data.h5_keys` maps the project's roles to the names in the file.

Reading. `H5Source` is the 'hdf5' reader of the data layer (`sources`: `.h5`, `.hdf5`, `.he5`).
It validates a file before use (keys and links here, then `value_checks.check_stored`: shapes,
band counts, values) and then reads one example at a time, so a 5 GB training file is never loaded
whole. Each example is transposed once, here, to H x W x C float32 and divided by the sensor
maximum; `reference` returns the values as stored (float64), for the metrics.

Writing. `H5Writer` streams examples into a temporary file beside the destination
(`fileio.atomic_file`) that is renamed only when every row of every dataset has been written;
any failure removes it, so a reader never sees half a file. `write_h5` writes whole arrays with
it; the preparers (`prepare_pansharpening`, `prepare_cave`) stream their patches through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from u2net_jax.data import DataError, sources, value_checks
from u2net_jax.io import fileio

ROLES = sources.ROLES


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


def h5_roles(
  f: h5py.File, path: str | os.PathLike, *, keys: Mapping[str, str], require_gt: bool = True
) -> dict[str, str]:
  """The roles an open file holds, after the HDF5-specific checks (links, groups, missing keys).

  The shapes and values are checked next, as for every stored file (`value_checks.check_stored`).

  Args:
    f: the open file.
    path: its path (for messages).
    keys: role -> dataset name in the file ('gt', 'lms', 'ms', 'guide').
    require_gt: whether the file must hold a reference (training, validation and reduced-
      resolution test files); full-resolution test files have none.

  Returns:
    Role -> dataset name for the roles present in the file.

  Raises:
    DataError: naming the file, the key and what is wrong.
  """
  name = str(path)
  roles = {}
  for role in ROLES:
    key = keys[role]
    link = f.get(key, getlink=True)
    if isinstance(link, h5py.ExternalLink):  # Data in another file: never followed.
      raise DataError(
        f'{name}: key {key!r} (role {role!r}) is an external link to '
        f'{link.filename}:{link.path}; external links are not followed (copy the data in)'
      )
    if isinstance(link, h5py.SoftLink) and link.path not in f:
      raise DataError(f'{name}: key {key!r} (role {role!r}) is a broken link to {link.path!r}')
    if key in f:
      if not isinstance(f[key], h5py.Dataset):
        raise DataError(f'{name}: key {key!r} (role {role!r}) is a group, expected a dataset')
      roles[role] = key
    elif role != 'gt' or require_gt:
      raise DataError(
        f'{name}: key {key!r} (role {role!r}) is missing; found keys {sorted(f.keys())}'
      )
  return roles


@sources.register('hdf5', suffixes=('.h5', '.hdf5', '.he5'))
class H5Source(sources.Source):
  """The HDF5 reader: `len()`, `[i]` -> role -> (H, W, C) float32, `reference(i)` as stored.

  The file is opened once, validated (`h5_roles`, then `value_checks.check_stored`: shapes, values),
  and read through the same handle in this process: examples, references (float64, the file's
  values) and attributes; a pickled copy (grain worker processes) reopens it lazily in its own
  process. `sensor` is the file's `sensor` attribute (our preparers write it; PanCollection has
  none).
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
    check_values: str = 'sample',
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
      check_values: 'sample' (a spread of examples), 'full' (every value, cached) or 'off'; see
        `value_checks`.

    Raises:
      DataError: the file is missing, unreadable, or does not match the configuration.
    """
    spec = sources.Spec(
      kind='hdf5',
      location=str(path),
      max_value=float(max_value),
      spectral_bands=spectral_bands,
      guide_bands=guide_bands,
      scale=scale,
      keys=dict(keys),
      require_gt=require_gt,
      check_values=check_values,
    )
    value_checks.check_values_mode(path, check_values)  # Before the file is opened.
    self.path = self.file = str(path)
    self.max_value = float(max_value)
    # Opened once: the handle that validated the file serves the reads of this process.
    f = open_h5(path)
    try:
      self.roles = h5_roles(f, path, keys=keys, require_gt=require_gt)
      self._len = value_checks.check_stored(path, f, self.roles, spec)
      self.sensor = _sensor_attribute(f)
    except BaseException:
      f.close()
      raise
    self._file = f
    self._pid = os.getpid()

  @classmethod
  def from_spec(cls, spec: sources.Spec) -> H5Source:
    return cls(
      spec.location,
      keys=spec.keys,
      max_value=spec.max_value,
      spectral_bands=spec.spectral_bands,
      guide_bands=spec.guide_bands,
      scale=spec.scale,
      require_gt=spec.require_gt,
      check_values=spec.check_values,
    )

  def __len__(self) -> int:
    return self._len

  def _handle(self) -> h5py.File:
    # HDF5 handles do not survive fork(): reopen in every process (grain workers).
    if self._file is None or self._pid != os.getpid():
      self._file = open_h5(self.path)
      self._pid = os.getpid()
    return self._file

  def _check_index(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f'{self.path}: index {index} out of range [0, {self._len})')
    return index

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Returns example `index`: role -> (H, W, C) float32 divided by the sensor maximum."""
    index = self._check_index(index)
    f = self._handle()
    out = {}
    for role, key in self.roles.items():
      x = np.asarray(f[key][index], dtype=np.float32)  # (C, H, W) as stored.
      out[role] = np.ascontiguousarray(x.transpose(1, 2, 0)) / np.float32(self.max_value)
    return out

  def reference(self, index: int, example=None) -> dict[str, np.ndarray]:
    """Example `index` as stored: role -> (H, W, C) float64 (not float32(x / max) * max)."""
    del example
    index = self._check_index(index)
    f = self._handle()
    return {
      role: np.ascontiguousarray(np.asarray(f[key][index], np.float64).transpose(1, 2, 0))
      for role, key in self.roles.items()
    }

  @property
  def handle(self) -> h5py.File:
    """The open file of this process (e.g. to read values as stored, or its attributes)."""
    return self._handle()

  def close(self) -> None:
    """Closes this process's handle (a later read reopens it)."""
    if self._file is not None and self._pid == os.getpid():
      self._file.close()
    self._file = None

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_file'] = None
    state['_pid'] = None
    return state

  def __repr__(self) -> str:
    return f'H5Source({self.path!r}, n={self._len}, roles={self.roles})'


def _sensor_attribute(f: h5py.File) -> str | None:
  """The file's `sensor` attribute as a string, or None."""
  value = f.attrs.get('sensor')
  if isinstance(value, bytes | np.bytes_):
    value = value.decode()
  if value is not None and np.ndim(value):
    value = np.asarray(value).reshape(-1)[0]
  return None if value is None else str(value)


def to_file_layout(example: Mapping[str, np.ndarray], keys: Mapping[str, str]) -> dict:
  """One example from the project's layout to the file's: role -> (H, W, C) to name -> (C, H, W).

  Args:
    example: role -> (H, W, C) array.
    keys: role -> dataset name in the file (e.g. `prepare_cave.KEYS`).

  Returns:
    Dataset name -> (C, H, W) array (a transposed view).
  """
  return {keys[role]: np.asarray(x).transpose(2, 0, 1) for role, x in example.items()}


class H5Writer:
  """Streams N x ... datasets into a new HDF5 file that appears only when every row is written.

  Usage::

    with H5Writer(path, {'gt': (n, 8, 64, 64), 'pan': (n, 1, 64, 64)}, np.float64) as w:
      for i, example in enumerate(examples):
        w.put(i, example)  # Dataset name -> (C, H, W); or w.append(name -> (b, C, H, W)).

  The file is written under a temporary name beside `path` (`fileio.atomic_file`) and renamed
  onto `path` when the block ends normally and every row of every dataset has been written; an
  exception, or a missing row, removes it and leaves `path` untouched. Memory use is one write.
  Four-dimensional datasets are chunked one example per chunk, so readers get cheap random
  access. Call `close()` on several writers before leaving their blocks to check them all before
  any is renamed.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    shapes: Mapping[str, Sequence[int]],
    dtype: Any = np.float32,
    *,
    attrs: Mapping[str, Any] | None = None,
    check_values: bool = False,
  ):
    """Checks the layout; the file is created by `with`.

    Args:
      path: the destination file.
      shapes: dataset name -> shape (N, ...), N the same or not across datasets.
      dtype: the stored dtype, one for all or dataset name -> dtype (numeric only).
      attrs: file attributes (provenance).
      check_values: refuse rows holding a NaN or an infinity, or only zeros (what the readers
        refuse; `DataError`): the preparers set it so that what they generate is checked
        before the file is kept.

    Raises:
      TypeError: a non-numeric dtype.
      ValueError: a dataset without a leading example axis.
    """
    self.path = Path(path)
    self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    dtypes = dtype if isinstance(dtype, Mapping) else dict.fromkeys(self.shapes, dtype)
    self.dtypes = {k: np.dtype(dtypes[k]) for k in self.shapes}
    for key, dt in self.dtypes.items():
      if dt.kind not in 'biuf':
        raise TypeError(f'{self.path}: dataset {key!r} has dtype {dt}; expected a numeric dtype')
      if not self.shapes[key]:
        raise ValueError(f'{self.path}: dataset {key!r} has shape (); expected (N, ...)')
    self.attrs = dict(attrs or {})
    self.check_values = check_values
    self._target = None
    self._file = None
    self._written = {k: np.zeros(s[0], bool) for k, s in self.shapes.items()}
    self._next = dict.fromkeys(self.shapes, 0)
    self._closed = False

  def __enter__(self) -> H5Writer:
    self._target = fileio.atomic_file(self.path, suffix='.h5')
    tmp = self._target.__enter__()
    try:
      self._file = h5py.File(tmp, 'w')
      for key, shape in self.shapes.items():
        whole = len(shape) == 4 and shape[0] > 0 and all(shape[1:])
        chunks = (1,) + shape[1:] if whole else None
        self._file.create_dataset(key, shape=shape, dtype=self.dtypes[key], chunks=chunks)
      for k, v in self.attrs.items():
        self._file.attrs[k] = v
    except BaseException as e:
      self._abort(e)
      raise
    return self

  def _dataset(self, key: str) -> h5py.Dataset:
    if self._file is None or self._closed:
      raise ValueError(f'{self.path}: write inside `with H5Writer(...)`, before close()')
    if key not in self.shapes:
      raise KeyError(f'{self.path}: no dataset {key!r}; the file holds {sorted(self.shapes)}')
    return self._file[key]

  def put(self, i: int, example: Mapping[str, np.ndarray]) -> None:
    """Writes row `i` of the datasets named in `example` (name -> array of shape[1:])."""
    for key, x in example.items():
      ds = self._dataset(key)
      x = np.asarray(x, self.dtypes[key])  # numpy's cast (round to nearest), not HDF5's.
      if x.shape != self.shapes[key][1:]:
        raise ValueError(
          f'{self.path}: dataset {key!r} row has shape {x.shape}; expected {self.shapes[key][1:]}'
        )
      self._check(key, x[None], int(i))
      ds[int(i)] = x
      self._written[key][int(i)] = True

  def _check(self, key: str, rows: np.ndarray, start: int) -> None:
    """With `check_values`: every row finite and not all zeros (else `DataError`)."""
    if not self.check_values or not rows.size:
      return
    flat = rows.reshape(len(rows), -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1)) if rows.dtype.kind == 'f' else []
    if len(bad):
      raise DataError(
        f'{self.path}: generated row {start + int(bad[0])} of dataset {key!r} holds NaN or '
        'infinite values (check the preparation parameters, e.g. --sigma)'
      )
    empty = np.flatnonzero(~flat.any(axis=1))
    if len(empty):
      raise DataError(
        f'{self.path}: generated row {start + int(empty[0])} of dataset {key!r} is all zeros '
        '(a blank input image?)'
      )

  def append(self, batch: Mapping[str, np.ndarray]) -> None:
    """Writes the next len(x) rows of each dataset named in `batch` (name -> (b, ...))."""
    for key, x in batch.items():
      ds = self._dataset(key)
      x = np.asarray(x, self.dtypes[key])
      start = self._next[key]
      stop = start + (x.shape[0] if x.ndim else 0)
      if x.shape[1:] != self.shapes[key][1:] or stop > self.shapes[key][0]:
        raise ValueError(
          f'{self.path}: cannot append {x.shape} at row {start} of dataset {key!r} of shape '
          f'{self.shapes[key]}'
        )
      self._check(key, x, start)
      ds[start:stop] = x
      self._written[key][start:stop] = True
      self._next[key] = stop

  def close(self) -> None:
    """Checks that every row was written, then closes and syncs the temporary file.

    Raises:
      ValueError: rows were never written (the block then removes the file).
    """
    if self._closed:
      return
    for key, done in self._written.items():
      if not done.all():
        missing = np.flatnonzero(~done)
        raise ValueError(
          f'{self.path}: {missing.size} of {done.size} rows of dataset {key!r} were never written '
          f'(first: {int(missing[0])})'
        )
    name = self._file.filename
    self._file.close()
    self._closed = True
    fd = os.open(name, os.O_RDONLY)  # Durable before the rename makes it visible.
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

  def _abort(self, error: BaseException) -> None:
    try:
      if self._file is not None and not self._closed:
        self._file.close()
    except Exception:  # Best effort: the temporary is removed below anyway.
      pass
    self._closed = True
    self._target.__exit__(type(error), error, error.__traceback__)

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc is None:
      try:
        self.close()
      except BaseException as e:
        self._abort(e)
        raise
      self._target.__exit__(None, None, None)  # Renames onto `path`.
      return False
    self._abort(exc)
    return False


def write_h5(
  path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, attrs: Mapping | None = None
) -> None:
  """Writes whole N x C x H x W arrays atomically with `H5Writer` (dtypes kept).

  Args:
    path: the destination file.
    arrays: dataset name -> (N, C, H, W) array.
    attrs: optional file attributes (provenance).

  Raises:
    TypeError: a non-numeric array (nothing is written).
  """
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  shapes = {k: v.shape for k, v in arrays.items()}
  with H5Writer(path, shapes, {k: v.dtype for k, v in arrays.items()}, attrs=attrs) as w:
    w.append(arrays)
