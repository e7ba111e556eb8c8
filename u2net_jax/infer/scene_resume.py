"""Resumable scene outputs (`fuse.py --resume`): a partial output and its journal beside it.

  .NAME.partial.npy    the fused windows so far, (H, W, C) in the output dtype (a memory map)
  .NAME.partial.json   the journal: what the run is (inputs, fuser, options, window plan) and
                       how many windows of the plan are in the partial output

A run holds an exclusive `flock` on the partial output while it writes: a second `--resume` run
of the same output stops with one line instead of writing the same file.

A window is written into the partial output, flushed to disk (`msync`), and only then is the
journal rewritten (atomically, fsynced) with the new count: after a kill (SIGKILL included) the
journal never counts a window that is not on disk, and a resumed run redoes at most the window
that was being written. Windows are fused in the fuser's deterministic order
(`WindowFuser.windows`).
When every window is there, the output is written from the partial output window by window in
the plan's order through the ordinary sink (`raster_sinks.open_sink`: GeoTIFF, COG, `.npy`,
`.mat`): the same writes as an uninterrupted run, hence the same bytes. Then the three files go.

A run with `--resume` continues a journal only if it records the same run: the inputs (paths,
sizes, modification times, array keys), the fuser's identity (`WindowFuser.identity`: for a
network the model, workdir, checkpoint step, tile geometry), the options that change pixels
(dtype, sensor maximum, output scale, nodata, value checks) and the window plan; otherwise it
stops with one line naming what differs. The partial output is uncompressed: it takes the
output's raw size on disk until the end (H x W x C x itemsize).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from u2net_jax import errors
from u2net_jax.io import fileio
from u2net_jax.io.raster_sinks import Sink

VERSION = 1


def paths(out: Path) -> dict[str, Path]:
  """The partial output and the journal of output `out`."""
  base = f'.{out.name}.partial'
  return {k: out.with_name(f'{base}.{k}') for k in ('npy', 'json')}


def _json_value(x: Any) -> Any:
  """Floats as text (NaN and infinities are not JSON), tuples as lists."""
  if isinstance(x, float):
    return repr(x)
  if isinstance(x, dict):
    return {str(k): _json_value(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_json_value(v) for v in x]
  if isinstance(x, np.generic):
    return _json_value(x.item())
  return x


def input_identity(path: str | os.PathLike, key: str | None) -> dict[str, Any]:
  """What identifies an input file: its resolved path, size, modification time and key."""
  p = Path(path).resolve()
  st = p.stat()
  return {'path': str(p), 'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns, 'key': key}


def plan_digest(windows) -> str:
  """A digest of the window plan (rectangles and units, in order)."""
  text = json.dumps([list(map(int, w)) for w in windows])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class PartialSink(Sink):
  """The partial output: an `.npy` memory map written in place, flushed after each window."""

  def __init__(self, path: Path, height, width, bands, dtype, *, reopen: bool):
    super().__init__(path, height, width, bands, dtype)
    if reopen:
      self.map = np.load(path, mmap_mode='r+')
      if self.map.shape != self.shape or self.map.dtype != self.dtype:
        raise errors.OptionError(
          f'--resume: {path} holds {self.map.shape} {self.map.dtype}, expected {self.shape} '
          f'{self.dtype}; delete it and its journal to start over'
        )
    else:
      self.map = np.lib.format.open_memmap(path, 'w+', self.dtype, self.shape)

  def write(self, y0, x0, block):
    self.map[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block

  def flush(self) -> None:
    self.map.flush()

  def close(self) -> None:
    self.flush()
    del self.map


class Journal:
  """The journal of one resumable output (`paths(out)`), held under its lock while open.

  Attributes:
    out: the output.
    record: what the run is (compared on resume).
    done: windows of the plan in the partial output.
    nodata_pixels: nodata pixels written in them.
  """

  def __init__(self, out: Path, record: dict[str, Any], *, restart_other: bool = False):
    """`restart_other`: a journal of another run is replaced (with a warning), not refused."""
    self.out, self.paths, self.restart_other = out, paths(out), restart_other
    self.record = _json_value(record)
    self.done = self.nodata_pixels = 0
    self._lock = None

  @contextlib.contextmanager
  def open(self, height: int, width: int, bands: int, dtype: np.dtype) -> Iterator[PartialSink]:
    """Locks, then continues the recorded run (checked) or starts one; yields the partial sink.

    Raises:
      errors.OptionError: another run holds the lock, or the journal records another run.
    """
    existed = self.paths['npy'].exists()
    self._acquire()
    try:
      reopen = self._load(existed)
      if not reopen:
        self.paths['json'].unlink(missing_ok=True)
      sink = PartialSink(self.paths['npy'], height, width, bands, dtype, reopen=reopen)
      if not reopen:
        sink.flush()
        self._save()
      try:
        yield sink
      finally:
        sink.close()
    finally:
      self._release()

  def window_done(self, index: int, nodata_pixels: int, sink: PartialSink) -> None:
    """Window `index` is written: flushed to disk, then counted in the journal."""
    sink.flush()
    self.done, self.nodata_pixels = index + 1, nodata_pixels
    self._save()

  def remove(self) -> None:
    """The output is complete: the partial output and the journal go."""
    for key in ('npy', 'json'):
      self.paths[key].unlink(missing_ok=True)

  def _save(self) -> None:
    state = {'done': self.done, 'nodata_pixels': self.nodata_pixels}
    text = json.dumps({'version': VERSION, 'run': self.record, 'state': state}, indent=1)
    fileio.atomic_write_text(self.paths['json'], text + '\n')

  def _load(self, existed: bool) -> bool:
    """Reads a journal of this run: True (state loaded) or False (none; a fresh start).

    Raises:
      errors.OptionError: a journal of another run, or an unreadable one.
    """
    journal, partial = self.paths['json'], self.paths['npy']
    if not journal.exists():
      if existed:
        logging.warning('Replacing %s: no journal says what it holds.', partial)
      return False
    try:
      data = json.loads(journal.read_text(encoding='utf-8'))
      recorded, state = data['run'], data['state']
      done, masked = int(state['done']), int(state['nodata_pixels'])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise errors.OptionError(
        f'--resume: the journal {journal} cannot be read ({e}); delete it and {partial} to '
        'start over'
      ) from e
    if data.get('version') != VERSION or recorded != self.record:
      what = _difference(recorded, self.record) if data.get('version') == VERSION else 'version'
      if self.restart_other:
        logging.warning('Starting %s over: %s records another run (%s).', self.out, journal, what)
        return False
      raise errors.OptionError(
        f'--resume: {journal} records another run of {self.out} ({what}); give the same '
        f'inputs, weights and options, or delete it and {partial} to start over'
      )
    if not existed:
      logging.warning('Starting %s over: its journal has no partial output %s.', self.out, partial)
      return False
    self.done, self.nodata_pixels = done, masked
    logging.info('Resuming %s after %d windows (%s).', self.out, done, journal)
    return True

  def _acquire(self) -> None:
    """An exclusive lock on the partial output (created empty when missing)."""
    partial = self.paths['npy']
    try:
      partial.parent.mkdir(parents=True, exist_ok=True)
      self._lock = open(partial, 'ab')  # noqa: SIM115 (held until _release)
    except OSError as e:
      raise fileio.OutputError(f'cannot write {partial}: {e}') from e
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._release()
      raise errors.OptionError(
        f'--resume: another run is writing {self.out} (it holds a lock on {partial})'
      ) from e

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.close()
      self._lock = None


def _difference(old: Any, new: Any, where: str = '') -> str:
  """The first field where two records differ: 'FIELD: OLD then, NEW now'."""
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        return _difference(old.get(key), new.get(key), f'{where}.{key}' if where else key)
  return f'{where or "record"}: {old!r} then, {new!r} now'


def partial_run_exists(out: Path) -> bool:
  """Whether a resumable run of `out` left its journal (for a warning without --resume)."""
  return paths(out)['json'].exists()


def record(
  *,
  inputs: dict[str, dict[str, Any]],
  fuser: dict[str, Any],
  options: dict[str, Any],
  windows,
  shape: tuple[int, int, int],
  dtype: np.dtype,
) -> dict[str, Any]:
  """The record of a run: what a resumed run must match."""
  return {
    'inputs': inputs,
    'fuser': fuser,
    'options': options,
    'windows': {'count': len(windows), 'digest': plan_digest(windows)},
    'shape': list(shape),
    'dtype': np.dtype(dtype).name,
  }
