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
2. Field checks (`field_rules`): types, ranges, positivity and the fields with a fixed set of
   values, one rule per field, each message naming the field, its value and what is allowed;
   then the checks between fields (`_cross_checks`, e.g. tile sizes against the scale).

All problems are reported together, before any data is read or any training starts. `finalize`
is idempotent: a finalized config (and a saved `config.json`) passes it unchanged.
`check_config_arg` checks a `file.py:arg` spec and `check_init_from` the model of an `init_from`
workdir (both read files, so the entry points call them). The module is a little over 500 lines
because the rule table lists every field once; splitting it would scatter that one table.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from u2net_jax import toolbox
from u2net_jax.io import fileio


class ConfigError(ValueError):
  """A config field has a value it cannot have, or disagrees with another field."""


class ConfigFileError(ConfigError, FileNotFoundError):
  """A config file that is missing, a folder, unloadable or without `get_config`."""


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


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(field: str, low: int, high: int | None = None, optional: bool = False) -> FieldRule:
  """A rule accepting integers in [low, high] (no upper bound when `high` is None).

  Args:
    field: the dotted field path.
    low, high: the inclusive bounds.
    optional: None (unset) is accepted too.

  Returns:
    The `FieldRule`.
  """
  what = f'an integer >= {low}' if high is None else f'an integer in [{low}, {high}]'
  return FieldRule(
    field,
    lambda v: (optional and v is None) or (_is_int(v) and v >= low and (high is None or v <= high)),
    what + (' (or unset)' if optional else ''),
  )


def number(field: str, low: float, high: float, low_open: bool = False) -> FieldRule:
  """A rule accepting finite numbers in [low, high] ((low, high] when `low_open`).

  Args:
    field: the dotted field path.
    low, high: the bounds.
    low_open: exclude `low` itself.

  Returns:
    The `FieldRule`.
  """
  return FieldRule(
    field,
    lambda v: _is_number(v) and (v > low if low_open else v >= low) and v <= high,
    f'a finite number in {"(" if low_open else "["}{_show(low)}, {_show(high)}'
    + (')' if math.isinf(high) else ']'),
  )


def of_type(field: str, kind: type, what: str, optional: bool = False) -> FieldRule:
  """A rule accepting values of one type (e.g. a bool, a string).

  Args:
    field: the dotted field path.
    kind: the type.
    what: its name for the message.
    optional: None (unset) is accepted too.

  Returns:
    The `FieldRule`.
  """
  return FieldRule(
    field,
    lambda v: (optional and v is None) or isinstance(v, kind),
    what + (' (or unset)' if optional else ''),
  )


def _is_mapping(v) -> bool:
  return isinstance(v, Mapping | ml_collections.ConfigDict)


def _mapping_of_strings(field: str, keys=None) -> FieldRule:
  def check(v):
    return (
      _is_mapping(v)
      and all(isinstance(k, str) and k and isinstance(x, str) and x for k, x in v.items())
      and (keys is None or set(v) == set(keys))
    )

  what = 'a mapping of names to non-empty strings'
  return FieldRule(field, check, what + (f' with exactly the keys {tuple(keys)}' if keys else ''))


# 2**32: numpy's and the input pipeline's seed range (a larger seed overflows there).
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 1_000_000


def field_rules() -> list[FieldRule]:
  """The field checks `finalize` runs, the allowed values taken from the modules that use them.

  Returns:
    The rules, in the order their messages are reported.
  """
  # Imported here: they bring in jax, flax and h5py, which reading a config file does not need.
  from u2net_jax import models
  from u2net_jax.data import value_checks
  from u2net_jax.models import attention, u2net
  from u2net_jax.run import losses

  inf = math.inf
  return [
    one_of('task', toolbox.TASKS),
    integer('seed', 0, MAX_SEED),
    # Model: every width and count positive (0 gives a division by zero deep inside the model).
    integer('model.spectral_bands', 1, optional=True),
    integer('model.guide_bands', 1, optional=True),
    integer('model.width', 1, optional=True),
    integer('model.head_dim', 1, optional=True),
    number('model.mlp_ratio', 0, 64, low_open=True),
    number('model.resblock_ratio', 0, 64, low_open=True),
    integer('model.scale', 1, 16),
    integer('model.attention_block_size', 1),
    one_of('model.name', models.list_models()),
    one_of('model.variant', u2net.VARIANTS),
    one_of('model.dtype', u2net.DTYPES),
    one_of('model.attention', attention.ATTENTION_KINDS),
    of_type('model.single_branch_resblock', bool, 'a bool', optional=True),
    of_type('model.concat_residual', bool, 'a bool', optional=True),
    of_type('model.value_projection', bool, 'a bool', optional=True),
    # Data.
    one_of('data.source', ('hdf5', 'tfds', 'demo')),  # `input_pipeline.get_source`'s kinds.
    one_of('data.check_values', value_checks.CHECK_VALUES),
    number('data.max_value', 0, inf, low_open=True),
    _mapping_of_strings('data.h5_keys', ('gt', 'lms', 'ms', 'guide')),
    _mapping_of_strings('data.test_files'),
    of_type('data.train_file', str, 'a string'),
    of_type('data.valid_file', str, 'a string'),
    of_type('data.augment', bool, 'a bool'),
    integer('data.worker_count', 0, 256),
    integer('data.prefetch', 0, 64),
    integer('data.read_threads', 1, 256),
    integer('data.demo_size', 4),
    integer('data.demo_test_size', 4),
    integer('data.demo_num_train', 1),
    integer('data.demo_num_valid', 1),
    integer('data.demo_num_test', 1),
    # Optimizer (a negative or zero learning rate trains to nonsense without an error; a huge one
    # diverges, which training reports itself).
    number('optimizer.learning_rate', 0, inf, low_open=True),
    number('optimizer.decay_factor', 0, 1, low_open=True),
    number('optimizer.decay_every_epochs', 0, inf, low_open=True),
    number('optimizer.b1', 0, 1 - 1e-12),
    number('optimizer.b2', 0, 1 - 1e-12),
    number('optimizer.eps', 0, 1, low_open=True),
    # The recipes of the other networks (`run.losses`).
    one_of('optimizer.name', losses.OPTIMIZERS),
    number('optimizer.momentum', 0, 1 - 1e-12),
    number('optimizer.weight_decay', 0, inf),
    of_type('optimizer.last_layer', str, 'a string (a module name, or empty)'),
    number('optimizer.last_layer_lr_factor', 0, inf),
    # Schedule.
    integer('train.batch_size', 1),
    integer('train.num_epochs', 1, MAX_EPOCHS),
    integer('train.log_every_steps', 1),
    integer('train.eval_every_epochs', 1),
    integer('train.checkpoint_every_epochs', 1),
    integer('train.keep_checkpoints', 1),
    one_of('train.loss', losses.LOSSES),
    integer('train.loss_border', 0),
    number('train.l2_weight', 0, inf),
    of_type('train.l2_literal', bool, 'a bool'),
    of_type('init_from', str, 'a string (a workdir, or empty)'),
    # Evaluation.
    one_of('eval.mode', EVAL_MODES),
    integer('eval.tile_size', 1),
    integer('eval.tile_pad', 0),
    integer('eval.tile_batch', 1),
    integer('eval.crop', 0),
    integer('eval.block', 1),
    of_type('eval.save_images', bool, 'a bool'),
    number('eval.error_max', 0, inf, low_open=True),
  ]


def _cross_checks(config) -> list[str]:
  """Checks between fields (run only when each field passed its own rule)."""
  problems = []
  scale, tile, pad = (_get(config, f) for f in ('model.scale', 'eval.tile_size', 'eval.tile_pad'))
  if all(_is_int(v) and v > 0 for v in (scale, tile)) and _is_int(pad):
    if tile % scale or pad % scale:
      problems.append(
        f'eval.tile_size={tile} and eval.tile_pad={pad} are not multiples of model.scale={scale}'
      )
  from u2net_jax import models  # Imported here, as in `field_rules`.

  try:  # The variant's switches (a switch set for a variant it does not apply to).
    models.model_fields(_get(config, 'model'))
  except ValueError as e:
    problems.append(f'model: {e}')
  size = _get(config, 'data.demo_size')
  if _is_int(size) and _is_int(scale) and scale > 0 and size % scale:
    problems.append(f'data.demo_size={size} is not a multiple of model.scale={scale}')
  return problems


# The sections every config (and every config.json) has.
SECTIONS = ('model', 'data', 'optimizer', 'train', 'eval')


# ---------------------------------------------------------------------------------------------
# Finalize.

_MISSING = object()

# Config field -> the `toolbox.SENSORS` key it is derived from.
# `config.eval.mode`: 'auto' is the network's own test procedure (`ModelSpec.eval_mode`: U2Net's
# test.py tiles, the DLPan-Toolbox baselines fuse whole images); `infer.tiling.Fuser` runs them.
EVAL_MODES = ('auto', 'tiled', 'whole')

SENSOR_FIELDS = {
  'task': 'task',
  'model.spectral_bands': 'bands',
  'model.guide_bands': 'guide_bands',
  'model.scale': 'ratio',
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
      problems.append(f'{field} is missing (every config has it)')
    elif value is None:
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
  missing = [name for name in SECTIONS if not _is_mapping(_get(config, name))]
  if missing:
    raise ConfigError(
      f'invalid config: missing section(s) {missing} (every config has {list(SECTIONS)})'
    )
  problems = _derive_from_sensor(config)
  for rule in field_rules():
    value = _get(config, rule.field)
    if value is _MISSING:  # E.g. a config.json of an unknown layout.
      problems.append(f'{rule.field} is missing (every config has it)')
      continue
    if value is None and rule.field in SENSOR_FIELDS:  # Unset only when the sensor is unknown.
      continue
    if not rule.check(value):
      problems.append(f'{rule.field}={_show(value)} is not {rule.expected}')
  if not problems:
    problems = _cross_checks(config)
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems))
  return config


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
    if _is_mapping(value):
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
    f'model.{k}: {_show(theirs.get(k))} there, {_show(mine.get(k))} here'
    for k in sorted(set(mine) | set(theirs))
    if k not in _COMPUTE_ONLY and mine.get(k) != theirs.get(k)
  ]
  if differences:
    raise ConfigError(
      f'init_from={source!r} holds weights of another model ({Path(source) / "config.json"}): '
      + '; '.join(differences)
    )
