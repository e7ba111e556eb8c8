"""Workdir safety: one run per workdir, one workdir shared by all hosts, one config per run.

- `default_workdir('configs/ablation.py:v2_concat')` -> `workdirs/ablation_v2_concat`: the config's
  `:arg` is part of the name, so the variants of one config file never resume each other.
- `claim(workdir)`: process 0 takes the workdir's lock (`workdir/.lock`: host, pid, start time;
  refreshed while the run lives) and writes a marker that every other process must see within a
  bounded time, proving the path is one folder all hosts share (a bucket or NFS) rather than
  per-host local disks, which would otherwise hang at the first checkpoint. A second run on a
  locked workdir stops at once naming the holder; a lock left by a crash is taken over when its
  process is gone (same host) or its refreshes stopped `STALE_AFTER_S` ago (another host).
  The lock appears whole (written beside it, then hard-linked to its name: exclusive), and a
  takeover happens under an exclusive `flock` of the workdir folder, re-reading the lock there
  and removing it only when it is still the stale one judged: of processes taking over one
  stale lock at the same instant, exactly one acquires it.
- `check_config(workdir, config)`: on resume, the stored `config.json` and the new config must
  agree on everything that defines the run (model, data, seed, optimizer, batch); the schedule
  (`train.num_epochs`, evaluation / checkpoint / log intervals), the evaluation settings and the
  data loading threads may change. Fields missing from an older `config.json` count as their
  default. Nothing is written before the check passes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from u2net_jax import errors
from u2net_jax.io import fileio
from u2net_jax.run import distributed

LOCK_NAME = '.lock'
REFRESH_EVERY_S = 20.0
STALE_AFTER_S = 120.0
SHARED_WAIT_S = 60.0

# Fields that may change between the runs of one workdir (prefixes end with '.').
CHANGEABLE = (
  'train.num_epochs',
  'train.eval_every_epochs',
  'train.checkpoint_every_epochs',
  'train.log_every_steps',
  'train.keep_checkpoints',
  'eval.',
  'init_from',  # Read only when a run starts from step 0.
  'data.prefetch',
  'data.read_threads',
  'data.test_files',
)


def default_workdir(config_spec: str) -> str:
  """`workdirs/<config file stem>[_<arg>]` for a `--config` value such as 'configs/x.py:arg'."""
  path, _, arg = config_spec.partition(':')
  name = Path(path).stem + (f'_{arg}' if arg else '')
  return str(Path('workdirs') / name.replace('/', '_'))


# ---------------------------------------------------------------------------------------------
# The lock.


class WorkdirLock:
  """`workdir/.lock`, created exclusively and whole; its content names the holder (host, pid)."""

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_NAME
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read_bytes(self) -> bytes | None:
    try:
      return self.path.read_bytes()
    except OSError:
      return None

  def _read(self, raw: bytes | None = None) -> dict | None:
    try:
      data = json.loads(self._read_bytes() if raw is None else raw)
      return data if isinstance(data, dict) else None
    except (TypeError, ValueError):
      return None

  def _stale_reason(self, holder: dict | None) -> str | None:
    """Why an existing lock can be taken over, or None when its holder may be alive."""
    try:
      age = time.time() - self.path.stat().st_mtime
    except FileNotFoundError:
      return 'it disappeared'
    if holder is None:
      return 'it is unreadable and old' if age > REFRESH_EVERY_S else None
    if holder.get('host') == self.holder['host']:
      pid = holder.get('pid')
      if isinstance(pid, int) and not fileio.pid_alive(pid):
        return f'its process {pid} on this host is gone'
      return None
    if age > STALE_AFTER_S:
      return f'host {holder.get("host")} stopped refreshing it {age:.0f} s ago'
    return None

  def _create(self) -> bool:
    """Creates the lock with its content in one step; False when a lock exists."""
    # Written under a private name, then linked: the lock never exists empty or half-written,
    # and `link` fails when the name exists (exclusive, also on NFS).
    tmp = self.path.with_name(f'{LOCK_NAME}.new-{self.holder["host"]}-{os.getpid()}')
    try:
      tmp.write_text(json.dumps(self.holder))
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:
      raise errors.WorkdirError(f'cannot create the lock {self.path}: {e}') from e
    finally:
      tmp.unlink(missing_ok=True)

  @contextlib.contextmanager
  def _takeover_guard(self) -> Iterator[None]:
    """An exclusive `flock` of the workdir folder while a stale lock is replaced."""
    try:
      fd = os.open(self.path.parent, os.O_RDONLY)
    except OSError:
      yield
      return
    try:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except OSError as e:  # A filesystem without locks: the re-check below still narrows it.
        logging.warning('Cannot flock %s (%s): a simultaneous takeover may race.', fd, e)
      yield
    finally:
      os.close(fd)  # Releases the flock.

  def _take_over(self, judged: bytes | None) -> None:
    """Removes the lock if it still holds `judged`, the content found stale (under the guard)."""
    with self._takeover_guard():
      raw = self._read_bytes()
      if raw is None or raw != judged:
        return  # Gone, or another process took it over meanwhile: judge again.
      reason = self._stale_reason(self._read(raw))
      if reason is None:
        return
      logging.warning('Taking over the lock %s: %s.', self.path, reason)
      self.path.unlink(missing_ok=True)

  def acquire(self) -> None:
    """Takes the lock or raises `errors.WorkdirError` naming the holder."""
    for _ in range(5):
      if self._create():
        self._thread = threading.Thread(target=self._refresh, name='workdir-lock', daemon=True)
        self._thread.start()
        return
      raw = self._read_bytes()
      holder = self._read(raw) if raw is not None else None
      if raw is not None and self._stale_reason(holder) is None:
        who = f'process {holder.get("pid")} on host {holder.get("host")}' if holder else 'a process'
        raise errors.WorkdirError(
          f'workdir {self.path.parent} is in use by {who} (lock {self.path}); wait for it to '
          'finish or choose another --workdir. If that run is dead, delete the lock file.'
        )
      if raw is not None:
        self._take_over(raw)
    raise errors.WorkdirError(f'could not take the lock {self.path} (contended)')

  def _refresh(self) -> None:
    # Shows other hosts that the holder is alive (they cannot check its pid).
    while not self._stop.wait(REFRESH_EVERY_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    """Removes the lock if it is still this process's."""
    self._stop.set()
    holder = self._read()
    if (
      holder
      and holder.get('pid') == self.holder['pid']
      and (holder.get('host') == self.holder['host'])
    ):
      self.path.unlink(missing_ok=True)


def _wait_for(path: Path, seconds: float) -> bool:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if path.exists():
      return True
    time.sleep(0.1)
  return path.exists()


@contextlib.contextmanager
def claim(workdir: str | Path, shared_wait_s: float = SHARED_WAIT_S) -> Iterator[None]:
  """Holds the workdir for the duration of a run (a collective: every process enters it).

  Args:
    workdir: the run's folder (it exists).
    shared_wait_s: how long the other processes wait for process 0's marker.

  Raises:
    errors.WorkdirError: the workdir is locked by another run, or not shared by every host.
  """
  workdir = Path(workdir)
  main = jax.process_index() == 0
  problem = None
  lock = WorkdirLock(workdir) if main else None
  if main:
    try:
      lock.acquire()
    except errors.WorkdirError as e:
      problem, lock = str(e), None
  if jax.process_count() > 1:
    # Process 0 sends the marker's name, or -1 when it could not take the lock (the others
    # then stop at once instead of waiting for a marker that never comes).
    mine = int.from_bytes(os.urandom(3), 'little') if problem is None else -1
    token = distributed.broadcast_int(mine if main else 0)
    marker = workdir / f'.shared-check-{max(token, 0):06x}'
    if main and problem is None:
      marker.write_text(json.dumps(lock.holder))
    if not main and token < 0:
      problem = f'workdir {workdir}: process 0 could not take its lock (see its message)'
    elif not main and not _wait_for(marker, shared_wait_s):
      problem = (
        f'workdir {workdir} is not shared: process {jax.process_index()} on host '
        f'{socket.gethostname()} did not see within {shared_wait_s:.0f} s the file {marker.name} '
        'that process 0 wrote there. Every host must use one path that all of them share (a '
        'bucket or an NFS folder).'
      )
    agreed = distributed.all_processes_agree(problem is None)
    if main:
      marker.unlink(missing_ok=True)
    if problem is None and not all(agreed):
      failed = [i for i, ok in enumerate(agreed) if not ok]
      problem = f'workdir {workdir}: process(es) {failed} cannot use it (see their messages)'
  if problem is not None:
    if lock is not None:
      lock.release()
    raise errors.WorkdirError(problem)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


# ---------------------------------------------------------------------------------------------
# The stored config.


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _changeable(field: str) -> bool:
  return any(field == c or (c.endswith('.') and field.startswith(c)) for c in CHANGEABLE)


def _same(a, b) -> bool:
  if isinstance(a, list | tuple) and isinstance(b, list | tuple):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
  if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
    return float(a) == float(b)
  return a == b


def config_differences(
  stored: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> list[str]:
  """The fields that define the run and differ, as 'field: stored -> new' lines.

  Args:
    stored: the run's `config.json` contents.
    new: the new config as a plain dict (`config.to_dict()`).
    defaults: the default config's values for fields an older `config.json` lacks; a field
      missing from both counts as unchanged.
  """
  old, cur = _flatten(stored), _flatten(new)
  base = _flatten(defaults or {})
  lines = []
  for field in sorted(set(old) | set(cur)):
    if _changeable(field):
      continue
    if field not in old and field not in base:
      continue
    before = old.get(field, base.get(field))
    after = cur.get(field, base.get(field))
    if not _same(before, after):
      lines.append(f'{field}: {before!r} -> {after!r}')
  return lines


def _default_values() -> dict:
  """`configs/default.py`'s values, when the checkout has it (for fields older runs lack)."""
  path = Path(__file__).resolve().parents[1] / 'configs' / 'default.py'
  if not path.is_file():
    return {}
  from u2net_jax.run import config_utils

  try:
    return config_utils.load_config_file(path).to_dict()
  except Exception:  # noqa: BLE001 (a best-effort fallback; missing fields then count as same)
    return {}


def check_config(
  workdir: str | Path, config: ml_collections.ConfigDict, *, allow_changes: bool = False
) -> list[str]:
  """Refuses to resume `workdir`'s run with a config that changes what the run is.

  Args:
    workdir: the run's folder; without a `config.json` there is nothing to compare.
    config: the new (finalized) config.
    allow_changes: accept the differences (they are logged as a warning).

  Returns:
    The differing fields (empty when none).

  Raises:
    errors.WorkdirError: listing the fields, when they differ and `allow_changes` is False.
  """
  path = Path(workdir) / 'config.json'
  if not path.is_file():
    return []
  try:
    stored = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(
      f'{path} is unreadable ({e}); it must describe the checkpoints beside it'
    ) from e
  diffs = config_differences(stored, config.to_dict(), _default_values())
  if diffs and not allow_changes:
    raise errors.WorkdirError(
      f'{workdir} holds a run with another config; it would resume with changed fields:\n  '
      + '\n  '.join(diffs)
      + '\nUse another --workdir for a new run, or --allow_config_change to resume anyway.'
    )
  if diffs:
    logging.warning('Resuming %s with a changed config:\n  %s', workdir, '\n  '.join(diffs))
  return diffs
