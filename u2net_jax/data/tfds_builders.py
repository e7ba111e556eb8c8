r"""TFDS builders writing ArrayRecord files: `pan_collection`, `cave` and `u2net_demo`.

ArrayRecord files are read by index (`tfds.data_source`), so the data can live in a cloud bucket
(`--data_dir gs://...`) and every host reads only its own examples. Building and reading need
`tensorflow-datasets` and `array_record` but not TensorFlow.

  python -m u2net_jax.data.tfds_builders --name pan_collection/wv3 \
      --manual_dir PANCOLLECTION_DIR --data_dir ~/tensorflow_datasets
  python -m u2net_jax.data.tfds_builders --name cave --manual_dir CAVE_DIR
  python -m u2net_jax.data.tfds_builders --name u2net_demo/pansharpening

then train with `--config.data.source=tfds --config.data.tfds_name=pan_collection/wv3`.

Builders (every example: 'gt', 'lms', 'ms', 'guide', H x W x C float32 on the sensor scale,
divided by `config.data.max_value` when read; the stored files keep the HDF5 order):
- `pan_collection/{wv3,wv2,qb,gf2}`: manual download. Place the PanCollection HDF5 files
  anywhere under `manual_dir` with their distributed names: `train_wv3.h5`, `valid_wv3.h5`,
  `test_wv3_multiExm1.h5`, `test_wv3_OrigScale_multiExm1.h5` (or those that
  `prepare_pansharpening` writes). Splits: 'train', 'validation', 'wv3_reduced', 'wv3_full'
  (the test-set names of `configs/wv3.py`). Full-resolution examples have no reference: their
  'gt' is stored empty (0 x 0 x C) and dropped when read.
- `cave/x4`: `manual_dir` holds the raw CAVE scene folders and the 31 x 3 SRF file
  (`response_coefficient.mat`, `srf.mat`, `srf.npy` or `srf.csv`); the examples are made by
  `prepare_cave` (same split, patches and degradation). Splits 'train', 'validation',
  'cave_test'.
- `u2net_demo/{pansharpening,hisr}`: the SYNTHETIC demo data (`data.demo`), no download.
  Splits 'train', 'validation', 'demo_test'.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from u2net_jax import toolbox
from u2net_jax.data import (
  H5_KEYS,
  DataError,
  demo,
  pancollection,
  prepare_cave,
  run_command,
  sources,
)

ROLES = sources.ROLES
_SPLIT_NAMES = {'train': 'train', 'valid': 'validation'}


def _features(bands: int, guide_bands: int, size: int | None = None):
  """Role -> float32 Tensor (H, W, C); sizes are dynamic unless `size` (gt side) is given."""
  big = size
  small = None if size is None else size // 4
  return tfds.features.FeaturesDict(
    {
      'gt': tfds.features.Tensor(shape=(big, big, bands), dtype=np.float32, encoding='zlib'),
      'lms': tfds.features.Tensor(shape=(big, big, bands), dtype=np.float32, encoding='zlib'),
      'ms': tfds.features.Tensor(shape=(small, small, bands), dtype=np.float32, encoding='zlib'),
      'guide': tfds.features.Tensor(
        shape=(big, big, guide_bands), dtype=np.float32, encoding='zlib'
      ),
    }
  )


def _h5_examples(path: Path, keys: dict, bands: int, delete: bool = False):
  """Yields (key, example) from a validated HDF5 file, raw values as float32 (H, W, C).

  With `delete`, the (temporary) file is removed once read, and its folder when it is empty.
  """
  try:
    yield from _read_examples(path, keys, bands)
  finally:
    if delete:
      Path(path).unlink(missing_ok=True)
      if not any(Path(path).parent.iterdir()):
        Path(path).parent.rmdir()


def _read_examples(path: Path, keys: dict, bands: int):
  with pancollection.open_h5(path) as f:
    n = f[keys['ms']].shape[0]
    for i in range(n):
      ex = {}
      for role in ROLES:
        if keys[role] in f:
          ex[role] = np.asarray(f[keys[role]][i], np.float32).transpose(1, 2, 0)
      if 'gt' not in ex:  # Full resolution: no reference (stored empty, see the docstring).
        ex['gt'] = np.zeros((0, 0, bands), np.float32)
      yield i, ex


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders below."""

  # TFDS locates a packaged builder's file through `importlib_resources`, a package it does not
  # depend on; the file is known, so say it directly.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _generate_examples(self, examples):
    yield from examples


# ----------------------------------------------------------------------------------------------
# pan_collection


@dataclasses.dataclass
class PanCollectionConfig(tfds.core.BuilderConfig):
  """One sensor's PanCollection files; bands and maximum come from the sensor table."""

  @property
  def bands(self) -> int:
    return toolbox.get_sensor(self.name)['bands']

  @property
  def max_value(self) -> float:
    return float(toolbox.get_sensor(self.name)['max_value'])


class PanCollection(_Builder):
  """PanCollection (Deng et al.) pansharpening data, from the HDF5 files (manual download)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'PanCollection HDF5 files as ArrayRecord.'}
  BUILDER_CONFIGS = [
    PanCollectionConfig(name='wv3'),
    PanCollectionConfig(name='wv2'),
    PanCollectionConfig(name='qb'),
    PanCollectionConfig(name='gf2'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Download PanCollection (https://github.com/liangjiandeng/PanCollection) and place its HDF5 '
    'files (train_wv3.h5, valid_wv3.h5, test_wv3_multiExm1.h5, test_wv3_OrigScale_multiExm1.h5, '
    'likewise for wv2/qb/gf2) anywhere under manual_dir.'
  )

  def _info(self):
    c = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      features=_features(c.bands, 1),
      disable_shuffling=True,  # Keep the HDF5 order (test images are numbered).
      metadata=tfds.core.MetadataDict(max_value=c.max_value, sensor=c.name.upper()),
      homepage='https://github.com/liangjiandeng/PanCollection',
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    names = {
      'train': f'train_{c.name}.h5',
      'validation': f'valid_{c.name}.h5',
      f'{c.name}_reduced': f'test_{c.name}_multiExm1.h5',
      f'{c.name}_full': f'test_{c.name}_OrigScale_multiExm1.h5',
    }
    root = Path(dl_manager.manual_dir)
    found = {}
    for split, name in names.items():
      hits = sorted(root.rglob(name))
      if hits:
        found[split] = hits[0]
    if not found:
      raise DataError(
        f'{root}: none of {sorted(names.values())} found. ' + self.MANUAL_DOWNLOAD_INSTRUCTIONS
      )
    keys = H5_KEYS['pancollection']
    for split, path in found.items():  # Validate everything before writing anything.
      pancollection.H5Source(
        path,
        keys=keys,
        max_value=c.max_value,
        spectral_bands=c.bands,
        guide_bands=1,
        require_gt=not split.endswith('_full'),
        check_values='full',  # Converted once: worth reading every value.
      )
    return {split: _h5_examples(path, keys, c.bands) for split, path in found.items()}


# ----------------------------------------------------------------------------------------------
# cave


@dataclasses.dataclass
class CaveConfig(tfds.core.BuilderConfig):
  patch: int = 64
  stride: int = 32
  grid: int | None = 14
  kernel_size: int = 3
  sigma: float = 0.5
  test_scenes: tuple[str, ...] | None = None


_SRF_NAMES = (
  'response_coefficient.mat',
  'response coefficient.mat',
  'srf.mat',
  'srf.npy',
  'srf.csv',
)


class Cave(_Builder):
  """CAVE x4 HISR (31 bands, RGB guide), made from the raw scenes by `prepare_cave`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'CAVE x4 with the paper split (20 training / 11 test scenes).'}
  BUILDER_CONFIGS = [CaveConfig(name='x4')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Download the CAVE multispectral images (https://www.cs.columbia.edu/CAVE/databases/'
    'multispectral/), unpack the scene folders into manual_dir, and add the 31x3 Nikon D700 '
    f'spectral response as one of {_SRF_NAMES}.'
  )

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=_features(prepare_cave.BANDS, 3),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(max_value=1.0, sensor='CAVE'),
      homepage='https://www.cs.columbia.edu/CAVE/databases/multispectral/',
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    root = Path(dl_manager.manual_dir)
    srf = next((root / n for n in _SRF_NAMES if (root / n).exists()), None)
    if srf is None:
      raise DataError(f'{root}: no spectral response file. ' + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    tmp = Path(tempfile.mkdtemp(prefix='u2net_cave_'))
    paths = prepare_cave.prepare(
      str(root),
      str(srf),
      str(tmp),
      test_scenes=c.test_scenes,
      patch=c.patch,
      stride=c.stride,
      grid=c.grid,
      kernel_size=c.kernel_size,
      sigma=c.sigma,
    )
    keys = prepare_cave.KEYS
    return {
      'train': _h5_examples(paths['train'], keys, prepare_cave.BANDS, delete=True),
      'validation': _h5_examples(paths['valid'], keys, prepare_cave.BANDS, delete=True),
      'cave_test': _h5_examples(paths['test'], keys, prepare_cave.BANDS, delete=True),
    }


# ----------------------------------------------------------------------------------------------
# u2net_demo


@dataclasses.dataclass
class DemoConfig(tfds.core.BuilderConfig):
  task: str = 'pansharpening'
  size: int = 64
  test_size: int = 128
  num_train: int = 512
  num_valid: int = 64
  num_test: int = 4
  seed: int = 1


class U2netDemo(_Builder):
  """SYNTHETIC demo data of u2net-jax (not real imagery), generated in-process."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'SYNTHETIC demo data.'}
  BUILDER_CONFIGS = [DemoConfig(name='pansharpening'), DemoConfig(name='hisr', task='hisr')]

  def _info(self):
    c = self.builder_config
    info = demo.get_demo_sensor(c.task)
    return tfds.core.DatasetInfo(
      builder=self,
      description='SYNTHETIC data (not real imagery): ' + demo.__doc__.split('\n\n')[0],
      features=_features(info['bands'], info['guide_bands']),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(**demo.metadata(c.task), sensor='SYNTHETIC'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    return {
      'train': self._demo_examples('train', c.num_train, c.size, c.seed),
      'validation': self._demo_examples('valid', c.num_valid, c.size, c.seed + 1),
      'demo_test': self._demo_examples('test', c.num_test, c.test_size, c.seed + 2),
    }

  def _demo_examples(self, split, num, size, seed):
    c = self.builder_config
    arrays = demo.make_split(c.task, split, num, size, seed)
    # Stored on the sensor scale, like the rest.
    scale = np.float32(demo.metadata(c.task)['max_value'])
    for i in range(num):
      yield i, {role: arrays[role][i] * scale for role in ROLES}


# ----------------------------------------------------------------------------------------------
# Reading.


@sources.register('tfds')
class TfdsSource(sources.Source):
  """The 'tfds' reader (`sources`): a TFDS ArrayRecord split, role -> (H, W, C) / max_value."""

  def __init__(self, source, max_value: float, file: str = 'tfds'):
    self.source = source
    self.max_value = float(max_value)
    self.file = file
    self.roles = {role: role for role in ROLES}

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self.source[int(index)]
    out = {}
    for role in ROLES:
      x = np.asarray(ex[role], np.float32)
      if x.size:  # An empty 'gt' marks a full-resolution example.
        out[role] = x / np.float32(self.max_value)
    return out

  @classmethod
  def from_spec(cls, spec: sources.Spec) -> TfdsSource:
    """The split `spec.split` ('train', 'valid' or a test-set name) of TFDS `spec.location`.

    Raises:
      DataError: not built (the message gives the build command), a missing split, or metadata
        that disagree with the spec (sensor maximum, band counts).
    """
    name = spec.location
    if not name:
      raise DataError(
        "config.data.source = 'tfds' needs config.data.tfds_name (e.g. pan_collection/wv3)"
      )
    data_dir = spec.options.get('data_dir') or None
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # Unknown name or config.
      raise DataError(f'TFDS dataset {name!r}: {e}') from e
    if not builder.is_prepared():
      raise DataError(
        f'TFDS dataset {name!r} is not built in {builder.data_dir}; '
        f'build it with `{build_command(name)}`'
      )
    tsplit = _SPLIT_NAMES.get(spec.split, spec.split)
    if tsplit not in builder.info.splits:
      raise DataError(
        f'TFDS dataset {name!r} has no split {tsplit!r}; it has '
        f'{sorted(builder.info.splits.keys())}'
      )
    stored = float(builder.info.metadata.get('max_value', spec.max_value))
    if stored != spec.max_value:
      raise DataError(
        f'TFDS dataset {name!r} is on a 0..{stored:g} scale but config.data.max_value = '
        f'{spec.max_value:g} (wrong sensor maximum)'
      )
    feats = builder.info.features
    for role, want in (('ms', spec.spectral_bands), ('guide', spec.guide_bands)):
      found = feats[role].shape[-1]
      if found != want:
        raise DataError(
          f'TFDS dataset {name!r}: {role!r} has {found} bands; the config expects {want}'
        )
    source = tfds.data_source(name, split=tsplit, data_dir=data_dir)
    return cls(source, spec.max_value, f'tfds:{name}/{spec.split}')


def build_command(name: str) -> str:
  return f'python -m u2net_jax.data.tfds_builders --name {name} --manual_dir DIR --data_dir DIR'


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags (on `flag_values`); `main` and `__main__` use them."""
  fv = {'flag_values': flag_values}
  flags.DEFINE_string('name', None, 'e.g. pan_collection/wv3, cave, u2net_demo/hisr', **fv)
  flags.DEFINE_string('manual_dir', None, 'where the manual downloads are', **fv)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir (local or gs://)', **fv)
  flags.mark_flag_as_required('name', **fv)


def run(fv: flags.FlagValues) -> int:
  """Builds the dataset named by parsed flags.

  Returns:
    0, or 2 when the manual download is missing or invalid.
  """
  builder = tfds.builder(fv.name, data_dir=fv.data_dir, file_format='array_record')
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=fv.manual_dir)
    )
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'built {fv.name} in {builder.data_path}: {dict(builder.info.splits)}')
  return 0


def main(argv: Sequence[str]) -> int:
  """Runs the command line `argv` (flags only, no program name), e.g. from a notebook or a test.

  Returns:
    0, or 2 when the input is refused.
  """
  return run_command('tfds_builders', define_flags, run, argv)


if __name__ == '__main__':
  run_command('tfds_builders', define_flags, run)
