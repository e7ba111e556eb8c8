"""Configs: loading them outside absl flags, finalizing (derive + validate), and `config.json`.

Every config goes through `finalize` before anything uses it: `load_config_file` and `load_config`
call it, and so must the absl entry points for the config `config_flags` hands them
(`config = config_utils.finalize(FLAGS.config)`).

`finalize` does two things, in this order:
1. The sensor is the single source of the band counts, the data scale and the task
   (`toolbox.SENSORS`): `task`, `model.spectral_bands`, `model.guide_bands` and `data.max_value`
   are left unset (None) in `configs/default.py` and derived here from `config.data.sensor`, so
   `--config.data.sensor=QB` alone turns the WV3 config into a QB one. A value that is set (by a
   dataset config or on the command line) must agree with the sensor's, else a `ConfigError`
   names both fields, e.g. "data.max_value=1023 disagrees with data.sensor='WV2' (2047)".
2. Field checks (`field_rules`): today the fields with a fixed set of values; issue 15 adds ranges,
   types and positivity to the same table.

All problems are reported together, before any data is read or any training starts. `finalize`
is idempotent: a finalized config (and a saved `config.json`) passes it unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from u2net_jax import fileio, toolbox


class ConfigError(ValueError):
  """A config field has a value it cannot have, or disagrees with another field."""


# ---------------------------------------------------------------------------------------------
# Field checks.


@dataclasses.dataclass(frozen=True)
class FieldRule:
  """One check of one config field.

  Attributes:
    field: the dotted path under the config, e.g. 'data.source'.
    check: value -> True when the value is acceptable.
    expected: what an acceptable value is, for the message (e.g. "one of ('hdf5', 'tfds')").
  """

  field: str
  check: Callable[[Any], bool]
  expected: str


def one_of(field: str, values) -> FieldRule:
  """A rule accepting only the given values.

  Args:
    field: the dotted field path.
    values: the allowed values.

  Returns:
    The `FieldRule`.
  """
  values = tuple(values)
  return FieldRule(field, lambda v: v in values, f'one of {values}')


def field_rules() -> list[FieldRule]:
  """The field checks `finalize` runs, the allowed values taken from the modules that use them.

  Returns:
    The rules, in the order their messages are reported.
  """
  # Imported here: they bring in jax, flax and h5py, which reading a config file does not need.
  from u2net_jax import attention, models, tiling
  from u2net_jax.data import value_checks

  return [
    one_of('task', toolbox.TASKS),
    one_of('data.source', ('hdf5', 'tfds', 'demo')),  # `input_pipeline.get_source`'s kinds.
    one_of('data.check_values', value_checks.CHECK_VALUES),
    one_of('model.variant', models.VARIANTS),
    one_of('model.dtype', models.DTYPES),
    one_of('model.attention', attention.ATTENTION_KINDS),
    one_of('eval.mode', tiling.MODES),
  ]


# ---------------------------------------------------------------------------------------------
# Finalize.

_MISSING = object()

# Config field -> the `toolbox.SENSORS` key it is derived from.
SENSOR_FIELDS = {
  'task': 'task',
  'model.spectral_bands': 'bands',
  'model.guide_bands': 'guide_bands',
  'data.max_value': 'max_value',
}


def _get(config, field: str):
  node = config
  for part in field.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return _MISSING
    node = node[part]
  return node


def _set(config, field: str, value) -> None:
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _show(value) -> str:
  """A value as the command line writes it: 2047 (not 2047.0), strings quoted."""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  return repr(value)


def _derive_from_sensor(config) -> list[str]:
  """Fills the unset sensor fields; returns the messages of those that disagree with it."""
  name = _get(config, 'data.sensor')
  if name is _MISSING:
    return ['data.sensor is missing: every config names its sensor']
  try:
    sensor = toolbox.get_sensor(name)
  except ValueError:
    return [f'data.sensor={name!r} is not one of {tuple(toolbox.SENSORS)}']
  config.data.sensor = sensor['name']  # Canonical spelling: 'wv3' -> 'WV3'.
  problems = []
  for field, key in SENSOR_FIELDS.items():
    value, expected = _get(config, field), sensor[key]
    if value is _MISSING:
      continue  # A config.json from before the field existed.
    if value is None:
      _set(config, field, float(expected) if field == 'data.max_value' else expected)
    elif value != expected:
      problems.append(
        f'{field}={_show(value)} disagrees with data.sensor={sensor["name"]!r} '
        f'({_show(expected)}); leave {field} unset to derive it from the sensor'
      )
  return problems


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Derives the sensor's fields and validates the config; idempotent.

  Args:
    config: a config from `configs/*.py` (possibly with command-line overrides) or a workdir's
      `config.json`. Modified in place (a locked config stays locked: only existing fields are
      set).

  Returns:
    The same config, with `task`, `model.spectral_bands`, `model.guide_bands`, `data.max_value`
    filled in from `config.data.sensor`.

  Raises:
    ConfigError: listing every field that disagrees with the sensor or fails a `field_rules`
      check, each with the field's name, its value and what was expected.
  """
  problems = _derive_from_sensor(config)
  for rule in field_rules():
    value = _get(config, rule.field)
    if value is _MISSING:  # A config.json from before the field existed.
      continue
    if value is None and rule.field in SENSOR_FIELDS:  # Unset only when the sensor is unknown.
      continue
    if not rule.check(value):
      problems.append(f'{rule.field}={_show(value)} is not {rule.expected}')
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems))
  return config


# ---------------------------------------------------------------------------------------------
# Loading and saving.


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
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  config.lock()
  return finalize(config)
