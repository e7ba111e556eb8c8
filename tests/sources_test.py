"""Tests of the data layer's one interface (`data.sources`): readers by format, one entry, checks.

Adding a format is one `Source` subclass and one `@sources.register` (shown here with a reader
of `.npz` files written in this file): training, evaluation and `--test_files` then read it.
"""

import pathlib

import numpy as np
import pytest
import scipy.io

from u2net_jax.data import (
  DataError,
  input_pipeline,
  matfile,
  pancollection,
  rasters,
  sources,
  value_checks,
)
from u2net_jax.infer import eval_lib
from u2net_jax.run import config_utils

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**test_files):
  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')  # 8 bands, 0..2047.
  with config.unlocked():
    config.data.test_files = {k: str(v) for k, v in test_files.items()}
  return config


def _stored(n=2, size=96, bands=8, seed=0):
  """PanCollection-layout arrays (N x C x H x W, 0..2047): gt, lms, ms, pan."""
  rng = np.random.default_rng(seed)
  low = rng.uniform(200, 1800, (n, bands, size // 16, size // 16))
  ref = np.round(
    np.kron(low, np.ones((1, 1, 16, 16))) + rng.uniform(-150, 150, (n, bands, size, size))
  )
  ms = ref.reshape(n, bands, size // 4, 4, size // 4, 4).mean(axis=(3, 5))
  return {
    'gt': ref,
    'lms': np.kron(ms, np.ones((1, 1, 4, 4))),
    'ms': ms,
    'pan': ref.mean(axis=1, keepdims=True),
  }


# ----------------------------------------------------------------------------------------------
# A new format: one reader class and one registration.


class NpzSource(sources.Source):
  """PanCollection's four arrays in one numpy `.npz` file (a format made up for this test)."""

  def __init__(self, spec):
    with np.load(spec.location) as z:
      self.stored = {k: z[k] for k in z.files}
    self.roles = {role: key for role, key in spec.keys.items() if key in self.stored}
    self.file, self.max_value = spec.location, spec.max_value
    self._len = value_checks.check_stored(spec.location, self.stored, self.roles, spec)

  @classmethod
  def from_spec(cls, spec):
    return cls(spec)

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    return {
      role: self.stored[key][i].transpose(1, 2, 0).astype(np.float32) / np.float32(self.max_value)
      for role, key in self.roles.items()
    }


@pytest.fixture
def npz_registered(monkeypatch):
  """Registers `NpzSource` for '.npz' for one test (the registry restored afterwards)."""
  sources.formats()  # The built-in readers registered first, into the lasting registry.
  monkeypatch.setattr(sources, '_READERS', dict(sources._READERS))
  monkeypatch.setattr(sources, '_SUFFIXES', dict(sources._SUFFIXES))
  sources.register('npz', suffixes=('.npz',))(NpzSource)  # The one registration.


def test_a_new_format_is_one_reader_class_and_one_registration(tmp_path, npz_registered):
  stored = _stored()
  path = tmp_path / 'mine.npz'
  np.savez(path, **stored)
  assert sources.formats()['npz'] == ('.npz',)
  # The one entry, from a path: the suffix picks the reader.
  with sources.open_source(path, max_value=2047.0, spectral_bands=8, guide_bands=1) as source:
    assert isinstance(source, NpzSource) and len(source) == 2
  # Training reads it as a configured split, evaluation as a file given on the command line.
  config = _config(mine=path)
  train_like = input_pipeline.get_source(config, 'mine')
  np.testing.assert_allclose(
    train_like[1]['guide'], stored['pan'][1].transpose(1, 2, 0) / 2047.0, rtol=1e-6
  )
  (test_set,) = eval_lib.select_test_sets(_config(), f'{path}')
  assert test_set.name == 'mine' and test_set.protocol == 'reduced' and test_set.file == str(path)
  ref = test_set.source.reference(0)  # The interface's default: the example x the maximum.
  np.testing.assert_allclose(ref['gt'], stored['gt'][0].transpose(1, 2, 0), rtol=1e-6)
  test_set.close()
  # The data layer's checks apply to the new reader unchanged: bands, then values.
  np.savez(tmp_path / 'four.npz', **_stored(bands=4))
  with pytest.raises(DataError, match=r"four.npz: key 'ms' has shape \(2,4,24,24\); expected"):
    eval_lib.select_test_sets(_config(), f'{tmp_path / "four.npz"}')
  np.savez(tmp_path / 'high.npz', **dict(stored, gt=stored['gt'] * 4))
  with pytest.raises(DataError, match=r"high.npz: key 'gt' has values up to .*max_value = 2047"):
    input_pipeline.get_source(_config(high=tmp_path / 'high.npz'), 'high')


# ----------------------------------------------------------------------------------------------
# The built-in readers.


def test_the_builtin_readers_are_registered_by_kind_and_suffix():
  kinds = sources.formats()
  assert kinds['hdf5'] == ('.h5', '.hdf5', '.he5') and kinds['mat'] == ('.mat',)
  assert kinds['demo'] == () and kinds['tfds'] == ()
  assert sources.reader('hdf5') is pancollection.H5Source
  assert sources.reader('mat') is matfile.MatSource
  assert sources.kind_of('a/test_wv3.H5') == 'hdf5' and sources.kind_of('x.mat') == 'mat'
  with pytest.raises(DataError, match=r"no reader for data of kind 'zarr'; known: demo, hdf5"):
    sources.reader('zarr')
  with pytest.raises(TypeError, match='not a sources.Source subclass'):
    sources.register('bad')(dict)
  config = _config()
  with config.unlocked():
    config.data.source = 'zarr'
  with pytest.raises(DataError, match=r"config.data.source = 'zarr'; expected 'hdf5'"):
    sources.spec_from_config(config, 'train')


def test_a_toolbox_mat_image_is_a_one_image_test_set(tmp_path):
  stored = _stored(n=1)
  image = {  # The toolbox layout: H x W x C on the sensor scale, the PAN H x W.
    'I_GT': stored['gt'][0].transpose(1, 2, 0),
    'I_MS': stored['lms'][0].transpose(1, 2, 0),
    'I_MS_LR': stored['ms'][0].transpose(1, 2, 0),
    'I_PAN': stored['pan'][0, 0],
  }
  scipy.io.savemat(tmp_path / 'rr.mat', image)
  (test_set,) = eval_lib.select_test_sets(_config(), f'rr={tmp_path / "rr.mat"}')
  source = test_set.source
  assert isinstance(source, matfile.MatSource) and len(source) == 1
  assert test_set.protocol == 'reduced' and test_set.shape == (96, 96)
  example, ref = source[0], source.reference(0)
  for role, key in matfile.MAT_KEYS.items():
    want = image[key] if image[key].ndim == 3 else image[key][..., None]
    np.testing.assert_array_equal(ref[role], want)
    assert example[role].dtype == np.float32
    np.testing.assert_array_equal(example[role], want.astype(np.float32) / np.float32(2047))
  test_set.close()
  # Full resolution: no I_GT; a training split must have one.
  del image['I_GT']
  scipy.io.savemat(tmp_path / 'fr.mat', image)
  (test_set,) = eval_lib.select_test_sets(_config(), f'fr={tmp_path / "fr.mat"}')
  assert test_set.protocol == 'full'
  config = _config()
  config.data.train_file = str(tmp_path / 'fr.mat')
  with pytest.raises(DataError, match=r"fr.mat: variable 'I_GT' \(role 'gt'\) is missing"):
    input_pipeline.get_source(config, 'train')
  (tmp_path / 'bad.mat').write_bytes(b'not a mat file')
  with pytest.raises(DataError, match='bad.mat: not a readable MATLAB file'):
    eval_lib.select_test_sets(_config(), f'{tmp_path / "bad.mat"}')


def test_a_training_file_is_opened_once(tmp_path, monkeypatch):
  path = tmp_path / 'train_wv3.h5'
  pancollection.write_h5(path, _stored(n=3, size=32))
  opened = []
  real_open = pancollection.open_h5
  monkeypatch.setattr(pancollection, 'open_h5', lambda p: opened.append(p) or real_open(p))
  config = _config()
  config.data.train_file = str(path)
  source = input_pipeline.get_source(config, 'train')
  for i in range(len(source)):
    assert set(source[i]) == set(source.reference(i)) == {'gt', 'lms', 'ms', 'guide'}
  # Validation, value checks, examples and references share one handle.
  assert [str(p) for p in opened] == [str(path)]
  source.close()


def test_a_scene_is_a_one_image_source_read_by_window(tmp_path):
  stored = _stored(n=1, size=32)
  pan = stored['pan'][0, 0].astype(np.uint16)  # (32, 32)
  ms = stored['ms'][0].transpose(1, 2, 0).astype(np.uint16)  # (8, 8, 8)
  np.save(tmp_path / 'pan.npy', pan)
  np.save(tmp_path / 'ms.npy', ms)
  with rasters.open_scene(
    tmp_path / 'pan.npy', tmp_path / 'ms.npy', scale=4, bands=8, guide_bands=1, max_value=2047
  ) as scene:
    assert isinstance(scene, sources.Source) and len(scene) == 1
    np.testing.assert_array_equal(scene.window('guide', 4, 8, 0, 16), pan[4:8, :16, None])
    np.testing.assert_array_equal(scene.window('ms', 1, 2, 0, 8), ms[1:2])
    whole = scene[0]
    np.testing.assert_array_equal(whole['ms'], ms.astype(np.float32) / np.float32(2047))
    assert whole['guide'].shape == (32, 32, 1) and scene.file.endswith('ms.npy')
  with pytest.raises(DataError, match='the MS has 8 bands; the model takes 4'):
    rasters.open_scene(tmp_path / 'pan.npy', tmp_path / 'ms.npy', scale=4, bands=4, guide_bands=1)
