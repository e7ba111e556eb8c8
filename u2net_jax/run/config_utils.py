"""Configs: loading them (files, flags, a workdir's `config.json`), saving `config.json`, and
checking an `init_from` workdir.

  config = config_utils.load_config_file('configs/wv3.py', {'data.sensor': 'QB'})
  config = config_utils.load_config('workdirs/official_wv3')

What a valid config is (the sensor-derived fields, the rule of each field, the checks between
fields) is `run.config_rules`; `finalize`, `ConfigError` and `EVAL_MODES` are re-exported here,
so callers import one module. Loading reports a bad config file, `:arg` or `--config.FIELD` as
one line (`ConfigFileError`, `parse_flags`: the nearest file or field name from difflib).
`check_config_arg` checks a `file.py:arg` spec and `check_init_from` the model of an `init_from`
workdir (both read files, so the entry points call them).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from u2net_jax.io import fileio
from u2net_jax.run.config_rules import (  # noqa: F401 (EVAL_MODES: re-exported)
  EVAL_MODES,
  ConfigError,
  finalize,
  is_mapping,
  show,
)


class ConfigFileError(ConfigError, FileNotFoundError):
  """A config file that is missing, a folder, unloadable or without `get_config`."""


# ---------------------------------------------------------------------------------------------
# Loading and saving.


def _siblings(path: Path) -> list[str]:
  """The Python files beside `path` (for a 'did you mean')."""
  try:
    return [p.name for p in path.parent.glob('*.py')]
  except OSError:
    return []


def _fields(node, prefix: str = '') -> list[str]:
  """Every dotted field path of a ConfigDict, sections included."""
  found = []
  for key, value in node.items():
    found.append(f'{prefix}{key}')
    if is_mapping(value):
      found.extend(_fields(value, f'{prefix}{key}.'))
  return found


def _overrides(argv) -> tuple[str | None, list[str]]:
  """(the --config file spec, the --config.FIELD paths) of a command line."""
  spec, fields = None, []
  for i, arg in enumerate(argv):
    name, eq, value = arg.lstrip('-').partition('=')
    if not arg.startswith('-'):
      continue
    if name == 'config':
      spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    elif name.startswith(('config.', 'noconfig.')):
      fields.append(name.split('.', 1)[1])
  return spec, fields


def override_problem(argv, error: BaseException) -> str:
  """One line saying why the command line's config flags could not be parsed.

  Names a `--config.FIELD` the config lacks with the nearest existing field (difflib), or the
  config file's own problem, else the parser's first line.

  Args:
    argv: the command line.
    error: what parsing it raised.

  Returns:
    The message (without 'error: ').
  """
  spec, fields = _overrides(argv)
  if spec:
    try:
      module, arg = _config_module(spec)
      config = module.get_config(arg) if arg else module.get_config()
    except ConfigError as e:
      return str(e)
    except Exception:  # noqa: BLE001 (then the parser's own message is the best there is)
      config = None
    if config is not None:
      known = _fields(config)
      for field in fields:
        if field not in known:
          near = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
          hint = f'; did you mean --config.{near[0]}?' if near else ''
          return f'--config.{field}: {spec} has no field {field!r}{hint}'
  text = str(error).strip().splitlines()
  return f'cannot parse the flags: {type(error).__name__}: {text[0] if text else ""}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=config_utils.parse_flags)`), with a bad
  `--config` / `--config.FIELD` reported as one `error:` line instead of a traceback.

  Returns:
    The arguments left after the flags.
  """
  from absl import app

  try:
    return app.parse_flags_with_usage(argv)
  except Exception as e:  # noqa: BLE001 (ml_collections raises AttributeError, KeyError, ...)
    sys.exit(f'error: {override_problem(argv, e)}')


def _config_module(spec: str | Path):
  """Imports a config file named as `file.py[:arg]`; returns (module, arg) after checking arg."""
  path_str, _, arg = str(spec).partition(':')
  path = Path(path_str).resolve()
  if path.is_dir():
    raise ConfigFileError(f'config file {path} is a folder; give a file such as configs/wv3.py')
  if not path.is_file():
    near = difflib.get_close_matches(path.name, _siblings(path), n=1)
    hint = f'; did you mean {path.with_name(near[0])}?' if near else ''
    raise ConfigFileError(f'config file {path} does not exist{hint}')
  if path.suffix != '.py':
    raise ConfigFileError(f'config file {path} is not a Python file (configs/*.py)')
  root = str(path.parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  spec_ = importlib.util.spec_from_file_location(f'_u2net_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec_)
  try:
    spec_.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 (whatever the file raises, it is the file's fault)
    where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
    raise ConfigFileError(
      f'config file {path} cannot be loaded{where}: {type(e).__name__}: {e}'
    ) from e
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigFileError(
      f'config file {path} defines no get_config() (every config file returns its ConfigDict '
      'from one)'
    )
  choices = getattr(module, 'CONFIG_ARGS', None)
  takes_arg = bool(inspect.signature(module.get_config).parameters)
  if arg and not takes_arg:
    raise ConfigError(f'{path_str}:{arg}: {path.name} takes no :arg (its get_config has none)')
  if arg and choices is not None and arg not in choices:
    raise ConfigError(f'{path_str}:{arg}: {arg!r} is not one of {tuple(choices)}')
  return module, arg


def check_config_arg(spec: str | Path) -> None:
  """Checks the `:arg` of a `--config=file.py:arg` spec against the file's `CONFIG_ARGS`.

  A config file lists the arguments its `get_config` knows in a module-level `CONFIG_ARGS`;
  an argument outside it, or any argument to a `get_config` that takes none, is an error
  (otherwise a typo such as `configs/tiny.py:hsir` would silently give the default config).
  The absl entry points call this with `FLAGS['config'].config_filename`.

  Args:
    spec: 'path/to/config.py' or 'path/to/config.py:arg'.

  Raises:
    ConfigError: naming the argument and the allowed ones.
    FileNotFoundError: no such config file.
  """
  _config_module(spec)


def load_config_file(
  path: str | Path, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file such as `configs/wv3.py`, finalized and locked.

  The folder above `configs/` is put on `sys.path` so that per-dataset configs can
  `from configs import default`, as they do under `ml_collections.config_flags`.

  Args:
    path: path of a Python file defining `get_config()`; `file.py:arg` passes `arg`.
    overrides: dotted field -> value, applied before `finalize` like `--config.FIELD=value`
      (e.g. {'data.sensor': 'QB'}); unknown fields are an error, as on the command line.

  Returns:
    The finalized, locked ConfigDict.
  """
  module, arg = _config_module(path)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return finalize(config)


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Writes `workdir/config.json` atomically (`fileio.atomic_write_text`).

  Args:
    config: the (finalized) config.
    workdir: the run's folder, created if needed.

  Returns:
    The path written.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return fileio.atomic_write_text(workdir / 'config.json', config.to_json_best_effort(indent=2))


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """Reads `workdir/config.json` back into a finalized, locked ConfigDict.

  Args:
    workdir: a folder written by train.py or `python -m u2net_jax.convert`.

  Returns:
    The config.
  """
  path = Path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(
      f'{path} not found: {workdir} is not a u2net-jax workdir (train.py and '
      '`python -m u2net_jax.convert` write one)'
    )
  try:
    raw = json.loads(path.read_text(encoding='utf-8'))
  except UnicodeDecodeError as e:
    raise ConfigError(f'{path} is not UTF-8 text ({e})') from e
  except json.JSONDecodeError as e:
    raise ConfigError(
      f'{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}'
    ) from e
  if not isinstance(raw, dict):
    raise ConfigError(f'{path} holds a JSON {type(raw).__name__}, not a config object')
  config = ml_collections.ConfigDict(raw)
  config.lock()
  try:
    return finalize(config)
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from e


# Fields of `config.model` that do not change the parameter tree (how it is computed only).
_COMPUTE_ONLY = ('attention', 'attention_block_size', 'dtype')


def check_init_from(config: ml_collections.ConfigDict) -> None:
  """Checks that `config.init_from`'s weights fit `config.model`, before anything is restored.

  Compares the stored `config.json` of the `init_from` workdir with `config.model`, field by
  field (the compute-only fields `attention`, `attention_block_size` and `dtype` may differ), so
  that fine-tuning from another model is a clear error instead of a shape error deep in the
  restore. Does nothing when `init_from` is empty.

  Args:
    config: the finalized run config.

  Raises:
    ConfigError: `init_from` is not a workdir, or its model differs; the message names the
      fields with both values.
  """
  source = config.get('init_from') or ''
  if not source:
    return
  try:
    stored = load_config(source)
  except FileNotFoundError as e:
    raise ConfigError(f'init_from={source!r}: {e}') from e
  from u2net_jax import models  # jax and flax: only when there is something to compare.

  try:
    mine, theirs = (models.model_fields(c.model) for c in (config, stored))
  except ValueError as e:
    raise ConfigError(f'init_from={source!r}: {e}') from e
  differences = [
    f'model.{k}: {show(theirs.get(k))} there, {show(mine.get(k))} here'
    for k in sorted(set(mine) | set(theirs))
    if k not in _COMPUTE_ONLY and mine.get(k) != theirs.get(k)
  ]
  if differences:
    raise ConfigError(
      f'init_from={source!r} holds weights of another model ({Path(source) / "config.json"}): '
      + '; '.join(differences)
    )
