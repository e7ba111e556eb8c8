"""The data layer's one interface: a `Source` of images to fuse, readers by format, `open_source`.

Training (`input_pipeline`), evaluation (`infer.eval_lib`, `compare`) and scene fusion
(`rasters.open_scene`) read their images through this module (the preparers and the TFDS builders
read their raw inputs with the same readers or their own loaders).

A source is a collection of images to fuse:

  len(source)                     the number of images;
  source[i]                       image i for the network: role -> (H, W, C) float32 divided by
                                  the sensor maximum; roles 'ms' (h, w, C), 'guide' (the PAN or
                                  RGB, 4h x 4w), 'lms' and 'gt' (4h x 4w x C) as present ('gt' is
                                  absent from full-resolution data);
  source.reference(i, example)    image i for the metrics: role -> (H, W, C) float64 on the sensor
                                  scale (a file's values as stored when there is a file);
  source.file, .sensor, .max_value, .roles
                                  where the data come from (for messages and outputs), the sensor
                                  the data say they come from (or None), the maximum they were
                                  divided by, role -> name in the file;
  source.close()                  releases open files (also `with source:`).

Each file is opened once per use: the handle that validated it serves every read.

Readers. One class per format, registered by kind (and by file suffix) with `register`:

  kind    suffixes             reader                           module
  hdf5    .h5 .hdf5 .he5       H5Source (PanCollection, HISR)   data/pancollection.py
  mat     .mat                 MatSource (toolbox test image)   data/matfile.py
  demo    -                    DemoSource (SYNTHETIC)           data/demo.py
  tfds    -                    TfdsSource (ArrayRecord)         data/tfds_builders.py
  scene   - (a PAN/MS pair)    SceneSource (read by window)     data/rasters.py
  (in memory, not registered: ArraySource, here)

A scene is the windowed case: a one-image source whose PAN and MS rasters (GeoTIFF, `.npy`,
`.mat`, `.h5`) the scene engine reads window by window (`rasters.open_scene`).

A new format is one `Source` subclass with a `from_spec(spec)` class method, decorated with
`@sources.register('kind', suffixes=('.ext',))` (tests/sources_test.py adds one in a few lines);
a built-in one also adds its module to `_BUILTIN`. Nothing else changes: training, evaluation
and `--test_files=name=path.ext` find it by suffix.

The one entry is `open_source(spec)`: `spec` is a `Spec` (made from a config and a split by
`spec_from_config`) or a path plus the expected geometry. The checks are applied in one place,
`value_checks.check_stored`, by every reader of stored files when it opens one: the layout
(roles, example counts, band counts, the scale ratio) and the values (finite, on the sensor
scale; sampled or full and cached, per `Spec.check_values`).

The calls go one way: `open_source` -> a reader -> `value_checks`; a reader module imports this
one only for the base class and `register`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from u2net_jax.data import H5_KEYS, DataError

ROLES = ('gt', 'lms', 'ms', 'guide')

# Modules holding the built-in readers: importing one registers its readers. TFDS is imported
# only when asked for (tensorflow_datasets is heavy).
_BUILTIN = (
  'u2net_jax.data.pancollection',
  'u2net_jax.data.matfile',
  'u2net_jax.data.demo',
  'u2net_jax.data.rasters',
)
_LAZY = {'tfds': 'u2net_jax.data.tfds_builders'}


# ----------------------------------------------------------------------------------------------
# The interface.


class Source(abc.ABC):
  """A collection of images to fuse (see the module docstring).

  Attributes:
    file: where the data come from (a path, 'demo', 'tfds:NAME/SPLIT'), for messages and outputs.
    sensor: the sensor the data say they come from (e.g. an HDF5 `sensor` attribute), or None.
    max_value: the sensor maximum the examples were divided by.
    roles: role -> the name of its data in the file (the role itself when there is no file).
  """

  __test__ = False  # Not a pytest class.
  file: str = ''
  sensor: str | None = None
  max_value: float = 1.0
  roles: Mapping[str, str] = {}

  @classmethod
  def from_spec(cls, spec: Spec) -> Source:
    """Opens the source that `spec` describes (readers registered with `register`)."""
    raise NotImplementedError(f'{cls.__name__} is not opened from a Spec')

  @abc.abstractmethod
  def __len__(self) -> int:
    """The number of images."""

  @abc.abstractmethod
  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Image `index` for the network: role -> (H, W, C) float32 divided by `max_value`."""

  def example(self, index: int) -> dict[str, np.ndarray]:
    """`source[index]` (the evaluation's name for it)."""
    return self[index]

  def reference(
    self, index: int, example: Mapping[str, np.ndarray] | None = None
  ) -> dict[str, np.ndarray]:
    """Image `index` for the metrics: role -> (H, W, C) float64 on the sensor scale.

    The default multiplies the example back by `max_value` (sources already in [0, 1]: demo,
    TFDS); file readers return the values as stored.

    Args:
      index: the image.
      example: `source[index]` when the caller has it (saves a read).
    """
    example = self[index] if example is None else example
    return {role: np.asarray(x, np.float64) * self.max_value for role, x in example.items()}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for i in range(len(self)):
      yield self[i]

  def close(self) -> None:  # noqa: B027 (optional: most sources hold no open file)
    """Releases open files (the default holds none)."""

  def __enter__(self) -> Source:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ArraySource(Source):
  """In-memory N x H x W x C arrays already divided by the sensor maximum (demo data, tests)."""

  def __init__(
    self, arrays: Mapping[str, np.ndarray], *, max_value: float = 1.0, file: str = 'arrays'
  ):
    """Args: arrays: role -> (N, H, W, C) in [0, 1]; max_value: the maximum they were divided
    by (for `reference`); file: what the data are, for messages."""
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise DataError(f'{file}: roles have different lengths {lengths}')
    self.arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    self.roles = {k: k for k in self.arrays}
    self.max_value = float(max_value)
    self.file = file
    self._len = lengths.pop()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[int(index)] for k, v in self.arrays.items()}


# ----------------------------------------------------------------------------------------------
# What to open.


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to open and what the caller expects of it.

  Attributes:
    kind: the reader (`formats()`), e.g. 'hdf5', 'demo', 'tfds'.
    location: a path, a TFDS name, or '' (demo).
    split: 'train', 'valid' or a test-set name (readers of several splits use it).
    max_value: the sensor maximum (`config.data.max_value`).
    spectral_bands: C (`config.model.spectral_bands`).
    guide_bands: 1 for a PAN, 3 for RGB (`config.model.guide_bands`).
    scale: the guide / MS resolution ratio (`config.model.scale`).
    keys: role -> name in the file (`config.data.h5_keys`).
    require_gt: whether the data must hold 'gt' (training and validation).
    check_values: 'sample', 'full' or 'off' (`config.data.check_values`; `value_checks`).
    sensor: the configured sensor (`config.data.sensor`).
    options: reader-specific settings (demo sizes and seed, the TFDS data dir).
  """

  kind: str
  location: str = ''
  split: str = ''
  max_value: float = 1.0
  spectral_bands: int = 0
  guide_bands: int = 1
  scale: int = 4
  keys: Mapping[str, str] = dataclasses.field(default_factory=lambda: H5_KEYS['pancollection'])
  require_gt: bool = True
  check_values: str = 'sample'
  sensor: str = ''
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Readers by kind and suffix.

_READERS: dict[str, type[Source]] = {}
_SUFFIXES: dict[str, str] = {}


def register(kind: str, *, suffixes: Sequence[str] = ()) -> Callable[[type], type]:
  """Class decorator: registers a `Source` subclass as the reader of `kind` (and `suffixes`).

  Args:
    kind: the reader's name (a `Spec.kind`, e.g. 'hdf5').
    suffixes: file suffixes it reads ('.h5'); lower case, with the dot.

  Returns:
    The decorator (it returns the class unchanged).
  """

  def decorate(cls: type) -> type:
    if not (isinstance(cls, type) and issubclass(cls, Source)):
      raise TypeError(f'register({kind!r}): {cls!r} is not a sources.Source subclass')
    _READERS[kind] = cls
    for suffix in suffixes:
      _SUFFIXES[suffix.lower()] = kind
    return cls

  return decorate


def _load_builtin() -> None:
  for module in _BUILTIN:
    importlib.import_module(module)


def reader(kind: str) -> type[Source]:
  """The reader class registered for `kind` (imported on first use for built-in kinds)."""
  if kind not in _READERS:
    _load_builtin()
    if kind in _LAZY:
      importlib.import_module(_LAZY[kind])
  if kind not in _READERS:
    raise DataError(f'no reader for data of kind {kind!r}; known: {", ".join(formats())}')
  return _READERS[kind]


def formats() -> dict[str, tuple[str, ...]]:
  """Kind -> the file suffixes its reader takes, for every registered reader (and TFDS)."""
  _load_builtin()
  kinds = sorted(set(_READERS) | set(_LAZY))
  return {k: tuple(s for s, v in sorted(_SUFFIXES.items()) if v == k) for k in kinds}


def suffixes() -> tuple[str, ...]:
  """Every file suffix a registered reader takes."""
  _load_builtin()
  return tuple(sorted(_SUFFIXES))


def kind_of(path: str | os.PathLike) -> str:
  """The reader kind of a file, by its suffix; unknown suffixes are read as HDF5 (as always)."""
  _load_builtin()
  return _SUFFIXES.get(Path(path).suffix.lower(), 'hdf5')


def open_source(spec: Spec | str | os.PathLike, **fields) -> Source:
  """The one entry: opens and checks the data that `spec` describes.

  Args:
    spec: a `Spec` (e.g. `spec_from_config(config, split)`), or a file path whose suffix picks the
      reader.
    **fields: with a path, the other `Spec` fields (max_value, spectral_bands, guide_bands, ...).

  Returns:
    The open `Source` (close it, or use `with`).

  Raises:
    DataError: the data are missing, unreadable, or not what the spec expects.
  """
  if not isinstance(spec, Spec):
    spec = Spec(kind=kind_of(spec), location=str(spec), **fields)
  elif fields:
    spec = dataclasses.replace(spec, **fields)
  return reader(spec.kind).from_spec(spec)


# ----------------------------------------------------------------------------------------------
# From a config: the split's data, or how to make them.


# File names that the preparers write, NAME being their --name (default: sensor / format).
_PREPARED_NAMES = (
  re.compile(r'^(?:train|valid)_(?P<name>.+)\.h5$'),
  re.compile(r'^test_(?P<name>.+?)(?:_OrigScale)?_multiExm1\.h5$'),
  re.compile(r'^test_(?P<name>.+)\.h5$'),
)


def _prepared_name(path: str) -> str | None:
  """The preparers' --name that produces a file called like `path`, if any."""
  for pattern in _PREPARED_NAMES:
    match = pattern.match(Path(path).name)
    if match:
      return match['name']
  return None


def prepare_hint(config, path: str) -> str:
  """The command that makes the missing file `path`, for the error message."""
  out = str(Path(path).parent) if path else 'DIR'
  name = _prepared_name(path) if path else None
  if config.task == 'hisr':
    fmt = 'harvard' if config.data.sensor == 'Harvard' else 'cave'
    command = f'python -m u2net_jax.data.prepare_cave --src SCENES_DIR --srf SRF --out {out}'
    command += ' --format harvard' if fmt == 'harvard' else ''
    command += f' --name {name}' if name and name != fmt else ''
    return (
      f'prepare it with `{command}` (SRF: the 31x3 Nikon D700 response, .mat/.npy/.csv; it '
      'writes train_NAME.h5, valid_NAME.h5 and test_NAME.h5), or use --config.data.source=demo'
    )
  sensor = config.data.sensor
  command = (
    f'python -m u2net_jax.data.prepare_pansharpening --pan P --ms M --sensor {sensor} --out {out}'
  )
  command += f' --name {name}' if name and name != sensor.lower() else ''
  return (
    'download PanCollection (https://github.com/liangjiandeng/PanCollection) and set '
    f'--config.data.*_file, or make it from your own full-resolution PAN/MS pair with '
    f'`{command}` (it writes train_NAME.h5, valid_NAME.h5, test_NAME_multiExm1.h5 and '
    'test_NAME_OrigScale_multiExm1.h5); or build the TFDS dataset (`python -m '
    f'u2net_jax.data.tfds_builders --name pan_collection/{sensor.lower()} --manual_dir DIR`) and '
    'use --config.data.source=tfds; or use --config.data.source=demo'
  )


def split_path(config, split: str) -> str:
  """The file of `split` in `config.data` (raises the unknown-split error)."""
  if split == 'train':
    return config.data.train_file
  if split == 'valid':
    return config.data.valid_file
  if split in config.data.test_files:
    return config.data.test_files[split]
  raise DataError(
    f"unknown split {split!r}: expected 'train', 'valid' or a test set of "
    f'config.data.test_files {sorted(config.data.test_files.keys())}'
  )


def _demo_options(config, split: str) -> dict[str, Any]:
  """The demo split's size and seed (test sets get a seed of their own, from their name)."""
  if split == 'train':
    num, size, seed = config.data.demo_num_train, config.data.demo_size, config.seed
  elif split == 'valid':
    num, size, seed = config.data.demo_num_valid, config.data.demo_size, config.seed + 1
  else:
    split_path(config, split)  # Only configured test sets exist.
    num, size = config.data.demo_num_test, config.data.demo_test_size
    seed = config.seed + 2 + zlib.crc32(split.encode()) % 1000
  split_kind = split if split in ('train', 'valid') else 'test'
  return {'split_kind': split_kind, 'num': int(num), 'size': int(size), 'seed': int(seed)}


def spec_from_config(config, split: str) -> Spec:
  """The `Spec` of one split of a config.

  Args:
    config: the experiment config (`config.data`, `config.model`, `config.task`).
    split: 'train', 'valid', or a test-set name (a key of `config.data.test_files`; with TFDS,
      any split of the dataset).

  Returns:
    The spec: `config.data.source` 'demo' and 'tfds' name their readers; 'hdf5' (files) reads
    the split's file with the reader of its suffix.

  Raises:
    DataError: an unknown source or split, or a missing file (the message says how to make it).
  """
  kind = config.data.source
  fields = dict(
    split=split,
    max_value=float(config.data.max_value),
    spectral_bands=int(config.model.spectral_bands),
    guide_bands=int(config.model.guide_bands),
    scale=int(config.model.scale),
    keys=dict(config.data.h5_keys),
    # Full-resolution test sets have no reference; training and validation must have one.
    require_gt=split in ('train', 'valid'),
    check_values=config.data.check_values,
    sensor=str(config.data.sensor),
  )
  if kind == 'demo':
    return Spec(kind='demo', options=_demo_options(config, split), **fields)
  if kind == 'tfds':
    if split not in ('train', 'valid') and split not in config.data.test_files:
      split_path(config, split)  # Raises the unknown-split error.
    options = {'data_dir': config.data.tfds_data_dir or None}
    return Spec(kind='tfds', location=config.data.tfds_name, options=options, **fields)
  if kind != 'hdf5':
    raise DataError(f"config.data.source = {kind!r}; expected 'hdf5', 'tfds' or 'demo'")
  path = split_path(config, split)
  if not path or not Path(path).exists():
    raise DataError(
      f'{path or "(empty path)"}: file not found for split {split!r}; ' + prepare_hint(config, path)
    )
  return Spec(kind=kind_of(path), location=str(path), **fields)
