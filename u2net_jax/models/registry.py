"""The model registry: every fusion network behind one interface (timm's `register_model`).

A network is one module file that defines its Flax module and registers a `ModelSpec` saying, in
one place, everything the rest of the project needs to know about it:

  * `module`: the Flax module class. Its `__call__` takes the batch roles named by `inputs`, in
    that order, NHWC on the [0, 1] scale, and returns the fused image (B, H, W, C): the whole
    input preparation of the authors' test code (PNN's padding, PanNet's high-pass inputs, the
    residual on `lms`, ...) happens inside the module, so that training, tiled and whole-image
    inference, scenes and the metrics never branch on the network.
  * `inputs`: the roles of the project's batch dict it reads (`ms`, `guide`, `lms`).
  * `resolve`: the module's fields that a config's `model` section means, unset fields filled and
    checked (raises ValueError naming the field).
  * `weights`: the table that maps the authors' PyTorch state dict onto the Flax parameters
    (`io.torch_weights.WeightTable`), where released weights exist.
  * `recipe`: the authors' training recipe as config overrides (loss, optimizer, schedule, batch
    size, epochs), applied by `configs/`.
  * `eval_mode`: how the authors' test code runs it ('tiled' as U2Net's test.py, or 'whole').

The common module fields are `spectral_bands`, `guide_bands`, `scale` and `dtype`; `config_utils`
derives the first two from the sensor. `create_model(config.model)` builds the network that
`config.model.name` names. Adding a network is one module file, one import line in
`u2net_jax/models/__init__.py`, a config and its tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The fields every registered module has (the config derives the band counts from the sensor).
COMMON_FIELDS = ('spectral_bands', 'guide_bands', 'scale', 'dtype')
# The batch roles a module may take (the project's batch dict; `guide` is the PAN or the RGB).
ROLES = ('ms', 'guide', 'lms')
DEFAULT_MODEL = 'u2net'


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a registered network declares (see the module docstring).

  Attributes:
    name: the registry name, `config.model.name` (lower case).
    module: the Flax module class.
    inputs: the batch roles its `__call__` takes, in order.
    resolve: fields of `config.model` (without `name`) -> the module's complete fields; raises
      ValueError for an unknown or inconsistent field. None: the dataclass fields as given.
    weights: the PyTorch state-dict table (`io.torch_weights.WeightTable`), or None.
    recipe: training-recipe config overrides, dotted paths -> values (e.g.
      `{'train.loss': 'mse', 'optimizer.learning_rate': 1e-3}`).
    eval_mode: 'tiled' or 'whole', the authors' test procedure.
    paper: the reference, for tables and the README.
  """

  name: str
  module: type[nn.Module]
  inputs: tuple[str, ...] = ('ms', 'guide')
  resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  weights: Any = None
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_mode: str = 'tiled'
  paper: str = ''

  def __post_init__(self):
    unknown = [r for r in self.inputs if r not in ROLES]
    if unknown:
      raise ValueError(f'model {self.name!r}: inputs {unknown} are not batch roles {ROLES}')
    if self.eval_mode not in ('tiled', 'whole'):
      raise ValueError(f'model {self.name!r}: eval_mode must be tiled or whole')


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
  """Adds a network to the registry (called once, by its module file)."""
  if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
    raise ValueError(f'model {spec.name!r} is registered twice')
  _REGISTRY[spec.name] = spec
  return spec


def list_models() -> list[str]:
  """The registered networks' names, sorted."""
  return sorted(_REGISTRY)


def get(name: str | None) -> ModelSpec:
  """The spec of a registered network; `None` means U2Net.

  Raises:
    ValueError: no network of that name (the message lists them).
  """
  name = (name or DEFAULT_MODEL).lower()
  if name not in _REGISTRY:
    raise ValueError(
      f'model.name {name!r} is not a registered network; expected one of {list_models()}'
    )
  return _REGISTRY[name]


def spec_of(model: nn.Module) -> ModelSpec:
  """The spec of a built module."""
  for spec in _REGISTRY.values():
    if type(model) is spec.module:
      return spec
  raise ValueError(f'{type(model).__name__} is not a registered network')


def _module_field_names(module: type[nn.Module]) -> list[str]:
  return [f.name for f in dataclasses.fields(module) if f.name not in ('parent', 'name')]


def model_fields(model_config: Mapping[str, Any] | None = None, **overrides) -> dict[str, Any]:
  """The module fields that a config's `model` section means, for the network it names.

  A field of U2Net's (`width` in a PNN config, say) may stay unset or at U2Net's default, which
  the other network then ignores; set to anything else it is an error, so that a field
  that would do nothing never passes silently.

  Args:
    model_config: `config.model` (a ConfigDict or a mapping), or None for the official U2Net.
    **overrides: fields replacing model_config's.

  Returns:
    A dict of every field of the named module (Flax's `parent` and `name` excepted).

  Raises:
    ValueError: an unknown network, or a field that is unknown or inconsistent for it.
  """
  fields = {**dict(model_config or {}), **overrides}
  spec = get(fields.pop('name', None))
  known = _module_field_names(spec.module)
  if spec.name != DEFAULT_MODEL:
    # U2Net's fields, which the shipped configs set: they may stay at U2Net's defaults.
    defaults = {
      f.name: f.default
      for f in dataclasses.fields(get(DEFAULT_MODEL).module)
      if f.name not in ('parent', 'name')
    }
    foreign = list(defaults)
    for field in [f for f in fields if f not in known and f in foreign]:
      value = fields.pop(field)
      if value is not None and value != defaults.get(field):
        raise ValueError(
          f'model.{field}={value!r} does not apply to model {spec.name!r}; its fields are {known}'
        )
  if spec.resolve is not None:
    return spec.resolve(fields)
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ValueError(f'unknown model field(s) {unknown}; {spec.name} takes {known}')
  return {k: v for k, v in fields.items() if v is not None}


def create_model(model_config: Mapping[str, Any] | None = None, **overrides) -> nn.Module:
  """The network a config's `model` section describes: the one model factory.

  Args:
    model_config: `config.model`, or None for the official WV3 U2Net.
    **overrides: fields replacing model_config's, e.g. `create_model(config.model,
      attention='direct')`.

  Returns:
    The Flax module, e.g. `U2Net(**fields)`.
  """
  fields = {**dict(model_config or {}), **overrides}
  spec = get(fields.get('name'))
  return spec.module(**model_fields(fields))


def abstract_inputs(model: nn.Module, ms_size: int, batch: int = 1) -> tuple:
  """Abstract (B, ...) inputs of `model`'s `__call__`, in the order of its spec's `inputs`."""
  spec = spec_of(model)
  size = model.scale * ms_size
  shapes = {
    'ms': (batch, ms_size, ms_size, model.spectral_bands),
    'lms': (batch, size, size, model.spectral_bands),
    'guide': (batch, size, size, model.guide_bands),
  }
  return tuple(jax.ShapeDtypeStruct(shapes[r], jnp.float32) for r in spec.inputs)


def init_params(model: nn.Module, rng: jax.Array, ms_size: int = 16) -> dict:
  """Initialises `model` (its authors' scheme); returns the 'params' collection.

  `model.lazy_init` on abstract inputs: only the parameters' random draws run, never the forward
  pass. Each op's program is compiled once per shape and shared by every model of the process,
  so a second model initialises in well under a second, where one jitted `model.init` per model
  compiles every random draw anew. The non-partitionable threefry lowering is the one the
  parameters have always been drawn with; they are a deterministic function of `rng`.

  Args:
    model: a registered network.
    rng: a PRNG key.
    ms_size: side of the abstract MS input (the parameters do not depend on it).

  Returns:
    The 'params' tree (float32 arrays).
  """
  with jax.threefry_partitionable(False):
    return model.lazy_init(rng, *abstract_inputs(model, ms_size))['params']


def abstract_params(model: nn.Module) -> dict:
  """The parameter tree's shapes and dtypes, computing nothing (`jax.eval_shape` of the init)."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), ms_size=4))


def count_params(params) -> int:
  """Number of scalars in a parameter tree (arrays or `jax.ShapeDtypeStruct`s)."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> tuple:
  """The arrays of `batch` that `model` takes, in its `__call__` order.

  Raises:
    KeyError: the batch lacks a role the network needs (the message names it).
  """
  missing = [r for r in spec_of(model).inputs if r not in batch]
  if missing:
    raise KeyError(
      f'{spec_of(model).name} needs batch roles {missing}; the batch has {sorted(batch)}'
    )
  return tuple(batch[r] for r in spec_of(model).inputs)


def apply(model: nn.Module, params, batch: Mapping[str, Any], **kwargs):
  """`model.apply` on the roles of `batch` it takes: the one call site shape of every network."""
  return model.apply({'params': params}, *model_inputs(model, batch), **kwargs)


@dataclasses.dataclass(frozen=True)
class BatchApply:
  """`model.apply` taking a batch dict: `BatchApply(model)({'params': p}, batch)`.

  Hashable (a frozen dataclass over the module), so it can be a static field of a train state or
  a static argument of `jax.jit`.
  """

  model: nn.Module

  def __call__(self, variables, batch: Mapping[str, Any], **kwargs):
    return self.model.apply(variables, *model_inputs(self.model, batch), **kwargs)
