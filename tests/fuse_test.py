"""End-to-end tests of `fuse.py`: the command line, and the real WorldView-2 scene with the
released weights against `evaluate.py`'s tiled fusion of the same image (slow)."""

import contextlib
import json
import os
import signal
import time

import numpy as np
import pytest
import rasterio
import scipy.io
from conftest import REPO, run_script, script_env, shared_path
from rasterio.transform import Affine
from scene_test import CRS, ORIGIN, PAN_PIXEL, make_pair, tiny_workdir, write_tiff  # noqa: F401

from u2net_jax import convert, toolbox
from u2net_jax.data import pancollection
from u2net_jax.run import config_utils


@pytest.mark.slow
def test_cli_fuses_and_reports_errors_in_one_line(tiny_workdir, tmp_path):  # noqa: F811
  pan, ms = make_pair(np.random.default_rng(2), 64, 48)
  write_tiff(tmp_path / 'pan.tif', pan)
  write_tiff(tmp_path / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
  out = tmp_path / 'out' / 'fused.tif'
  args = ['fuse.py', f'--workdir={tiny_workdir}', f'--pan={tmp_path / "pan.tif"}']
  done = run_script(*args, f'--ms={tmp_path / "ms.tif"}', f'--out={out}')
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['shape'] == [64, 48, 8] and result['output'] == str(out)
  assert 'tile/s' in done.stderr  # The progress bar: rate and ETA.
  with rasterio.open(out) as f:
    assert f.crs == rasterio.crs.CRS.from_string(CRS) and f.dtypes[0] == 'uint16'
  # An existing output without --overwrite, then a misregistered MS: one line each, nothing
  # written.
  again = run_script(*args, f'--ms={tmp_path / "ms.tif"}', f'--out={out}')
  assert again.returncode == 1 and 'Traceback' not in again.stderr
  assert again.stderr.strip().splitlines()[-1] == (
    f'error: {out} exists; pass --overwrite to replace it (nothing written)'
  )
  write_tiff(tmp_path / 'ms3.tif', ms, pixel=3 * PAN_PIXEL)
  bad = run_script(*args, f'--ms={tmp_path / "ms3.tif"}', f'--out={tmp_path / "bad.tif"}')
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'is 3x the PAN pixel' in last
  assert not (tmp_path / 'bad.tif').exists()


@pytest.mark.slow
def test_resume_after_sigkill_writes_the_uninterrupted_file(tiny_workdir, tmp_path):  # noqa: F811
  """fuse.py --resume SIGKILLed after 3 of its 25 windows, then run again with --resume: the
  uninterrupted run's GeoTIFF, byte for byte; the partial output and journal are gone."""
  pan, ms = make_pair(np.random.default_rng(5), 256, 256)
  write_tiff(tmp_path / 'pan.tif', pan)
  write_tiff(tmp_path / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
  env = script_env(cache_dir=tmp_path / 'jax_cache')
  args = [
    f'--workdir={tiny_workdir}',
    f'--pan={tmp_path / "pan.tif"}',
    f'--ms={tmp_path / "ms.tif"}',
  ]
  args += ['--window=64', '--noprogress']
  plain = tmp_path / 'plain' / 'fused.tif'
  done = run_script('fuse.py', *args, f'--out={plain}', env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  out = tmp_path / 'out' / 'fused.tif'
  journal = out.parent / '.fused.tif.partial.json'
  child = run_script('fuse.py', *args, f'--out={out}', '--resume', env=env, wait=False)
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
      with contextlib.suppress(OSError, ValueError):
        if json.loads(journal.read_text())['state']['done'] >= 3:
          break
      time.sleep(0.01)
    assert child.poll() is None, 'fuse.py ended before it could be killed'
    child.send_signal(signal.SIGKILL)
  finally:
    child.kill()
    child.wait()
  killed_at = json.loads(journal.read_text())['state']['done']
  assert 3 <= killed_at < 25 and not out.exists()
  done = run_script('fuse.py', *args, f'--out={out}', '--resume', env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['windows'] == 25 and result['resumed_windows'] == killed_at
  assert out.read_bytes() == plain.read_bytes()
  assert sorted(p.name for p in out.parent.iterdir()) == ['fused.tif']


# ---------------------------------------------------------------------------------------------
# Acceptance: the real WV2 scene (1280 x 1280 PAN, 320 x 320 x 8 MS, uint16) with the released
# WV3 weights, as georeferenced GeoTIFFs, against evaluate.py on the same image.


def _full_resolution_h5(path, pan, ms):
  """A scene as a one-example PanCollection full-resolution file (lms = the toolbox's interp23tap
  of the whole MS), for `evaluate.py`."""
  arrays = {
    'lms': toolbox.interp23tap(ms.astype(np.float64), 4),
    'ms': ms.astype(np.float64),
    'pan': pan.astype(np.float64)[..., None],
  }
  pancollection.write_h5(path, {k: v.transpose(2, 0, 1)[None] for k, v in arrays.items()})
  return path


@pytest.fixture(scope='module')
def wv2_run(tmp_path_factory):
  """Fuses the scene with fuse.py and evaluates the same image with evaluate.py (one run of
  each for all the asserts). Both run as scripts at XLA's default optimisation level (the
  suite's level 0 halves compile times but makes the full model ~4x slower to run), sharing a
  compilation cache: ~1 min each on 2 cores."""
  data = scipy.io.loadmat(shared_path('data', 'pnn-wv2-ikonos-geoeye1', 'imgWV2.mat'))
  checkpoint = shared_path('official', 'u2net_wv3_200000_iter.pth')
  pan, ms = data['I_PAN'], data['I_MS']
  folder = tmp_path_factory.mktemp('wv2_scene')
  workdir = folder / 'official_wv3'
  config = config_utils.load_config_file(REPO / 'configs/wv3.py')
  convert.convert_to_workdir(checkpoint, config, workdir)
  write_tiff(folder / 'pan.tif', pan)
  write_tiff(folder / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
  flags = ' '.join(
    f for f in os.environ.get('XLA_FLAGS', '').split() if 'backend_optimization_level' not in f
  )
  env = script_env({'XLA_FLAGS': flags}, cache_dir=folder / 'jax_cache')
  fused = folder / 'fused.tif'
  done = run_script(
    'fuse.py',
    f'--workdir={workdir}',
    f'--pan={folder / "pan.tif"}',
    f'--ms={folder / "ms.tif"}',
    f'--out={fused}',
    '--noprogress',
    env=env,
    timeout=1800,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  # The same image as a one-example PanCollection full-resolution file, through evaluate.py.
  h5 = _full_resolution_h5(folder / 'test_wv2_scene_OrigScale_multiExm1.h5', pan, ms)
  done = run_script(
    'evaluate.py',
    f'--workdir={workdir}',
    f'--test_files=wv2_scene={h5}',
    '--sensor=WV2',
    f'--output_dir={folder / "eval"}',
    env=env,
    timeout=1800,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  evaluated = scipy.io.loadmat(folder / 'eval' / 'wv2_scene' / 'output_mulExm_0.mat')['sr']
  return folder, result, evaluated


@pytest.mark.slow
def test_real_wv2_scene_keeps_the_georeference(wv2_run):
  folder, result, _ = wv2_run
  with rasterio.open(folder / 'fused.tif') as f, rasterio.open(folder / 'pan.tif') as p:
    assert f.crs == p.crs == rasterio.crs.CRS.from_string(CRS)
    assert f.transform == p.transform == Affine(PAN_PIXEL, 0, ORIGIN[0], 0, -PAN_PIXEL, ORIGIN[1])
    assert (f.height, f.width, f.count) == (1280, 1280, 8) and f.dtypes == ('uint16',) * 8
  assert result['shape'] == [1280, 1280, 8] and result['tiles'] == 21 * 21


@pytest.mark.slow
def test_real_wv2_scene_equals_evaluate(wv2_run):
  folder, _, evaluated = wv2_run
  with rasterio.open(folder / 'fused.tif') as f:
    fused = f.read().transpose(1, 2, 0).astype(np.float64)
  assert evaluated.shape == (1280, 1280, 8)
  rounded = np.clip(np.rint(evaluated.astype(np.float64)), 0, 2047)
  assert np.abs(fused - rounded).max() <= 1
  # Same tiles at the same batch positions: the same bits, so the rounding agrees everywhere.
  assert np.abs(fused - rounded).max() == 0


# ---------------------------------------------------------------------------------------------
# A network that takes `lms` (issue 23): the released WV2 PanNet on the real WV2 scene through
# fuse.py (windows, per-window lms) against evaluate.py --mode=tiled on the same image (its lms
# from the test file: interp23tap of the whole MS).


@pytest.mark.slow
def test_real_wv2_scene_with_pannet_equals_evaluate(tmp_path):
  data = scipy.io.loadmat(shared_path('data', 'pnn-wv2-ikonos-geoeye1', 'imgWV2.mat'))
  checkpoint = shared_path('dlpan', 'weights', 'WV2', 'pannet.pth')
  pan, ms = data['I_PAN'][:768, :1024], data['I_MS'][:192, :256]  # 12 x 16 windows of 64 px.
  workdir = tmp_path / 'pannet_wv2'
  config = config_utils.load_config_file(REPO / 'configs/wv2.py')
  with config.unlocked():
    config.model.name = 'pannet'
  convert.convert_to_workdir(checkpoint, config, workdir)
  write_tiff(tmp_path / 'pan.tif', pan)
  write_tiff(tmp_path / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
  env = script_env(cache_dir=tmp_path / 'jax_cache')
  fused = tmp_path / 'fused.tif'
  args = [f'--workdir={workdir}', f'--pan={tmp_path / "pan.tif"}', f'--ms={tmp_path / "ms.tif"}']
  done = run_script('fuse.py', *args, f'--out={fused}', '--window=256', '--noprogress', env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  h5 = _full_resolution_h5(tmp_path / 'test_wv2_crop_OrigScale_multiExm1.h5', pan, ms)
  done = run_script(
    'evaluate.py',
    f'--workdir={workdir}',
    f'--test_files=wv2_crop={h5}',
    '--mode=tiled',
    f'--output_dir={tmp_path / "eval"}',
    env=env,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  evaluated = scipy.io.loadmat(tmp_path / 'eval' / 'wv2_crop' / 'output_mulExm_0.mat')['sr']
  with rasterio.open(fused) as f:
    got = f.read().transpose(1, 2, 0).astype(np.float64)
  want = np.clip(np.rint(evaluated.astype(np.float64)), 0, 2047)
  assert got.shape == want.shape == (768, 1024, 8)
  assert np.abs(got - want).max() == 0
