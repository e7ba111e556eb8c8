"""Tests of `u2net_jax.convert`: safe .pth reading, the name/shape mapping, and the CLI."""

import collections
import io
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
from conftest import REPO, run_script, shared_path
from flax import traverse_util
from torch_layout import flax_to_torch

from u2net_jax import convert, models
from u2net_jax.run import checkpointing, config_utils

# torch.save's legacy (pre-1.6) format starts with this pickled magic number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _wv3_config():
  return config_utils.load_config_file(REPO / 'configs' / 'wv3.py')


class _FakeTorch:
  """Installs stand-in `torch` modules so that plain pickle writes real .pth pickles."""

  def __enter__(self):
    torch = types.ModuleType('torch')
    utils = types.ModuleType('torch._utils')

    def _rebuild_tensor_v2(*args):  # Never called: only its name is pickled.
      raise AssertionError

    _rebuild_tensor_v2.__module__ = 'torch._utils'
    _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for name in ('FloatStorage', 'DoubleStorage', 'LongStorage'):
      cls = type(name, (), {'__module__': 'torch', '__qualname__': name})
      setattr(torch, name, cls)
      storage_types[name] = cls
    torch._utils = utils
    self.saved = {k: sys.modules.get(k) for k in ('torch', 'torch._utils')}
    sys.modules.update({'torch': torch, 'torch._utils': utils})
    self.rebuild, self.storage_types = _rebuild_tensor_v2, storage_types
    return self

  def __exit__(self, *exc):
    for k, v in self.saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _write_pth(path, tensors, legacy=False):
  """Writes `tensors` (name -> np.ndarray) as torch.save(state_dict) would (zip or legacy)."""
  storage_name = {np.float32: 'FloatStorage', np.float64: 'DoubleStorage', np.int64: 'LongStorage'}

  class Storage:
    def __init__(self, key, array):
      self.key, self.array = key, array

  class Tensor:
    def __init__(self, storage, array):
      self.storage, self.array = storage, array

    def __reduce__(self):
      a = self.array
      stride = tuple(s // a.itemsize for s in a.strides)
      return (fake.rebuild, (self.storage, 0, a.shape, stride, False, collections.OrderedDict()))

  with _FakeTorch() as fake:
    storages, state = [], collections.OrderedDict()
    for i, (name, array) in enumerate(tensors.items()):
      array = np.ascontiguousarray(array)
      storage = Storage(str(i), array)
      storages.append(storage)
      state[name] = Tensor(storage, array)

    def persistent_id(obj):
      if isinstance(obj, Storage):
        kind = fake.storage_types[storage_name[obj.array.dtype.type]]
        return ('storage', kind, obj.key, 'cpu', obj.array.size)
      return None

    body = io.BytesIO()
    pickler = pickle.Pickler(body, protocol=2)
    pickler.persistent_id = persistent_id
    pickler.dump(state)
  if legacy:
    with open(path, 'wb') as f:
      for header in (LEGACY_MAGIC, 1001, {'little_endian': True}):
        pickle.dump(header, f, protocol=2)
      f.write(body.getvalue())
      pickle.dump([s.key for s in storages], f, protocol=2)
      for s in storages:
        f.write(np.int64(s.array.size).tobytes())
        f.write(s.array.tobytes())
  else:
    with zipfile.ZipFile(path, 'w') as zf:
      zf.writestr('archive/data.pkl', body.getvalue())
      for s in storages:
        zf.writestr(f'archive/data/{s.key}', s.array.tobytes())


@pytest.mark.parametrize('legacy', [False, True])
def test_reads_zip_and_legacy_formats(tmp_path, legacy):
  rng = np.random.default_rng(0)
  tensors = {
    'a.weight': rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
    'a.bias': rng.normal(size=(4,)).astype(np.float32),
    'steps': np.arange(5, dtype=np.int64),
    'transposed': rng.normal(size=(3, 5)).T.astype(np.float64),  # Non-contiguous strides.
  }
  path = tmp_path / 'w.pth'
  _write_pth(path, tensors, legacy=legacy)
  loaded = convert.load_torch_state_dict(path)
  assert list(loaded) == list(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(loaded[k], v)
    assert loaded[k].dtype == v.dtype


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / 'pwned'

  class Exploit:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({'w': Exploit()}, protocol=2))
  with pytest.raises(convert.UnsafeCheckpointError, match=r'refusing to load global .*system'):
    convert.load_torch_state_dict(path)
  assert not marker.exists()

  legacy = tmp_path / 'evil_legacy.pth'
  legacy.write_bytes(pickle.dumps(Exploit(), protocol=2))
  with pytest.raises(convert.UnsafeCheckpointError):
    convert.load_torch_state_dict(legacy)
  assert not marker.exists()


def test_official_checkpoint_tensors_and_unused():
  state_dict = convert.load_torch_state_dict(shared_path('official', 'u2net_wv3_200000_iter.pth'))
  assert len(state_dict) == 135
  assert sum(v.size for v in state_dict.values()) == 642_008
  unused = convert.unused_keys(state_dict)
  assert len(unused) == 20 and all('maxpool_conv' in k or '.up0.' in k for k in unused)
  params = convert.torch_to_flax(state_dict, _wv3_config().model)
  assert models.count_params(params) == 536_248
  # The inverse mapping gives back every used tensor exactly.
  back = flax_to_torch(params)
  assert len(back) == 115
  for k, v in back.items():
    np.testing.assert_array_equal(v, state_dict[k])


def test_shape_mismatch_names_tensor_and_shapes():
  state_dict = convert.load_torch_state_dict(shared_path('official', 'u2net_wv3_200000_iter.pth'))
  qb = config_utils.load_config_file(REPO / 'configs' / 'qb.py')
  with pytest.raises(
    ValueError,
    match=r"'upsample.upsamle.0.weight' has shape \(128, 8, 3, 3\); "
    r'the model config expects \(64, 4, 3, 3\)',
  ):
    convert.torch_to_flax(state_dict, qb.model)


def test_missing_and_unexpected_tensors_are_reported():
  cfg = _wv3_config()
  rng = np.random.default_rng(0)
  shapes = convert.param_shapes(cfg.model)
  flat = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
  state_dict = flax_to_torch(traverse_util.unflatten_dict(flat, sep='/'))
  state_dict.pop('to_hrms.2.bias')
  state_dict['extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"missing tensor 'to_hrms.2.bias'.*\n.*'extra.weight'"):
    convert.torch_to_flax(state_dict, cfg.model)


def _cli(*args):
  return run_script('-m', 'u2net_jax.convert', *args)


@pytest.mark.slow
def test_cli_writes_a_workdir_that_restores(tmp_path):
  pth = shared_path('official', 'u2net_wv3_200000_iter.pth')
  workdir = tmp_path / 'official_wv3'
  # A `--config.model.*` override reaches the saved config (absl + config_flags).
  result = _cli(
    f'--checkpoint={pth}',
    '--config=configs/wv3.py',
    f'--workdir={workdir}',
    '--config.model.attention=direct',
  )
  assert result.returncode == 0, result.stderr
  assert '536,248' in result.stdout
  config = config_utils.load_config(workdir)
  assert config.model.spectral_bands == 8 and config.model.attention == 'direct'
  params, step, meta = checkpointing.restore_params(workdir, config.model)
  assert step == 0 and meta['converted_from'].endswith('u2net_wv3_200000_iter.pth')
  expected = convert.torch_to_flax(convert.load_torch_state_dict(pth), config.model)
  np.testing.assert_array_equal(
    params['s2block2']['attention']['se1']['kernel'],
    expected['s2block2']['attention']['se1']['kernel'],
  )


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
  pth = shared_path('official', 'u2net_wv3_200000_iter.pth')
  result = _cli(f'--checkpoint={pth}', '--config=configs/qb.py', f'--workdir={tmp_path / "w"}')
  assert result.returncode != 0
  assert 'error: the checkpoint does not match the model config' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'w').exists()  # Nothing written for a mismatched checkpoint.
