"""What a valid config is: the sensor-derived fields, one rule per field, the checks between fields.

Every config goes through `finalize` before anything uses it (`config_utils.load_config_file`
and `load_config` call it, and so must the absl entry points for the config `config_flags` hands
them: `config = config_utils.finalize(FLAGS.config)`; `config_utils` re-exports it).

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
is idempotent: a finalized config (and a saved `config.json`) passes it unchanged. The rule
table lists every field once, here; a new config field gets its rule in `field_rules`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from u2net_jax import toolbox
from u2net_jax.errors import ConfigError

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
    f'a finite number in {"(" if low_open else "["}{show(low)}, {show(high)}'
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


def is_mapping(v) -> bool:
  """A dict or a ConfigDict (a config section)."""
  return isinstance(v, Mapping | ml_collections.ConfigDict)


def _mapping_of_strings(field: str, keys=None) -> FieldRule:
  def check(v):
    return (
      is_mapping(v)
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


def show(value) -> str:
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
        f'{field}={show(value)} disagrees with data.sensor={sensor["name"]!r} '
        f'({show(expected)}); leave {field} unset to derive it from the sensor'
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
  missing = [name for name in SECTIONS if not is_mapping(_get(config, name))]
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
      problems.append(f'{rule.field}={show(value)} is not {rule.expected}')
  if not problems:
    problems = _cross_checks(config)
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems))
  return config
