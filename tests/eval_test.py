"""Tests of `evaluate.py` / `infer.eval_lib`: the protocols, the test-set sources, the files
and tables an evaluation writes, and its errors.

The acceptance cases run the released WV3 weights on the WV2 samples of `../shared/official`
(skipped without them) and a tiny training run evaluated through the command line; the rest use a
tiny model with random weights on synthetic HDF5 files. The tile geometry and the `Fuser` are
tested in `tiling_test.py`, the writers in `reporting_test.py`.
"""

import csv
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.io
from conftest import REPO, shared_path
from PIL import Image
from tiling_test import TINY_MODEL, TINY_TILE, random_params

from u2net_jax import convert, metrics, models
from u2net_jax.data import DataError, input_pipeline, pancollection, sources
from u2net_jax.infer import eval_lib, reporting
from u2net_jax.io import fileio
from u2net_jax.run import checkpointing, config_utils, train_lib


def _config(task='pansharpening', **model):
  config = config_utils.load_config_file(
    REPO / 'configs' / ('cave.py' if task == 'hisr' else 'wv3.py')
  )
  with config.unlocked():
    config.model.update(dict(TINY_MODEL, **model))
    config.eval.tile_batch = 4
    config.eval.tile_size = TINY_TILE
  return config


def _make_workdir(path, config, seed=0):
  params = random_params(models.create_model(config.model), seed)
  config_utils.save_config(config, path)
  checkpointing.save_params(path, params, meta={'test': True})
  return path


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  return _make_workdir(tmp_path_factory.mktemp('tiny'), _config())


def _write_pansharpening_h5(path, n=2, size=96, bands=8, gt=True, sensor=None, seed=0):
  """A PanCollection-layout file (N x C x H x W, 0..2047) with smooth random content."""
  rng = np.random.default_rng(seed)
  low = rng.uniform(200, 1800, (n, bands, size // 16, size // 16))
  ref = np.kron(low, np.ones((1, 1, 16, 16))) + rng.uniform(-150, 150, (n, bands, size, size))
  ref = np.round(np.clip(ref, 0, 2047))
  ms = ref.reshape(n, bands, size // 4, 4, size // 4, 4).mean(axis=(3, 5))
  arrays = {
    'lms': np.kron(ms, np.ones((1, 1, 4, 4))),
    'ms': ms,
    'pan': ref.mean(axis=1, keepdims=True),
  }
  if gt:
    arrays['gt'] = ref
  pancollection.write_h5(path, arrays, attrs={'sensor': sensor} if sensor else None)
  return path


def _outputs_agree(out_dir, source_file=None, roles=None, sensor='WV3', protocol='reduced'):
  """Checks that table.txt, metrics.json, per_image.csv, the .mat files and PNGs agree.

  The per-image metrics are recomputed from the saved `.mat` files and the reference (the HDF5
  file when given, else the `roles` arrays on the sensor scale).
  """
  result = json.loads((out_dir / 'metrics.json').read_text())
  assert result['protocol'] == protocol
  n, (h, w) = result['num_images'], result['image_size']
  rows = result['methods']
  assert set(rows) == {'U2Net', 'EXP'}
  # CSV == JSON per image.
  with open(out_dir / 'per_image.csv') as f:
    lines = list(csv.DictReader(f))
  assert len(lines) == 2 * n
  for line in lines:
    expected = rows[line['method']]['per_image'][int(line['image'])]
    assert {k: float(v) for k, v in line.items() if k not in ('image', 'method')} == expected
  # Means and stds == aggregate of the per-image values.
  for method in rows.values():
    agg = metrics.aggregate(method['per_image'])
    assert {k: v[0] for k, v in agg.items()} == method['mean']
    assert {k: v[1] for k, v in agg.items()} == method['std']
  # The table prints those means and stds.
  table = (out_dir / 'table.txt').read_text()
  for name, method in rows.items():
    line = next(t for t in table.splitlines() if t.startswith(name + ' '))
    cells = re.findall(r'(-?[\d.]+)±([\d.]+)', line)
    assert len(cells) == len(method['mean'])
    for (mean, std), key in zip(cells, method['mean'], strict=True):
      assert float(mean) == pytest.approx(method['mean'][key], abs=6e-5)
      assert float(std) == pytest.approx(method['std'][key], abs=6e-5)
  # The .mat files give back the per-image metrics; the PNGs have the image size.
  for k in range(n):
    sr = scipy.io.loadmat(out_dir / f'output_mulExm_{k}.mat')['sr']
    assert sr.shape == (h, w, result['bands'])
    if source_file is not None:
      with h5py.File(source_file) as f:
        ref = {r: f[r][k].transpose(1, 2, 0).astype(np.float64) for r in f}
    else:
      ref = {r: v[k] for r, v in roles.items()}
    if protocol == 'reduced':
      recomputed = metrics.reduced_resolution_metrics(ref['gt'], sr, result['max_value'])
    elif protocol == 'full':
      recomputed = metrics.full_resolution_metrics(sr, ref['lms'], ref['pan'][..., 0], sensor)
    else:
      recomputed = metrics.hisr_metrics(ref['GT'], sr)
    assert recomputed == pytest.approx(rows['U2Net']['per_image'][k], rel=1e-12, abs=1e-14)
    names = ['lms', 'fused', 'guide'] + (['gt', 'error'] if protocol != 'full' else [])
    for name in names:
      with Image.open(out_dir / f'preview_{k}_{name}.png') as im:
        assert im.size == (w, h) and im.mode == 'RGB'
    with Image.open(out_dir / f'preview_{k}.png') as im:  # Titled, enlarged to >= 128 px.
      assert im.size[1] > max(h, reporting.PANEL_MIN_HEIGHT) and im.mode == 'RGB'
  assert not [p for p in out_dir.parent.iterdir() if p.name.startswith('.')]
  return result


# ---------------------------------------------------------------------------------------------
# Test sets.


def test_parse_test_files():
  assert eval_lib.parse_test_files('a=x.h5, b=y.h5,c') == {'a': 'x.h5', 'b': 'y.h5', 'c': ''}
  assert eval_lib.parse_test_files(['a=x.h5']) == {'a': 'x.h5'}
  # Plain paths, as --help suggests: named by the file stem.
  assert eval_lib.parse_test_files('data/a.h5,/x/test_wv2.hdf5,c=d/c.h5,tiny_test') == {
    'a': 'data/a.h5',
    'test_wv2': '/x/test_wv2.hdf5',
    'c': 'd/c.h5',
    'tiny_test': '',
  }
  # A clash names both items and the fix.
  with pytest.raises(ValueError, match=r"'a=x.h5' and 'a=y.h5' are both named 'a'.*name=path"):
    eval_lib.parse_test_files('a=x.h5,a=y.h5')
  with pytest.raises(
    ValueError, match=r'eval/test.*--test_files=test_1=r/test.h5,test_2=f/test.h5'
  ):
    eval_lib.parse_test_files('r/test.h5,f/test.h5')
  with pytest.raises(ValueError, match='empty path'):
    eval_lib.parse_test_files('a=')


@pytest.mark.slow
def test_cli_plain_paths_write_eval_folders_named_by_stem(tiny_workdir, tmp_path):
  # The case: `evaluate.py --workdir W --test_files a.h5,b.h5` writes eval/a and eval/b,
  # and a healthy run prints no WARNING (library chatter is off unless -v 1).
  a = _write_pansharpening_h5(tmp_path / 'a.h5', n=1, size=96, sensor='WV3')
  b = _write_pansharpening_h5(tmp_path / 'b.h5', n=1, size=64, gt=False, seed=1)
  run = subprocess.run(
    [
      sys.executable,
      'evaluate.py',
      f'--workdir={tiny_workdir}',
      f'--test_files={a},{b}',
      f'--output_dir={tmp_path / "eval"}',
      '--nosave_images',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(p.name for p in (tmp_path / 'eval').iterdir()) == ['a', 'b']
  assert json.loads((tmp_path / 'eval' / 'a' / 'metrics.json').read_text())['protocol'] == 'reduced'
  output = run.stdout + run.stderr
  assert output.count('WARNING') == 0 and not re.search(r'^W\d{4} ', output, re.M), output
  assert 'orbax' not in output and 'read only' not in output
  # -v 1 brings the library chatter back.
  verbose = subprocess.run(
    [
      sys.executable,
      'evaluate.py',
      f'--workdir={tiny_workdir}',
      f'--test_files={a}',
      f'--output_dir={tmp_path / "eval_v"}',
      '--nosave_images',
      '-v',
      '1',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert 'Given directory is read only' in verbose.stderr


def test_hdf5_source_reads_the_file_values_through_one_handle(tmp_path, monkeypatch):
  config = _config()
  path = _write_pansharpening_h5(tmp_path / 'rr.h5', n=2, size=96, sensor='WV3')
  opened = []
  real_open = pancollection.open_h5
  monkeypatch.setattr(pancollection, 'open_h5', lambda p: opened.append(p) or real_open(p))
  (test_set,) = eval_lib.select_test_sets(config, f'rr={path}')
  source = test_set.source
  assert isinstance(source, sources.Source) and source.sensor == 'WV3'
  assert len(source) == 2 and source.file == str(path)
  with h5py.File(path) as f:
    stored = {k: f[k][()] for k in f}
  for k, example in enumerate(source):
    ref = source.reference(k, example)
    assert set(ref) == {'gt', 'lms', 'ms', 'guide'}
    for role, key in (('gt', 'gt'), ('lms', 'lms'), ('ms', 'ms'), ('guide', 'pan')):
      assert ref[role].dtype == np.float64
      np.testing.assert_array_equal(ref[role], stored[key][k].transpose(1, 2, 0))
      np.testing.assert_array_equal(
        example[role], stored[key][k].transpose(1, 2, 0).astype(np.float32) / np.float32(2047)
      )
  # The file is opened once: validation, examples and references share one handle.
  assert [str(p) for p in opened] == [str(path)]
  test_set.close()


def test_demo_source_references_are_on_the_sensor_scale():
  config = config_utils.load_config_file(REPO / 'configs' / 'tiny.py')
  with config.unlocked():
    config.data.demo_test_size = 96  # A 21-px crop on each side must leave one 32-px block.
  (test_set,) = eval_lib.select_test_sets(config)
  source = test_set.source
  assert isinstance(source, sources.ArraySource) and source.sensor is None
  assert test_set.file == 'demo' and test_set.protocol == 'reduced'
  example = source.example(1)
  ref = source.reference(1, example)
  for role, x in example.items():
    assert ref[role].dtype == np.float64
    np.testing.assert_array_equal(ref[role], x.astype(np.float64) * 2047.0)
  test_set.close()


def test_the_checkpoint_step_is_selected_once(tiny_workdir, tmp_path, monkeypatch):
  fr = _write_pansharpening_h5(tmp_path / 'fr.h5', n=1, size=32, gt=False)
  calls = []
  real = checkpointing.select_step
  monkeypatch.setattr(
    checkpointing, 'select_step', lambda *a, **k: calls.append(a) or real(*a, **k)
  )
  results = eval_lib.evaluate(
    None,
    tiny_workdir,
    test_files=f'fr={fr}',
    output_dir=tmp_path / 'out',
    save_images=False,
    verbose=False,
  )
  assert len(calls) == 1 and results['fr']['step'] == 0
  assert sorted(p.name for p in (tmp_path / 'out' / 'fr').iterdir()) == [
    'metrics.json',
    'per_image.csv',
    'table.txt',
  ]


# ---------------------------------------------------------------------------------------------
# End to end on a tiny model: the files agree with each other.


@pytest.mark.slow
def test_evaluate_writes_agreeing_files(tiny_workdir, tmp_path, capsys):
  rr = _write_pansharpening_h5(tmp_path / 'rr.h5', size=96, sensor='WV3')
  fr = _write_pansharpening_h5(tmp_path / 'fr.h5', size=64, gt=False, seed=1)
  results = eval_lib.evaluate(
    None, tiny_workdir, test_files=f'rr={rr},fr={fr}', output_dir=tmp_path / 'out'
  )
  printed = capsys.readouterr().out
  for name, protocol, file in (('rr', 'reduced', rr), ('fr', 'full', fr)):
    out_dir = tmp_path / 'out' / name
    result = _outputs_agree(out_dir, file, protocol=protocol)
    assert results[name]['methods'] == result['methods']
    assert (out_dir / 'table.txt').read_text() in printed
    assert result['mode'] == 'tiled' and result['step'] == 0 and result['sensor'] == 'WV3'
  # The EXP row is the upsampled MS.
  assert results['fr']['methods']['EXP']['mean']['D_lambda'] == 0.0
  assert 'Q8' in results['rr']['table'] and 'HQNR' in results['fr']['table']


@pytest.mark.slow
def test_evaluate_hisr_whole_mode(tmp_path):
  config = _config('hisr', spectral_bands=31, guide_bands=3)
  workdir = _make_workdir(tmp_path / 'wd', config)
  rng = np.random.default_rng(2)
  gt = rng.uniform(0.05, 0.95, (1, 31, 64, 64))
  lr = gt.reshape(1, 31, 16, 4, 16, 4).mean(axis=(3, 5))
  rgb = np.stack([gt[:, i * 10 : i * 10 + 10].mean(axis=1) for i in range(3)], axis=1)
  arrays = {'GT': gt, 'LRHSI': lr, 'HSI_up': np.kron(lr, np.ones((1, 1, 4, 4))), 'RGB': rgb}
  pancollection.write_h5(tmp_path / 'cave.h5', arrays)
  results = eval_lib.evaluate(
    None, workdir, test_files={'cave': str(tmp_path / 'cave.h5')}, mode='whole', verbose=False
  )
  result = _outputs_agree(workdir / 'eval' / 'cave', tmp_path / 'cave.h5', protocol='hisr')
  assert set(result['methods']['U2Net']['mean']) == {'PSNR', 'SSIM', 'SAM', 'ERGAS'}
  assert results['cave']['mode'] == 'whole'


# ---------------------------------------------------------------------------------------------
# Errors.


def test_workdir_without_config_or_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    eval_lib.evaluate(None, tmp_path)
  config_utils.save_config(_config(), tmp_path)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    eval_lib.evaluate(None, tmp_path)
  assert not (tmp_path / 'eval').exists()


def test_test_file_bands_must_match_the_model(tiny_workdir, tmp_path):
  path = _write_pansharpening_h5(tmp_path / 'qb.h5', bands=4)
  with pytest.raises(DataError, match=r'qb\.h5.*spectral_bands'):
    eval_lib.evaluate(None, tiny_workdir, test_files=f'qb={path}', output_dir=tmp_path / 'o')
  assert not (tmp_path / 'o').exists()


def test_sensor_checks(tiny_workdir, tmp_path):
  config = config_utils.load_config(tiny_workdir)
  wv2 = _write_pansharpening_h5(tmp_path / 'wv2.h5', sensor='WV2')
  # The file says WV2, the model is WV3: an error that names the --sensor fix...
  with pytest.raises(DataError, match=r"sensor attribute is 'WV2'.*--sensor WV2"):
    eval_lib.select_test_sets(config, f'x={wv2}')
  # ... which works (the paper's generalisation test).
  (test_set,) = eval_lib.select_test_sets(config, f'x={wv2}', sensor='WV2')
  assert test_set.sensor == 'WV2' and test_set.protocol == 'reduced'
  # A sensor with another band count or scale than the model.
  with pytest.raises(DataError, match='QB has 4 bands'):
    eval_lib.select_test_sets(config, f'x={wv2}', sensor='QB')
  with pytest.raises(DataError, match='unknown sensor'):
    eval_lib.select_test_sets(config, f'x={wv2}', sensor='Landsat')
  with pytest.raises(DataError, match='unknown test set'):
    eval_lib.select_test_sets(config, 'nope')


def test_unwritable_output_folder(tiny_workdir, tmp_path):
  rr = _write_pansharpening_h5(tmp_path / 'rr.h5')
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  with pytest.raises(fileio.OutputError, match=r'evaluation output folder .*file/eval'):
    eval_lib.evaluate(None, tiny_workdir, test_files=f'rr={rr}', output_dir=blocker / 'eval')


def test_failed_run_leaves_no_half_written_results(tiny_workdir, tmp_path, monkeypatch):
  fr = _write_pansharpening_h5(tmp_path / 'fr.h5', n=3, size=32, gt=False)
  out = tmp_path / 'out'
  (out / 'fr').mkdir(parents=True)
  (out / 'fr' / 'metrics.json').write_text('{"previous": true}')
  calls = []
  real = eval_lib.image_metrics

  def failing(*args):
    calls.append(1)
    if len(calls) > 3:  # The second image's baseline: files of the first image are written.
      raise RuntimeError('simulated failure')
    return real(*args)

  monkeypatch.setattr(eval_lib, 'image_metrics', failing)
  with pytest.raises(RuntimeError, match='simulated'):
    eval_lib.evaluate(None, tiny_workdir, test_files=f'fr={fr}', output_dir=out, verbose=False)
  assert sorted(p.name for p in out.iterdir()) == ['fr']  # No temporary folders left.
  assert sorted(p.name for p in (out / 'fr').iterdir()) == ['metrics.json']  # Untouched.
  assert json.loads((out / 'fr' / 'metrics.json').read_text()) == {'previous': True}


@pytest.mark.slow
def test_cli_reports_errors_without_traceback(tmp_path):
  result = subprocess.run(
    [sys.executable, 'evaluate.py', f'--workdir={tmp_path / "none"}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert result.returncode == 1
  assert 'error:' in result.stderr and 'config.json' in result.stderr
  assert 'Traceback' not in result.stderr


# ---------------------------------------------------------------------------------------------
# Acceptance: the official weights and test.py outputs, and a demo training run.


@pytest.fixture(scope='module')
def official_workdir(tmp_path_factory):
  checkpoint = shared_path('official', 'u2net_wv3_200000_iter.pth')
  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
  workdir = tmp_path_factory.mktemp('official_wv3')
  convert.convert_to_workdir(checkpoint, config, workdir)
  return workdir


@pytest.mark.slow
def test_official_weights_reproduce_test_py(official_workdir):
  kinds = {'reduced': 'rr', 'full': 'fr'}
  files = {name: shared_path('official', f'wv2_{kind}_sample.h5') for name, kind in kinds.items()}
  refs = {
    name: np.load(shared_path('official', f'official_tiled_wv2_{kind}_sample.npz'))['sr']
    for name, kind in kinds.items()
  }
  # 2 x 9 and 2 x 25 tiles of 72 x 72: batches of 10 waste 2 tiles.
  results = eval_lib.evaluate(
    None, official_workdir, test_files=files, sensor='WV2', tile_batch=10, verbose=False
  )
  for name, file in files.items():
    out_dir = official_workdir / 'eval' / name
    result = _outputs_agree(out_dir, file, sensor='WV2', protocol=name)
    assert result['sensor'] == 'WV2' and result['model_sensor'] == 'WV3'
    with h5py.File(file) as f:
      data = {k: f[k][()].transpose(0, 2, 3, 1) for k in f}
    for k, ref in enumerate(refs[name]):
      sr = scipy.io.loadmat(out_dir / f'output_mulExm_{k}.mat')['sr']
      assert np.abs(sr.astype(np.float64) - ref).max() <= 0.25, (name, k)
      # The reported metrics are those of the official output (to the tiny sr difference).
      if name == 'reduced':
        official = metrics.reduced_resolution_metrics(data['gt'][k], ref, 2047)
      else:
        official = metrics.full_resolution_metrics(
          ref, data['lms'][k], data['pan'][k, ..., 0], 'WV2'
        )
      ours = results[name]['methods']['U2Net']['per_image'][k]
      for key, value in official.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, k, key)


@pytest.mark.slow
def test_tiny_training_run_evaluates_end_to_end(tmp_path):
  config = config_utils.load_config_file(REPO / 'configs' / 'tiny.py')
  with config.unlocked():
    config.train.num_epochs = 1
    config.data.demo_test_size = 96  # 9 tiles; 96 - 2 x 21 leaves one Q4 block.
  workdir = tmp_path / 'tiny'
  train_lib.train_and_evaluate(config, workdir)
  run = subprocess.run(
    [sys.executable, 'evaluate.py', f'--workdir={workdir}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  source = input_pipeline.get_source(config, 'tiny_test')
  roles = {
    r: np.stack([source[i][r] for i in range(len(source))]).astype(np.float64) * 2047.0
    for r in ('gt', 'lms', 'ms', 'guide')
  }
  out_dir = workdir / 'eval' / 'tiny_test'
  result = _outputs_agree(out_dir, roles=roles, sensor='QB')
  assert result['num_images'] == 2 and result['sensor'] == 'QB' and result['bands'] == 4
  assert (out_dir / 'table.txt').read_text() in run.stdout
