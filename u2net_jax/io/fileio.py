"""Crash-safe file output: every file or folder the project writes appears whole or not at all.

One mechanism for the whole library: write to a temporary name in the destination's folder, flush,
then `os.replace` onto the final name (atomic on POSIX filesystems). A crash or a kill leaves the
previous version (or nothing), never half a file; the temporary is removed on any failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputError(OSError):
  """A destination that cannot be written (read-only, missing permissions, full disk)."""


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def pid_alive(pid: int) -> bool:
  """Whether process `pid` exists on this host (someone else's process counts as alive)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process.
  return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = '', prefix: str = '') -> Iterator[Path]:
  """Yields a temporary path beside `path`; renamed onto `path` when the block succeeds.

  Usage::

    with atomic_file('out/table.csv') as tmp:
      tmp.write_text(text)

  Args:
    path: the final file; its folder is created.
    suffix: suffix of the temporary name (some writers choose the format by it, e.g. '.png').
    prefix: the temporary name's start (default `.NAME.`), e.g. one that says who writes it.

  Yields:
    The temporary path (created empty). On an exception it is removed and `path` is untouched.
  """
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
      dir=path.parent, prefix=prefix or f'.{path.name}.', suffix=f'.tmp{suffix}'
    )
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs are not.
  except OSError as e:
    raise OutputError(f'cannot write {path}: {e}') from e
  tmp = Path(tmp)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Writes `data` to `path` atomically (fsynced before the rename). Returns `path`."""
  path = Path(path)
  with atomic_file(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes `text` (UTF-8) to `path` atomically. Returns `path`."""
  return atomic_write_bytes(path, text.encode('utf-8'))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary folder beside `path`; it replaces `path` when the block succeeds.

  An existing `path` is swapped out and removed only after the new folder is in place; on an
  exception the temporary folder is removed and `path` is untouched.
  """
  final = Path(path)
  try:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f'.{final.name}.tmp-'))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; results are not.
  except OSError as e:
    raise OutputError(f'cannot write {final}: {e}') from e
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if final.exists():
    old = final.with_name(f'.{final.name}.old-{os.getpid()}')
    os.replace(final, old)
  os.replace(tmp, final)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def ensure_writable_dir(path: str | os.PathLike, what: str = 'output folder') -> Path:
  """Creates `path` and proves it writable before any work is done.

  Raises:
    OutputError: naming `what` and the folder, when it cannot be created or written.
  """
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix='.write-test-')
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise OutputError(f'{what} {path} is not writable ({e})') from e
  return path
