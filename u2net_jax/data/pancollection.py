"""Random-access readers and the one writer for HDF5 fusion datasets (PanCollection, Deng-lab HISR).

PanCollection (Deng et al.) stores each split as one HDF5 file holding four datasets,
N x C x H x W on the sensor scale (0..2047 for WV3/WV2/QB, 0..1023 for GF-2):

  gt  (N, C, 4h, 4w)  reference (absent in full-resolution test files)
  lms (N, C, 4h, 4w)  the MS upsampled to the PAN size (23-tap interpolator)
  ms  (N, C, h, w)    the low-resolution MS
  pan (N, 1, 4h, 4w)  the PAN

The CAVE/Harvard files have the same layout under other names (`GT`, `HSI_up`, `LRHSI`, `RGB`,
values in [0, 1]); `config.data.h5_keys` maps the project's roles to the names in the file.

Reading. `H5Source` validates a file before use (keys, shapes, band counts) and then reads one
example at a time, so a 5 GB training file is never loaded whole. Each example is transposed
once, here, to H x W x C float32 and divided by the sensor maximum.

Value checks (`check_values`, `config.data.check_values`): values must be finite and on the scale
of the sensor maximum (catching 11-bit data given to a 10-bit config, or data already divided to
[0, 1]).
  'sample'  (default) reads a deterministic spread of examples (`sample_indices`: evenly spaced,
            the first and the last included, at most `SAMPLE_EXAMPLES` and about
            `SAMPLE_ELEMENTS` values per dataset), so opening a file costs milliseconds;
  'full'    reads every value once, logging progress, and caches the result (per dataset: min,
            max, first non-finite index) keyed by the file's resolved path, size and mtime_ns in
            `value_check_cache_path()` ($XDG_CACHE_HOME/u2net_jax, default ~/.cache/u2net_jax);
            later runs, resumes and test-set loads of the unchanged file read nothing, and a
            'sample' check uses a cached full result when there is one. A cache that cannot be
            read or written is ignored;
  'off'     skips the values.

Writing. `H5Writer` streams examples into a temporary file beside the destination
(`fileio.atomic_file`) that is renamed only when every row of every dataset has been written;
any failure removes it, so a reader never sees half a file. `write_h5` writes whole arrays with
it; the preparers (`prepare_pansharpening`, `prepare_cave`) stream their patches through it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from absl import logging

from u2net_jax import fileio
from u2net_jax.data import DataError

ROLES = ('gt', 'lms', 'ms', 'guide')
# Interpolated images (lms) ring a little above the sensor maximum near sharp edges (the 23-tap
# kernel has negative lobes), so only gross overshoots of lms count as a wrong sensor maximum.
_LMS_OVERSHOOT = 1.5
# A full scan reads slabs of at most this many elements.
_SCAN_ELEMENTS = 1 << 25
CHECK_VALUES = ('sample', 'full', 'off')
# A sampled check reads at most SAMPLE_EXAMPLES examples and about SAMPLE_ELEMENTS values per
# dataset (never fewer than the first and the last example): enough to catch a wrong sensor
# maximum, which affects every example, at the cost of a few reads.
SAMPLE_EXAMPLES = 16
SAMPLE_ELEMENTS = 1 << 24
PROGRESS_SECONDS = 5.0  # A full check logs its progress this often.
_CACHE_ENTRIES = 256


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


def sample_indices(n: int, example_elements: int) -> np.ndarray:
  """The examples a sampled value check reads: evenly spread, the first and the last included.

  Args:
    n: the number of examples (> 0).
    example_elements: values per example of the dataset (C * H * W).

  Returns:
    Sorted unique int64 indices: min(n, k) of them, k = SAMPLE_ELEMENTS // example_elements
    clipped to [2, SAMPLE_EXAMPLES].
  """
  k = min(SAMPLE_EXAMPLES, max(2, SAMPLE_ELEMENTS // max(1, int(example_elements))))
  return np.unique(np.round(np.linspace(0, n - 1, min(n, k))).astype(np.int64))


def value_check_cache_path() -> Path:
  """The file caching full value scans: $XDG_CACHE_HOME/u2net_jax/value_checks.json."""
  root = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
  return Path(root) / 'u2net_jax' / 'value_checks.json'


def _file_id(path: str | os.PathLike) -> tuple[str, dict[str, int]]:
  """(resolved path, {'size', 'mtime_ns'}): a rewritten file gets a new identity."""
  st = Path(path).stat()
  return str(Path(path).resolve()), {'size': int(st.st_size), 'mtime_ns': int(st.st_mtime_ns)}


def _load_cache() -> dict[str, Any]:
  try:
    cache = json.loads(value_check_cache_path().read_text())
    return cache if isinstance(cache, dict) else {}
  except (OSError, ValueError):  # Missing, unreadable or corrupt: start afresh.
    return {}


def _cached_stats(path, names: Sequence[str]) -> dict[str, dict] | None:
  """The cached full-scan statistics of every dataset in `names`, or None."""
  key, ident = _file_id(path)
  entry = _load_cache().get(key)
  if not isinstance(entry, dict) or entry.get('id') != ident:
    return None
  stats = entry.get('datasets', {})
  if not all(n in stats for n in names):
    return None
  return {n: stats[n] for n in names}


def _store_stats(path, stats: Mapping[str, dict]) -> None:
  """Adds full-scan statistics to the cache; a cache that cannot be written is skipped."""
  key, ident = _file_id(path)
  cache = _load_cache()
  entry = cache.pop(key, None)
  datasets = dict(entry['datasets']) if isinstance(entry, dict) and entry.get('id') == ident else {}
  datasets.update(stats)
  cache[key] = {'id': ident, 'datasets': datasets}
  # Most recently scanned last; the oldest are dropped so the file stays small.
  cache = dict(list(cache.items())[-_CACHE_ENTRIES:])
  try:
    fileio.atomic_write_text(value_check_cache_path(), json.dumps(cache, indent=1))
  except OSError as e:
    logging.info('value-check cache not written (%s); the next full check scans again', e)


def _read(ds: h5py.Dataset, name: str, start: int, stop: int) -> np.ndarray:
  try:
    return np.asarray(ds[start:stop])
  except (OSError, RuntimeError) as e:  # A truncated file fails only when read.
    raise DataError(
      f'{name}: key {ds.name.lstrip("/")!r} cannot be read (truncated file?): {e}'
    ) from e


def _dataset_stats(ds: h5py.Dataset, name: str, starts, per: int, progress) -> dict:
  """Min, max and the first non-finite index over the slabs [s, s + per) of `ds`."""
  lo, hi = np.inf, -np.inf
  for s in starts:
    x = _read(ds, name, s, s + per)
    finite = np.isfinite(x)
    if not finite.all():
      bad = np.argwhere(~finite)[0]
      bad[0] += s
      return {'nonfinite': [int(i) for i in bad]}
    if x.size:
      lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    progress(min(s + per, ds.shape[0]))
  return {'min': lo, 'max': hi, 'nonfinite': None}


class _Progress:
  """Logs how far a long scan is, at most every `PROGRESS_SECONDS`."""

  def __init__(self, name: str, total: int):
    self.name, self.total, self.done = name, total, 0
    self.start = self.last = time.monotonic()

  def dataset(self, key: str):
    """The callback of one dataset: rows of it done so far -> log when due."""
    base = self.done

    def report(rows: int):
      self.done = base + rows
      now = time.monotonic()
      if now - self.last >= PROGRESS_SECONDS:
        self.last = now
        logging.info(
          'checking the values of %s: key %r, %d/%d examples of all keys (%.0f s)',
          self.name, key, self.done, self.total, now - self.start,
        )  # fmt: skip

    return report


def value_stats(
  f: h5py.File, path: str | os.PathLike, names: Sequence[str], *, mode: str = 'sample'
) -> dict[str, dict]:
  """Per-dataset value statistics: {'min', 'max', 'nonfinite': None} or {'nonfinite': index}.

  Args:
    f: the open file.
    path: its path (for messages and the cache).
    names: the dataset names.
    mode: 'sample' (the examples of `sample_indices`; a cached full result when there is one)
      or 'full' (every value, cached in `value_check_cache_path()`).

  Returns:
    Dataset name -> statistics; 'nonfinite' is the first non-finite (N, C, H, W) index found.

  Raises:
    DataError: a dataset cannot be read (truncated file).
  """
  if mode not in ('sample', 'full'):
    raise DataError(f'value check mode {mode!r}; expected one of {CHECK_VALUES}')
  name = str(path)
  cached = _cached_stats(path, names)
  if cached is not None:
    logging.info('values of %s: full check cached in %s', name, value_check_cache_path())
    return cached
  stats = {}
  if mode == 'sample':
    for key in names:
      ds = f[key]
      rows = sample_indices(ds.shape[0], int(np.prod(ds.shape[1:])))
      stats[key] = _dataset_stats(ds, name, [int(i) for i in rows], 1, lambda _: None)
    return stats
  progress = _Progress(name, sum(f[key].shape[0] for key in names))
  for key in names:
    ds = f[key]
    per = max(1, _SCAN_ELEMENTS // max(1, int(np.prod(ds.shape[1:]))))
    report = progress.dataset(key)
    stats[key] = _dataset_stats(ds, name, range(0, ds.shape[0], per), per, report)
  _store_stats(path, stats)
  return stats


def scan_values(
  f: h5py.File,
  path: str | os.PathLike,
  roles: Mapping[str, str],
  max_value: float,
  *,
  mode: str = 'sample',
) -> None:
  """Checks that the values are finite and on the scale that `max_value` describes.

  Two mistakes are caught: data above the configured maximum (e.g. 11-bit data given to a GF-2
  config whose maximum is 1023) and data already divided to [0, 1] given to a config whose
  maximum is 2047 or 1023.

  Args:
    f: the open file.
    path: its path (for messages and the cache).
    roles: role -> dataset name, as `validate_h5` returns.
    max_value: `config.data.max_value`.
    mode: 'sample' or 'full' (see the module docstring).

  Raises:
    DataError: naming the file, the key and the offending value.
  """
  name = str(path)
  stats = value_stats(f, path, list(roles.values()), mode=mode)
  peak = 0.0
  for role, key in roles.items():
    s = stats[key]
    if s['nonfinite'] is not None:
      where = tuple(int(i) for i in s['nonfinite'])
      raise DataError(f'{name}: key {key!r} holds non-finite values (first at index {where})')
    top, lo = float(s['max']), float(s['min'])
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
        the module docstring.

    Raises:
      DataError: the file is missing, unreadable, or does not match the configuration.
    """
    if check_values not in CHECK_VALUES:
      raise DataError(
        f'{path}: check_values = {check_values!r} (config.data.check_values); expected one of '
        f'{CHECK_VALUES}'
      )
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
        scan_values(f, path, self.roles, self.max_value, mode=check_values)
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
  ):
    """Checks the layout; the file is created by `with`.

    Args:
      path: the destination file.
      shapes: dataset name -> shape (N, ...), N the same or not across datasets.
      dtype: the stored dtype, one for all or dataset name -> dtype (numeric only).
      attrs: file attributes (provenance).

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
      ds[int(i)] = x
      self._written[key][int(i)] = True

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
