"""Loading config files outside absl flags, and saving/restoring a workdir's `config.json`."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import ml_collections


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file such as `configs/wv3.py`.

  The folder above `configs/` is put on `sys.path` so that per-dataset configs can
  `from configs import default`, as they do under `ml_collections.config_flags`.

  Args:
    path: path of a Python file defining `get_config()`; `file.py:arg` passes `arg`.

  Returns:
    The (locked) ConfigDict.
  """
  path_str, _, arg = str(path).partition(':')
  path = Path(path_str).resolve()
  if not path.is_file():
    raise FileNotFoundError(f'config file {path} does not exist')
  root = str(path.parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f'_u2net_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  return config


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Writes `workdir/config.json` atomically (temp file + rename)."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return atomic_write_text(workdir / 'config.json', config.to_json_best_effort(indent=2))


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """Reads `workdir/config.json` back into a locked ConfigDict."""
  path = Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(
      f'{path} not found: {workdir} is not a u2net-jax workdir (train.py and '
      '`python -m u2net_jax.convert` write one)'
    )
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  config.lock()
  return config


def atomic_write_text(path: str | Path, text: str) -> Path:
  """Writes `text` to `path` so that a crash leaves either the old file or the new one."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path
