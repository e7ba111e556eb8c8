"""Value checks of stored fusion datasets: finite, and on the scale of the sensor maximum.

`check_stored` is the one check every reader of stored files applies when it opens one (an open
HDF5 file, the arrays of a `.mat` file: any mapping of name -> N x C x H x W array): the layout
(`check_layout`: ranks, example counts, band counts, the scale ratio), then the values below.

Values must be finite and on the scale
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
Both modes also reject an all-zero example (declared in the file but never written: HDF5 reads
unwritten examples as zeros); 'sample' catches a partly written file through its last example.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from u2net_jax.data import DataError
from u2net_jax.io import fileio

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


def _read(ds, name: str, start: int, stop: int) -> np.ndarray:
  try:
    return np.asarray(ds[start:stop])
  except (OSError, RuntimeError) as e:  # A truncated file fails only when read.
    key = str(getattr(ds, 'name', '?')).lstrip('/')
    raise DataError(f'{name}: key {key!r} cannot be read (truncated file?): {e}') from e


def _dataset_stats(ds, name: str, starts, per: int, progress) -> dict:
  """Min, max and the first non-finite index over the slabs [s, s + per) of `ds`."""
  lo, hi = np.inf, -np.inf
  for s in starts:
    x = _read(ds, name, s, s + per)
    finite = np.isfinite(x)
    if not finite.all():
      bad = np.argwhere(~finite)[0]
      bad[0] += s
      return {'nonfinite': [int(i) for i in bad]}
    # An all-zero example is one the file declares but never received (HDF5's fill value):
    # a writer that stopped early, or a dataset made larger than what was written into it.
    empty = np.flatnonzero(~x.reshape(len(x), -1).any(axis=1))
    if empty.size:
      return {'nonfinite': None, 'zero_example': int(empty[0]) + s}
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
  f: Mapping[str, Any], path: str | os.PathLike, names: Sequence[str], *, mode: str = 'sample'
) -> dict[str, dict]:
  """Per-dataset value statistics: {'min', 'max', 'nonfinite': None} or {'nonfinite': index}.

  Args:
    f: the open file (or a mapping of name -> N x ... array).
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
  logging.info(
    'checking every value of %s (%d examples over %d keys; progress every %.0f s)',
    name, progress.total, len(names), PROGRESS_SECONDS,
  )  # fmt: skip
  for key in names:
    ds = f[key]
    per = max(1, _SCAN_ELEMENTS // max(1, int(np.prod(ds.shape[1:]))))
    report = progress.dataset(key)
    stats[key] = _dataset_stats(ds, name, range(0, ds.shape[0], per), per, report)
  _store_stats(path, stats)
  return stats


def scan_values(
  f: Mapping[str, Any],
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
    f: the open file (or a mapping of name -> N x ... array).
    path: its path (for messages and the cache).
    roles: role -> dataset name, as `pancollection.h5_roles` returns.
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
    if s.get('zero_example') is not None:
      raise DataError(
        f'{name}: key {key!r} example {s["zero_example"]} of {f[key].shape[0]} is all zeros: '
        'declared but never written (an interrupted or too-large file?)'
      )
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


# ----------------------------------------------------------------------------------------------
# The checks of every reader of stored files, in one place.


def _shape_str(shape: Sequence[int]) -> str:
  return '(' + ','.join(str(int(s)) for s in shape) + ')'


def check_layout(
  name: str,
  shapes: Mapping[str, Sequence[int]],
  keys: Mapping[str, str],
  *,
  spectral_bands: int,
  guide_bands: int,
  scale: int = 4,
) -> int:
  """Checks ranks, example counts, band counts and the scale ratio of stored N x C x H x W data.

  Args:
    name: the file, for messages.
    shapes: role -> (N, C, H, W) as stored, for the roles present ('ms' and 'guide' at least).
    keys: role -> name in the file, for messages.
    spectral_bands: C, the number of MS/HSI bands (`config.model.spectral_bands`).
    guide_bands: c, 1 for a PAN, 3 for an RGB guide (`config.model.guide_bands`).
    scale: the resolution ratio between the guide and the MS.

  Returns:
    The example count N.

  Raises:
    DataError: naming the file, the key, the expected and the found shape.
  """
  for role, shape in shapes.items():
    if len(shape) != 4:
      raise DataError(
        f'{name}: key {keys[role]!r} has shape {_shape_str(shape)}; '
        'expected 4 dimensions N x C x H x W'
      )
  n, c, h, w = shapes['ms']
  if n == 0:
    raise DataError(
      f'{name}: key {keys["ms"]!r} holds no examples (shape {_shape_str((n, c, h, w))})'
    )
  big = (scale * h, scale * w)
  expected = {
    'ms': (n, spectral_bands, h, w),
    'lms': (n, spectral_bands) + big,
    'gt': (n, spectral_bands) + big,
    'guide': (n, guide_bands) + big,
  }
  for role in sorted(shapes, key=('ms', 'gt', 'lms', 'guide').index):
    found = tuple(int(s) for s in shapes[role])
    if found == expected[role]:
      continue
    why = ''
    if found[0] != n:
      why = f' = as many examples as {keys["ms"]!r} ({n})'
    elif found[1] != expected[role][1]:
      what = 'guide_bands' if role == 'guide' else 'spectral_bands'
      why = f' = config.model.{what} ({expected[role][1]})'
    elif role != 'ms':
      why = f' = {scale}x the {keys["ms"]!r} size ({h},{w})'
    raise DataError(
      f'{name}: key {keys[role]!r} has shape {_shape_str(found)}; expected '
      f'{_shape_str(expected[role])}{why}'
    )
  return int(n)


def check_values_mode(name: str | os.PathLike, mode: str) -> None:
  """Refuses an unknown `config.data.check_values` (before any file is opened)."""
  if mode not in CHECK_VALUES:
    raise DataError(
      f'{name}: check_values = {mode!r} (config.data.check_values); expected one of {CHECK_VALUES}'
    )


def check_stored(
  name: str | os.PathLike,
  stored: Mapping[str, Any],
  roles: Mapping[str, str],
  spec,
) -> int:
  """The checks of every reader of stored files: the layout, then the values.

  Args:
    name: the file (for messages and the value-check cache).
    stored: name in the file -> N x C x H x W array-like on the sensor scale (an open `h5py.File`
      or a dict of arrays).
    roles: role -> name in the file, for the roles present.
    spec: a `sources.Spec`: the geometry, maximum and `check_values` mode expected.

  Returns:
    The example count N.

  Raises:
    DataError: naming the file, the key and what is wrong.
  """
  check_values_mode(name, spec.check_values)
  n = check_layout(
    str(name),
    {role: stored[key].shape for role, key in roles.items()},
    roles,
    spectral_bands=spec.spectral_bands,
    guide_bands=spec.guide_bands,
    scale=spec.scale,
  )
  if spec.check_values != 'off':
    scan_values(stored, name, roles, spec.max_value, mode=spec.check_values)
  return n
