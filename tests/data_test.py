"""Tests of `u2net_jax.data`: readers and their validation (sampled, full and cached value
checks), the one HDF5 writer, Wald's protocol, the preparers and their command lines, the
SYNTHETIC demo data and the TFDS builders."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, load_config, shared_path

from u2net_jax import toolbox
from u2net_jax.data import (
  DataError,
  demo,
  input_pipeline,
  pancollection,
  prepare_pansharpening,
  value_checks,
  wald,
)


@pytest.fixture(autouse=True)
def private_value_cache(monkeypatch, tmp_path_factory) -> Path:
  """Full value checks cache their results here, never in the user's ~/.cache."""
  root = tmp_path_factory.mktemp('xdg-cache')
  monkeypatch.setenv('XDG_CACHE_HOME', str(root))
  return root


def _arrays(n=2, c=8, h=4, scale=2047.0, seed=0):
  rng = np.random.default_rng(seed)
  big = 4 * h
  return {
    'gt': rng.uniform(0.05, 1.0, (n, c, big, big)) * scale,
    'lms': rng.uniform(0.05, 1.0, (n, c, big, big)) * scale,
    'ms': rng.uniform(0.05, 1.0, (n, c, h, h)) * scale,
    'pan': rng.uniform(0.05, 1.0, (n, 1, big, big)) * scale,
  }


def _write(path, arrays):
  with h5py.File(path, 'w') as f:
    for k, v in arrays.items():
      f.create_dataset(k, data=v)
  return path


def _source(path, config=None, require_gt=True, check_values='sample'):
  config = config or load_config('default')
  return pancollection.H5Source(
    path,
    keys=dict(config.data.h5_keys),
    max_value=config.data.max_value,
    spectral_bands=config.model.spectral_bands,
    guide_bands=config.model.guide_bands,
    require_gt=require_gt,
    check_values=check_values,
  )


# ----------------------------------------------------------------------------------------------
# Readers on the real PanCollection-layout samples.


@pytest.mark.parametrize('name', ['wv2_rr_sample.h5', 'wv2_fr_sample.h5'])
def test_reads_the_official_wv2_samples(name):
  path = shared_path('official', name)
  config = load_config('default')
  config.data.test_files = {'sample': str(path)}
  source = input_pipeline.get_source(config, 'sample')
  assert len(source) == 2
  ex = source[1]
  with h5py.File(path, 'r') as f:
    for role, key in (('gt', 'gt'), ('lms', 'lms'), ('ms', 'ms'), ('guide', 'pan')):
      if key not in f:
        assert role not in ex and 'rr' not in name
        continue
      expected = f[key][1].transpose(1, 2, 0) / 2047.0
      assert ex[role].dtype == np.float32 and ex[role].shape == expected.shape
      np.testing.assert_allclose(ex[role], expected, rtol=1e-6, atol=1e-7)
  side = 128 if 'rr' in name else 256
  assert ex['guide'].shape == (side, side, 1) and ex['ms'].shape == (side // 4, side // 4, 8)


def test_training_split_requires_gt():
  path = shared_path('official', 'wv2_fr_sample.h5')
  config = load_config('default')
  config.data.train_file = str(path)
  with pytest.raises(DataError, match="key 'gt' \\(role 'gt'\\) is missing"):
    input_pipeline.get_source(config, 'train')


# ----------------------------------------------------------------------------------------------
# Bad inputs: each names the file, the key, the expected and the found shape or value.


def test_missing_key(tmp_path):
  a = _arrays()
  del a['pan']
  path = _write(tmp_path / 'nokey.h5', a)
  with pytest.raises(DataError, match=r"nokey\.h5: key 'pan' \(role 'guide'\) is missing"):
    _source(path)


def test_wrong_ratio(tmp_path):
  a = _arrays()
  a['pan'] = a['pan'][:, :, :12, :]
  path = _write(tmp_path / 'ratio.h5', a)
  msg = (
    r"ratio\.h5: key 'pan' has shape \(2,1,12,16\); "
    r"expected \(2,1,16,16\) = 4x the 'ms' size \(4,4\)"
  )
  with pytest.raises(DataError, match=msg):
    _source(path)


def test_band_count_mismatch(tmp_path):
  path = _write(tmp_path / 'bands.h5', _arrays(c=4))
  with pytest.raises(DataError, match=r"key 'ms' has shape \(2,4,4,4\); expected \(2,8,4,4\)"):
    _source(path)  # The WV3 config expects 8 bands.


def test_nan(tmp_path):
  a = _arrays()
  a['gt'][1, 3, 5, 7] = np.nan
  path = _write(tmp_path / 'nan.h5', a)
  with pytest.raises(
    DataError, match=r"nan\.h5: key 'gt' holds non-finite values .*\(1, 3, 5, 7\)"
  ):
    _source(path)


def test_empty_file_and_no_examples(tmp_path):
  empty = tmp_path / 'empty.h5'
  empty.write_bytes(b'')
  with pytest.raises(DataError, match=r'empty\.h5: file is empty'):
    _source(empty)
  path = _write(tmp_path / 'zero.h5', _arrays(n=0))
  with pytest.raises(DataError, match=r"zero\.h5: key 'ms' holds no examples"):
    _source(path)


def test_truncated_file(tmp_path):
  path = _write(tmp_path / 'cut.h5', _arrays(n=4, h=8))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match=r'cut\.h5: .*truncated'):
    _source(path)


def test_wrong_sensor_maximum(tmp_path):
  # 11-bit data given to a GF-2 config (maximum 1023).
  path = _write(tmp_path / 'elevenbit.h5', _arrays(c=4))
  with pytest.raises(DataError, match=r"key 'gt' has values up to 20\d\d.*max_value = 1023"):
    _source(path, load_config('gf2'))
  # Data already divided to [0, 1] given to a 2047 config.
  path = _write(tmp_path / 'unit.h5', _arrays(scale=1.0))
  with pytest.raises(DataError, match='already divided to \\[0, 1\\]'):
    _source(path)
  # 11-bit data given to the CAVE config (maximum 1).
  path = _write(tmp_path / 'cave.h5', _arrays(c=31, scale=2047.0))
  cfg = load_config('cave')
  cfg.data.h5_keys = {'gt': 'gt', 'lms': 'lms', 'ms': 'ms', 'guide': 'pan'}
  cfg.model.guide_bands = 1
  with pytest.raises(DataError, match='max_value = 1 '):
    _source(path, cfg)


def test_write_h5_is_atomic(tmp_path):
  path = tmp_path / 'out.h5'
  with pytest.raises(TypeError):
    pancollection.write_h5(path, {'gt': np.zeros((1, 1, 2, 2)), 'bad': object()})
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Value checks: a sample by default, every value on demand (cached).


def test_sample_indices_spread_over_the_file():
  assert value_checks.sample_indices(1, 10).tolist() == [0]
  rows = value_checks.sample_indices(1000, 100)
  assert len(rows) == value_checks.SAMPLE_EXAMPLES and rows[0] == 0 and rows[-1] == 999
  gaps = np.diff(rows)
  assert gaps.min() >= 66 and gaps.max() <= 67  # Evenly spread.
  np.testing.assert_array_equal(rows, value_checks.sample_indices(1000, 100))
  # Examples as big as the whole sample budget: only the first and the last.
  assert value_checks.sample_indices(1000, value_checks.SAMPLE_ELEMENTS).tolist() == [0, 999]


def test_sampled_check_by_default_full_check_on_demand(tmp_path, private_value_cache):
  a = _arrays(n=40)
  a['gt'][7, 0, 1, 2] = np.nan
  assert 7 not in value_checks.sample_indices(40, a['gt'][0].size)  # Not sampled.
  path = _write(tmp_path / 'nan7.h5', a)
  assert len(_source(path)) == 40
  assert len(_source(path, check_values='off')) == 40
  with pytest.raises(
    DataError, match=r"nan7\.h5: key 'gt' holds non-finite values .*\(7, 0, 1, 2\)"
  ):
    _source(path, check_values='full')
  assert value_checks.value_check_cache_path().parent.parent == private_value_cache
  assert value_checks.value_check_cache_path().exists()
  # A sampled check uses the cached full result of the unchanged file.
  with pytest.raises(DataError, match=r'\(7, 0, 1, 2\)'):
    _source(path)
  with pytest.raises(DataError, match=r"check_values = 'fast'"):
    _source(path, check_values='fast')


def test_full_check_is_cached_by_path_size_and_mtime(tmp_path):
  path = _write(tmp_path / 'clean.h5', _arrays(n=6))
  _source(path, check_values='full')
  st = path.stat()
  with h5py.File(path, 'r+') as f:
    f['ms'][3, 0, 0, 0] = np.inf
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # Same path, size and mtime_ns.
  assert path.stat().st_size == st.st_size
  _source(path, check_values='full')  # The cached result: the file is not read again.
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
  with pytest.raises(DataError, match=r"key 'ms' holds non-finite values .*\(3, 0, 0, 0\)"):
    _source(path, check_values='full')


def test_full_check_without_a_writable_cache_and_with_progress(tmp_path, monkeypatch, caplog):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  monkeypatch.setenv('XDG_CACHE_HOME', str(blocker))  # The cache folder cannot be made.
  monkeypatch.setattr(value_checks, 'PROGRESS_SECONDS', 0.0)
  path = _write(tmp_path / 'ok.h5', _arrays(n=3))
  with caplog.at_level(logging.INFO):
    assert len(_source(path, check_values='full')) == 3
  assert blocker.read_text() == ''
  assert 'checking the values of' in caplog.text and 'cache not written' in caplog.text


# ----------------------------------------------------------------------------------------------
# The one HDF5 writer.


def test_h5_writer_streams_rows_and_renames_when_complete(tmp_path):
  path = tmp_path / 'out.h5'
  shapes = {'gt': (3, 2, 4, 4), 'ms': (3, 2, 1, 1)}
  with pancollection.H5Writer(path, shapes, np.float32, attrs={'sensor': 'WV3'}) as w:
    for i in (2, 0, 1):  # Rows in any order.
      w.put(i, {'gt': np.full((2, 4, 4), i, np.float64), 'ms': np.full((2, 1, 1), i)})
    assert not path.exists() and len(list(tmp_path.iterdir())) == 1  # Only the temporary.
  assert [p.name for p in tmp_path.iterdir()] == ['out.h5']
  with h5py.File(path, 'r') as f:
    assert f['gt'].dtype == np.float32 and f['gt'].chunks == (1, 2, 4, 4)
    assert f['gt'][:, 1, 3, 3].tolist() == [0, 1, 2] and f['ms'][:, 0, 0, 0].tolist() == [0, 1, 2]
    assert f.attrs['sensor'] == 'WV3'
  with pancollection.H5Writer(path, {'gt': (3, 1, 2, 2)}, np.float64) as w:
    w.append({'gt': np.zeros((2, 1, 2, 2))})
    w.append({'gt': np.ones((1, 1, 2, 2))})
  with h5py.File(path, 'r') as f:
    assert f['gt'][:, 0, 0, 0].tolist() == [0, 0, 1]


def test_h5_writer_leaves_nothing_on_failure_or_missing_rows(tmp_path):
  path = tmp_path / 'out.h5'
  shapes = {'gt': (2, 1, 2, 2)}
  with pytest.raises(RuntimeError, match='interrupted'):
    with pancollection.H5Writer(path, shapes) as w:
      w.put(0, {'gt': np.ones((1, 2, 2))})
      raise RuntimeError('interrupted')
  assert not list(tmp_path.iterdir())
  with pytest.raises(ValueError, match=r"1 of 2 rows of dataset 'gt' were never written"):
    with pancollection.H5Writer(path, shapes) as w:
      w.put(0, {'gt': np.ones((1, 2, 2))})
  assert not list(tmp_path.iterdir())
  with pytest.raises(ValueError, match=r"dataset 'gt' row has shape \(2, 2\)"):
    with pancollection.H5Writer(path, shapes) as w:
      w.put(0, {'gt': np.ones((2, 2))})
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Wald's protocol for users' scenes.


def _check_prepared(written, bands):
  config = load_config('default')
  config.model.spectral_bands = bands
  for kind, path in written.items():
    source = _source(path, config, require_gt=kind != 'full')
    assert len(source) >= 1
    with h5py.File(path, 'r') as f:
      assert ('gt' in f) == (kind != 'full')
      for i in range(f['ms'].shape[0]):
        ms = f['ms'][i].transpose(1, 2, 0)
        lms = f['lms'][i].transpose(1, 2, 0)
        np.testing.assert_allclose(lms, toolbox.interp23tap(ms, ratio=4), rtol=0, atol=1e-9)


def test_prepare_pansharpening_wv3(tmp_path):
  mat = str(shared_path('data', 'zpnn-wv3', 'WV3_example.mat'))
  written = prepare_pansharpening.prepare(
    [mat], [mat], 'WV3', str(tmp_path), patch=16, stride=8, valid_fraction=0.2
  )
  assert set(written) == {'train', 'valid', 'test', 'full'}
  _check_prepared(written, 8)
  with h5py.File(written['test'], 'r') as f:
    assert f['gt'].shape == (1, 8, 32, 32) and f['ms'].shape == (1, 8, 8, 8)
    assert f['pan'].shape == (1, 1, 32, 32)
    import scipy.io

    orig = scipy.io.loadmat(mat)['I_MS_LR'].astype(np.float64)
    np.testing.assert_array_equal(f['gt'][0].transpose(1, 2, 0), orig)  # gt = the original MS.
  with h5py.File(written['train'], 'r') as f, h5py.File(written['valid'], 'r') as g:
    assert f['gt'].shape[0] + g['gt'].shape[0] == 9  # 3 x 3 patches of 16 at stride 8 in 32.
    # The documented split: patches in scene, row-major order, shuffled by default_rng(seed), the
    # first 80% to training, the rest to validation, in that order.
    order = np.random.default_rng(0).permutation(9)
    rows = np.concatenate([f['gt'][:], g['gt'][:]]).transpose(0, 2, 3, 1)
    for row, k in zip(rows, order, strict=True):
      y, x = divmod(int(k), 3)
      np.testing.assert_array_equal(row, orig[8 * y : 8 * y + 16, 8 * x : 8 * x + 16])
    assert g['gt'].shape[0] == 2


@pytest.mark.slow
def test_prepare_pansharpening_wv2_cli(tmp_path):
  mat = str(shared_path('data', 'pnn-wv2-ikonos-geoeye1', 'imgWV2.mat'))
  args = ['--pan', mat, '--ms', mat, '--sensor', 'WV2', '--out', str(tmp_path)]
  assert prepare_pansharpening.main(args + ['--patch', '64', '--stride', '64']) == 0
  written = {
    'train': tmp_path / 'train_wv2.h5',
    'valid': tmp_path / 'valid_wv2.h5',
    'test': tmp_path / 'test_wv2_multiExm1.h5',
    'full': tmp_path / 'test_wv2_OrigScale_multiExm1.h5',
  }
  _check_prepared(written, 8)
  with h5py.File(written['full'], 'r') as f:
    assert f['pan'].shape == (1, 1, 1280, 1280) and f['ms'].shape == (1, 8, 320, 320)


def test_prepare_pansharpening_refuses_a_wrong_ratio(tmp_path):
  wv3 = str(shared_path('data', 'zpnn-wv3', 'WV3_example.mat'))
  pan = np.zeros((100, 128)) + 500.0
  np.save(tmp_path / 'pan.npy', pan)
  out = tmp_path / 'out'
  with pytest.raises(DataError, match=r'PAN is \(100, 128\); expected \(128,128\) = 4x the MS'):
    prepare_pansharpening.prepare([str(tmp_path / 'pan.npy')], [wv3], 'WV3', str(out))
  assert (
    prepare_pansharpening.main(
      ['--pan', str(tmp_path / 'pan.npy'), '--ms', wv3, '--sensor', 'WV3', '--out', str(out)]
    )
    == 2
  )
  assert not out.exists()
  # Wrong sensor maximum: 11-bit WV3 data declared as GF-2 (10-bit) is refused too.
  with pytest.raises(DataError):
    prepare_pansharpening.prepare([wv3], [wv3], 'GF2', str(out))
  assert not out.exists()


def test_prepare_pansharpening_streams_several_pairs(tmp_path):
  mat = str(shared_path('data', 'zpnn-wv3', 'WV3_example.mat'))
  out = tmp_path / 'two'
  pairs = ['--pan', mat, '--pan', mat, '--ms', mat, '--ms', mat]
  args = pairs + ['--sensor', 'WV3', '--out', str(out), '--patch', '16', '--stride', '8']
  assert prepare_pansharpening.main(args + ['--valid-fraction', '0.1']) == 0
  one = prepare_pansharpening.prepare([mat], [mat], 'WV3', str(tmp_path / 'one'), outputs=['test'])
  files = {k: out / f'{k}_wv3.h5' for k in ('train', 'valid')}
  with h5py.File(files['train'], 'r') as tr, h5py.File(files['valid'], 'r') as va:
    assert (tr['gt'].shape[0], va['gt'].shape[0]) == (16, 2)  # 2 x 9 patches, 10% validation.
  with h5py.File(out / 'test_wv3_multiExm1.h5', 'r') as te, h5py.File(one['test'], 'r') as ref:
    assert te['gt'].shape[0] == 2
    for key in ref:
      for i in (0, 1):
        np.testing.assert_array_equal(te[key][i], ref[key][0])


def test_prepare_pansharpening_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
  mat = str(shared_path('data', 'zpnn-wv3', 'WV3_example.mat'))
  reduce = wald.reduce_pansharpening
  calls = []

  def fail_on_the_second_pair(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError('disk on fire')
    return reduce(*args, **kwargs)

  monkeypatch.setattr(wald, 'reduce_pansharpening', fail_on_the_second_pair)
  out = tmp_path / 'out'
  with pytest.raises(RuntimeError, match='disk on fire'):
    prepare_pansharpening.prepare([mat, mat], [mat, mat], 'WV3', str(out), patch=16, stride=8)
  assert calls == [1, 1] and not out.exists()  # Nor any temporary file in it.
  (tmp_path / 'kept').mkdir()
  calls.clear()
  with pytest.raises(RuntimeError, match='disk on fire'):
    prepare_pansharpening.prepare(
      [mat, mat], [mat, mat], 'WV3', str(tmp_path / 'kept'), outputs=['test']
    )
  assert not list((tmp_path / 'kept').iterdir())
  with pytest.raises(DataError, match='hyperspectral'):
    prepare_pansharpening.prepare([mat], [mat], 'CAVE', str(out))


@pytest.mark.slow
@pytest.mark.parametrize(
  'module, flag',
  [
    ('prepare_cave', '--test_scenes'),
    ('prepare_pansharpening', '--pan'),
    ('tfds_builders', '--manual_dir'),
  ],
)
def test_command_lines_have_absl_help(module, flag):
  proc = subprocess.run(
    [sys.executable, '-m', f'u2net_jax.data.{module}', '--help'],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert flag in proc.stdout and f'u2net_jax/data/{module}.py' in proc.stdout, proc.stderr[-2000:]


def test_decimation_matches_the_interpolator_grid():
  # interp23tap puts low-resolution sample i at high-resolution pixel 4 i + 2; decimation keeps
  # exactly those pixels, so decimating an interpolated image gives the samples back.
  rng = np.random.default_rng(0)
  ms = rng.uniform(size=(8, 8, 2))
  np.testing.assert_allclose(wald.decimate(toolbox.interp23tap(ms, ratio=4)), ms, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# SYNTHETIC demo data.


@pytest.mark.parametrize('task', ['pansharpening', 'hisr'])
def test_demo_split_is_deterministic_and_consistent(task):
  a = demo.make_split(task, 'train', 5, 32, seed=3)
  b = demo.make_split(task, 'train', 5, 32, seed=3)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c, g = (8, 1) if task == 'pansharpening' else (31, 3)
  assert a['gt'].shape == (5, 32, 32, c) and a['ms'].shape == (5, 8, 8, c)
  assert a['guide'].shape == (5, 32, 32, g) and a['lms'].shape == (5, 32, 32, c)
  assert a['gt'].min() >= 0 and a['gt'].max() <= 1
  np.testing.assert_allclose(a['lms'][2], toolbox.interp23tap(a['ms'][2], ratio=4), atol=1e-5)
  # The guide is the spectral response of gt, so it carries the bands' high frequencies.
  srf = demo.spectral_response(task, demo.wavelengths(task, c))
  np.testing.assert_allclose(a['guide'], a['gt'] @ srf, atol=1e-5)
  assert not np.array_equal(a['gt'], demo.make_split(task, 'valid', 5, 32, seed=3)['gt'])
  assert demo.metadata(task)['synthetic'] is True


# ----------------------------------------------------------------------------------------------
# CAVE preparation on a small CAVE-layout folder of real Hyperion bands.


def _cave_folder(root: Path) -> tuple[Path, dict]:
  """Four 64 x 64 'scenes' of 31 real Hyperion bands, saved as CAVE's 16-bit PNGs."""
  import scipy.io
  from PIL import Image

  cube = scipy.io.loadmat(shared_path('data', 'hysure-paris-eo1', 'paris_data_hs_ms.mat'))['HSim']
  cube = cube[..., :31] / cube[..., :31].max()
  scenes = {}
  for i, name in enumerate(['alpha', 'bravo', 'charlie', 'delta']):
    y, x = (i // 2) * 8, (i % 2) * 8
    scene = np.round(cube[y : y + 64, x : x + 64] * 65535).astype(np.uint16)
    if i % 2:
      scene = scene[::-1]
    folder = root / f'{name}_ms' / f'{name}_ms'  # CAVE nests a folder of the same name.
    folder.mkdir(parents=True)
    for b in range(31):
      Image.fromarray(scene[..., b]).save(folder / f'{name}_ms_{b + 1:02d}.png')
    scenes[name] = scene.astype(np.float64) / 65535
  return root, scenes


def test_prepare_cave_shapes_ranges_split_and_rgb(tmp_path):
  from u2net_jax.data import prepare_cave

  srf_path = shared_path('data', 'mhfnet-nikon-d700-srf', 'response_coefficient.mat')
  src, scenes = _cave_folder(tmp_path / 'raw')
  out = tmp_path / 'cave'
  args = ['--src', str(src), '--srf', str(srf_path), '--out', str(out), '--test-scenes', 'delta']
  assert prepare_cave.main(args + ['--patch', '32', '--stride', '16', '--grid', '2']) == 0
  srf = prepare_cave.load_srf(srf_path)
  files = {k: out / f'{k}_cave.h5' for k in ('train', 'valid', 'test')}
  with h5py.File(files['train'], 'r') as tr, h5py.File(files['valid'], 'r') as va:
    # 3 training scenes x 2 x 2 patches = 12, 20% (2) for validation.
    assert tr['GT'].shape == (10, 31, 32, 32) and va['GT'].shape == (2, 31, 32, 32)
    assert tr['LRHSI'].shape == (10, 31, 8, 8) and tr['RGB'].shape == (10, 3, 32, 32)
    assert tr.attrs['train_scenes'] == 'alpha,bravo,charlie' and tr.attrs['test_scenes'] == 'delta'
    gt = tr['GT'][:].transpose(0, 2, 3, 1).astype(np.float64)
    np.testing.assert_allclose(tr['RGB'][:].transpose(0, 2, 3, 1), gt @ srf, atol=1e-6)
    lr = tr['LRHSI'][3].transpose(1, 2, 0)
    np.testing.assert_allclose(
      tr['HSI_up'][3].transpose(1, 2, 0), toolbox.interp23tap(lr, ratio=4), atol=1e-6
    )
    # Every patch is a crop of a training scene (the grid is centred: offsets 8 and 24).
    crops = [
      s[y : y + 32, x : x + 32]
      for n, s in scenes.items()
      if n != 'delta'
      for y in (8, 24)
      for x in (8, 24)
    ]
    for patch in list(gt) + list(va['GT'][:].transpose(0, 2, 3, 1)):
      assert min(np.abs(patch - c).max() for c in crops) < 1e-6
  with h5py.File(files['test'], 'r') as te:
    assert te['GT'].shape == (1, 31, 64, 64) and te['LRHSI'].shape == (1, 31, 16, 16)
    gt = te['GT'][0].transpose(1, 2, 0)
    np.testing.assert_allclose(gt, scenes['delta'], atol=1e-6)
    assert 0 <= gt.min() and gt.max() <= 1
    np.testing.assert_allclose(te['RGB'][0].transpose(1, 2, 0), gt @ srf, atol=1e-6)
    expected = wald.gaussian_reduce(scenes['delta'], 4, kernel_size=3, sigma=0.5)
    np.testing.assert_allclose(te['LRHSI'][0].transpose(1, 2, 0), expected, atol=1e-6)
  # The reader accepts them with the CAVE config.
  config = load_config('cave')
  config.data.train_file = str(files['train'])
  config.data.test_files = {'cave_test': str(files['test'])}
  assert input_pipeline.get_source(config, 'train')[0]['guide'].shape == (32, 32, 3)
  assert len(input_pipeline.get_source(config, 'cave_test')) == 1


def test_prepare_cave_refuses_bad_input(tmp_path):
  from u2net_jax.data import prepare_cave

  srf_path = shared_path('data', 'mhfnet-nikon-d700-srf', 'response_coefficient.mat')
  src, _ = _cave_folder(tmp_path / 'raw')
  next((src / 'bravo_ms' / 'bravo_ms').glob('*_07.png')).unlink()
  out = tmp_path / 'out'
  with pytest.raises(DataError, match=r'bravo_ms: found 30 PNG bands; expected 31'):
    prepare_cave.prepare(
      str(src), str(srf_path), str(out), test_scenes=['delta'], patch=32, stride=16, grid=2
    )
  assert not out.exists()
  np.save(tmp_path / 'srf.npy', np.ones((30, 3)))
  with pytest.raises(DataError, match=r'SRF has shape \(30, 3\); expected \(31, c\)'):
    prepare_cave.load_srf(tmp_path / 'srf.npy')
  np.savetxt(tmp_path / 'srf.csv', np.full((31, 3), 1 / 31), delimiter=',')
  assert prepare_cave.load_srf(tmp_path / 'srf.csv').shape == (31, 3)


# ----------------------------------------------------------------------------------------------
# TFDS builders (ArrayRecord), built in temporary folders and read back by index.


def _tfds_config(name, data_dir, base='default'):
  config = load_config(base)
  config.data.source = 'tfds'
  config.data.tfds_name = name
  config.data.tfds_data_dir = str(data_dir)
  return config


def test_tfds_demo_builds_and_reads_back(tmp_path):
  from u2net_jax.data import tfds_builders

  cfg = tfds_builders.DemoConfig(
    name='ci', size=16, test_size=32, num_train=6, num_valid=2, num_test=2
  )
  tfds_builders.U2netDemo(
    config=cfg, data_dir=str(tmp_path), file_format='array_record'
  ).download_and_prepare()
  config = _tfds_config('u2net_demo/ci', tmp_path)
  config.data.test_files = {'demo_test': ''}
  train = input_pipeline.get_source(config, 'train')
  expected = demo.make_split('pansharpening', 'train', 6, 16, 1)
  assert len(train) == 6
  for i in (0, 5):
    for role, x in train[i].items():
      np.testing.assert_allclose(x, expected[role][i], rtol=1e-6, atol=1e-7)
  assert len(input_pipeline.get_source(config, 'valid')) == 2
  assert input_pipeline.get_source(config, 'demo_test')[1]['gt'].shape == (32, 32, 8)
  config.data.max_value = 1023.0
  with pytest.raises(DataError, match='wrong sensor maximum'):
    input_pipeline.get_source(config, 'train')
  with pytest.raises(DataError, match='not built'):
    input_pipeline.get_source(_tfds_config('u2net_demo/hisr', tmp_path / 'none'), 'train')


def test_tfds_pan_collection_from_prepared_files(tmp_path):
  from u2net_jax.data import tfds_builders

  mat = str(shared_path('data', 'zpnn-wv3', 'WV3_example.mat'))
  manual = tmp_path / 'manual' / 'nested'
  written = prepare_pansharpening.prepare([mat], [mat], 'WV3', str(manual), patch=16, stride=8)
  builder = tfds_builders.PanCollection(
    config='wv3', data_dir=str(tmp_path / 'tfds'), file_format='array_record'
  )
  builder.download_and_prepare(
    download_config=tfds_builders.tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual'))
  )
  config = _tfds_config('pan_collection/wv3', tmp_path / 'tfds')
  config.data.test_files = {'wv3_reduced': '', 'wv3_full': ''}
  for split, kind in (('train', 'train'), ('wv3_reduced', 'test'), ('wv3_full', 'full')):
    got = input_pipeline.get_source(config, split)
    ref = _source(written[kind], require_gt=kind != 'full')
    assert len(got) == len(ref)
    for role, x in ref[len(ref) - 1].items():
      np.testing.assert_allclose(got[len(ref) - 1][role], x, rtol=1e-6)
    assert ('gt' in got[0]) == (kind != 'full')


def test_tfds_cave_from_raw_scenes(tmp_path):
  import shutil

  from u2net_jax.data import tfds_builders

  srf = shared_path('data', 'mhfnet-nikon-d700-srf', 'response_coefficient.mat')
  manual, scenes = _cave_folder(tmp_path / 'manual')
  shutil.copy(srf, manual / 'response_coefficient.mat')  # Into the temporary manual_dir only.
  cfg = tfds_builders.CaveConfig(name='ci', patch=32, stride=16, grid=2, test_scenes=('delta',))
  builder = tfds_builders.Cave(
    config=cfg, data_dir=str(tmp_path / 'tfds'), file_format='array_record'
  )
  builder.download_and_prepare(
    download_config=tfds_builders.tfds.download.DownloadConfig(manual_dir=str(manual))
  )
  config = _tfds_config('cave/ci', tmp_path / 'tfds', base='cave')
  assert len(input_pipeline.get_source(config, 'train')) == 10
  assert len(input_pipeline.get_source(config, 'valid')) == 2
  test = input_pipeline.get_source(config, 'cave_test')[0]
  np.testing.assert_allclose(test['gt'], scenes['delta'], atol=1e-6)
  assert test['guide'].shape == (64, 64, 3) and test['ms'].shape == (16, 16, 31)


def test_prepare_pansharpening_reads_npy_and_matlab_v73(tmp_path):
  import scipy.io

  data = scipy.io.loadmat(shared_path('data', 'zpnn-wv3', 'WV3_example.mat'))
  np.save(tmp_path / 'ms.npy', data['I_MS_LR'])
  with h5py.File(tmp_path / 'pan.mat', 'w') as f:  # v7.3 files are HDF5, stored column-major.
    f.create_dataset('I_PAN', data=data['I_PAN'].T)
  written = prepare_pansharpening.prepare(
    [str(tmp_path / 'pan.mat')],
    [str(tmp_path / 'ms.npy')],
    'WV3',
    str(tmp_path / 'out'),
    outputs=('full',),
  )
  with h5py.File(written['full'], 'r') as f:
    np.testing.assert_array_equal(f['pan'][0, 0], data['I_PAN'])
    np.testing.assert_array_equal(f['ms'][0].transpose(1, 2, 0), data['I_MS_LR'])


def test_prepare_harvard(tmp_path):
  import scipy.io

  from u2net_jax.data import prepare_cave

  cube = scipy.io.loadmat(shared_path('data', 'hysure-paris-eo1', 'paris_data_hs_ms.mat'))['HSim']
  src = tmp_path / 'harvard'
  src.mkdir()
  for i, name in enumerate(['imga1', 'imgb2', 'imgc3']):
    scipy.io.savemat(src / f'{name}.mat', {'ref': cube[i : i + 70, :70, 40:71] * 3.0})
  srf = shared_path('data', 'mhfnet-nikon-d700-srf', 'response_coefficient.mat')
  paths = prepare_cave.prepare(
    str(src),
    str(srf),
    str(tmp_path / 'out'),
    fmt='harvard',
    test_scenes=['imgc3'],
    crop=64,
    patch=32,
    stride=16,
    grid=None,
  )
  with h5py.File(paths['test'], 'r') as f:
    gt = f['GT'][0].transpose(1, 2, 0)
    assert gt.shape == (64, 64, 31) and abs(gt.max() - 1) < 1e-6  # Divided by its maximum.
  with h5py.File(paths['train'], 'r') as f, h5py.File(paths['valid'], 'r') as g:
    assert f['GT'].shape[0] + g['GT'].shape[0] == 2 * 9  # 3 x 3 positions per training scene.
