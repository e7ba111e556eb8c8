"""Hostile inputs to scene fusion, the workdir lock and checkpoint reading: every case gives a
correct result or one clear error, and nothing is lost.

Library calls on the tiny model of `scene_test` (seconds each); the command-line cases (one
`error:` line, signals) run `fuse.py` as a script and are marked slow.
"""

# ruff: noqa: F811 (the fixtures imported from scene_test are test arguments)
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio
from conftest import REPO, run_script
from scene_test import (  # noqa: F401 (fixtures)
  PAN_PIXEL,
  SIZE,
  make_pair,
  pair,
  reference,
  tiny_workdir,
  write_tiff,
)

from u2net_jax import errors
from u2net_jax.data import DataError
from u2net_jax.infer import network_fuser
from u2net_jax.io import fileio


def _fuse(workdir, pan, ms, out, **kw):
  return network_fuser.fuse_files(workdir, pan, ms, out, progress=False, **kw)


def _dead_pid() -> int:
  """The id of a process that has ended (a child, reaped)."""
  child = subprocess.Popen([sys.executable, '-c', ''])
  child.wait()
  return child.pid


# ---------------------------------------------------------------------------------------------
# Nodata: a bad pixel is nodata where it is, and spoils nothing else.


def test_nan_pixels_are_nodata_and_spoil_no_tile(tiny_workdir, pair, reference, tmp_path):
  folder, pan, ms = pair
  ms_f, pan_f = ms.astype(np.float32), pan.astype(np.float32)
  ms_f[10, 10, 3] = np.nan  # PAN pixels 40..43 x 40..43: inside tile (2, 2) with its margins.
  pan_f[100, 88] = np.inf  # Tile (6, 5) only: 4-px margins.
  write_tiff(tmp_path / 'pan.tif', pan_f)
  write_tiff(tmp_path / 'ms.tif', ms_f, pixel=4 * PAN_PIXEL)
  out = tmp_path / 'fused.tif'
  result = _fuse(tiny_workdir, tmp_path / 'pan.tif', tmp_path / 'ms.tif', out, dtype='uint16')
  assert result['nodata_pixels'] == 16 + 1 and result['nodata'] == 0
  with rasterio.open(out) as f:
    assert f.nodata == 0  # Declared.
    fused = f.read().transpose(1, 2, 0)
  bad = np.zeros(SIZE, bool)
  bad[40:44, 40:44] = bad[100, 88] = True
  assert (fused[bad] == 0).all()
  # Every tile without a hole is exactly the clean fusion; the two with one differ only near it.
  spoiled = np.zeros(SIZE, bool)
  spoiled[32:48, 32:48] = spoiled[96:112, 80:96] = True
  np.testing.assert_array_equal(fused[~spoiled], reference[~spoiled])
  near = spoiled & ~bad
  assert np.abs(fused[near].astype(int) - reference[near]).mean() < 50  # Not a blank tile.


def test_declared_nodata_and_float_outputs(tiny_workdir, pair, tmp_path):
  folder, pan, ms = pair
  ms = ms.astype(np.float32)
  ms[:3, :2] = -9999  # Declared MS nodata: PAN pixels 0..11 x 0..7.
  write_tiff(tmp_path / 'ms.tif', ms, pixel=4 * PAN_PIXEL, nodata=-9999)
  out = tmp_path / 'fused.tif'
  result = _fuse(tiny_workdir, folder / 'pan.tif', tmp_path / 'ms.tif', out)
  assert result['nodata_pixels'] == 12 * 8 and result['nodata'] == -9999
  with rasterio.open(out) as f:
    assert f.nodata == -9999 and f.dtypes[0] == 'float32'
    assert (f.dataset_mask()[:12, :8] == 0).all() and f.dataset_mask()[12:].all()
  # The MS's -9999 cannot be a uint16 output's nodata: refused before any work, unless given.
  with pytest.raises(errors.OptionError, match='--nodata'):
    _fuse(tiny_workdir, folder / 'pan.tif', tmp_path / 'ms.tif', tmp_path / 'u.tif', dtype='uint16')
  assert not (tmp_path / 'u.tif').exists()


# ---------------------------------------------------------------------------------------------
# Values on the wrong scale: refused as train.py and evaluate.py refuse them.


@pytest.mark.parametrize(
  'case, message',
  [
    ('divided', r'MS .*ms.tif: band \d holds .* within \[0, 1\] .*already divided'),
    (
      '30x',
      r'MS .*ms.tif: band \d holds \d+ at row \d+, column \d+ .*above the sensor maximum 2047',
    ),
    ('negative', r'MS .*ms.tif: band 4 holds -5 at row 5, column 7 \(window rows 0\.\.'),
  ],
)
def test_values_off_the_sensor_scale_are_refused(tiny_workdir, pair, tmp_path, case, message):
  folder, pan, ms = pair
  pan_f, ms_f = pan.astype(np.float32), ms.astype(np.float32)
  if case == 'divided':
    pan_f, ms_f = pan_f / 2047, ms_f / 2047
  elif case == '30x':
    pan_f, ms_f = pan_f * 30, ms_f * 30
  else:
    ms_f[5, 7, 3] = -5
  write_tiff(tmp_path / 'pan.tif', pan_f)
  write_tiff(tmp_path / 'ms.tif', ms_f, pixel=4 * PAN_PIXEL)
  args = (tiny_workdir, tmp_path / 'pan.tif', tmp_path / 'ms.tif', tmp_path / 'o.tif')
  with pytest.raises(DataError, match=message) as e:
    _fuse(*args)
  assert '--allow_off_scale' in str(e.value) and '\n' not in str(e.value)
  assert not (tmp_path / 'o.tif').exists()
  if case == 'negative':  # Said to be intended: fused.
    assert _fuse(*args, allow_off_scale=True)['tiles'] > 0


# ---------------------------------------------------------------------------------------------
# Flags: checked before any work, named as the command line spells them.


@pytest.mark.parametrize(
  'options, message',
  [
    ({'max_value': 0.0}, '--max_value=0.0 is not a positive finite number'),
    ({'max_value': -2047.0}, '--max_value=-2047.0 is not'),
    ({'max_value': float('nan')}, '--max_value=nan is not'),
    ({'dtype': 'foo'}, '--dtype=foo is not a numeric dtype'),
    ({'dtype': 'uint8'}, '--dtype=uint8 holds at most 255 but the data reach 2047.*--rescale_out'),
    ({'dtype': 'float32', 'rescale_output': True}, '--rescale_output maps'),
    ({'tile_batch': -2}, '--tile_batch=-2 is not a positive integer'),
    ({'window': 0}, '--window=0 is not a positive integer'),
    ({'nodata': float('inf')}, '--nodata=inf is not'),
  ],
)
def test_bad_flags_are_refused_before_any_work(tiny_workdir, pair, tmp_path, options, message):
  folder, _, _ = pair
  with pytest.raises(errors.OptionError, match=message):
    _fuse(tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', tmp_path / 'o.tif', **options)
  assert list(tmp_path.iterdir()) == []


def test_rescaled_uint8_output(tiny_workdir, pair, reference, tmp_path):
  folder, _, _ = pair
  out = tmp_path / 'o.npy'
  _fuse(
    tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', out, dtype='uint8', rescale_output=True
  )
  fused = np.load(out)
  assert fused.dtype == np.uint8 and np.abs(fused - reference * (255 / 2047)).max() <= 1


def test_a_mat_key_suggestion_spells_the_flag():
  from u2net_jax.data import prepare_pansharpening as prep

  arrays = {'a': np.ones((8, 8)), 'b': np.ones((8, 8))}
  with pytest.raises(DataError, match='pass --pan_key'):
    prep._pick('x.mat', arrays, 2, ())


# ---------------------------------------------------------------------------------------------
# The output never replaces an input; temporaries of killed runs are cleaned up.


@pytest.mark.parametrize('how', ['same path', 'hard link', 'symbolic link'])
def test_the_output_never_replaces_an_input(tiny_workdir, pair, tmp_path, how):
  folder, _, _ = pair
  pan = tmp_path / 'pan.tif'
  pan.write_bytes((folder / 'pan.tif').read_bytes())
  before = pan.read_bytes()
  out = {'same path': pan, 'hard link': tmp_path / 'h.tif', 'symbolic link': tmp_path / 's.tif'}
  if how == 'hard link':
    os.link(pan, out[how])
  elif how == 'symbolic link':
    out[how].symlink_to(pan)
  with pytest.raises(fileio.OutputError, match='is the PAN input .*even with --overwrite'):
    _fuse(tiny_workdir, pan, folder / 'ms.tif', out[how], overwrite=True)
  assert pan.read_bytes() == before


def test_temporaries_of_killed_runs_are_removed_and_live_ones_reported(
  tiny_workdir, pair, tmp_path
):
  folder, _, _ = pair
  host = socket.gethostname()
  dead = tmp_path / f'.o.tif.fuse-{host}-{_dead_pid()}-ab12cd34.tmp.tif'
  live = tmp_path / f'.o.tif.fuse-{host}-{os.getpid()}-ef56gh78.tmp.tif'
  dead.write_bytes(b'partial')
  live.write_bytes(b'partial')
  result = _fuse(tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', tmp_path / 'o.tif')
  assert result['temporaries'] == {'removed': [str(dead)], 'left': [str(live)]}
  assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, 'o.tif']


# ---------------------------------------------------------------------------------------------
# A file damaged inside: one error naming the file and the window.


def test_a_corrupt_geotiff_block_met_mid_run_names_the_file(tiny_workdir, pair, tmp_path):
  folder, pan, _ = pair
  path = tmp_path / 'pan.tif'
  with rasterio.open(
    path, 'w', driver='GTiff', height=SIZE[0], width=SIZE[1], count=1, dtype='uint16',
    crs='EPSG:32633', transform=rasterio.open(folder / 'pan.tif').transform, tiled=True,
    blockxsize=16, blockysize=16, compress='deflate',
  ) as dst:  # fmt: skip
    dst.write(pan[None])
  with rasterio.open(path) as src:  # Garble the compressed data of the last blocks.
    offset = int(src.get_tag_item('BLOCK_OFFSET_6_0', 'TIFF', bidx=1))
  raw = bytearray(path.read_bytes())
  raw[offset : offset + 64] = b'\xff' * 64
  path.write_bytes(bytes(raw))
  with pytest.raises(DataError, match=rf'PAN {path}: rows \d+\.\.\d+, columns \d+\.\.\d+ cannot'):
    _fuse(tiny_workdir, path, folder / 'ms.tif', tmp_path / 'o.tif', window=32)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['pan.tif']


# ---------------------------------------------------------------------------------------------
# The command line: one `error:` line, signals.


def _fuse_cli(workdir, folder, out, *flags, wait=True, log=None):
  return run_script(
    'fuse.py',
    f'--workdir={workdir}',
    f'--pan={folder / "pan.tif"}',
    f'--ms={folder / "ms.tif"}',
    f'--out={out}',
    '--noprogress',
    *flags,
    wait=wait,
    log=log,
  )


@pytest.mark.slow
def test_cli_bad_flags_are_one_line(tiny_workdir, pair, tmp_path):
  folder, _, _ = pair
  for flag in ('--dtype=foo',):  # The other flags: test_bad_flags_are_refused_before_any_work.
    done = _fuse_cli(tiny_workdir, folder, tmp_path / 'o.tif', flag)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: {flag} is not') and last.endswith('(nothing written)')
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_sigterm_removes_the_temporary_and_a_sigkill_one_is_cleaned_later(
  tiny_workdir, pair, tmp_path
):
  pan, ms = make_pair(np.random.default_rng(5), 256, 256)  # Seconds to fuse: time to signal.
  write_tiff(tmp_path / 'pan.tif', pan)
  write_tiff(tmp_path / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
  out = tmp_path / 'out' / 'fused.tif'

  def start():
    log = tmp_path / 'log.txt'
    proc = _fuse_cli(tiny_workdir, tmp_path, out, '--window=32', wait=False, log=log)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob('.fused.tif.fuse-*')) and time.monotonic() < deadline:
      assert proc.poll() is None, log.read_text()
      time.sleep(0.05)
    return proc, log

  proc, log = start()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(60) == 128 + signal.SIGTERM
  lines = log.read_text().strip().splitlines()
  assert lines[-1] == 'error: stopped by SIGTERM; nothing written, the temporary output removed'
  assert 'Traceback' not in log.read_text() and list(out.parent.iterdir()) == []
  proc, _ = start()
  proc.kill()
  proc.wait(60)
  (left,) = out.parent.iterdir()  # A SIGKILL cannot clean up ...
  done = _fuse_cli(tiny_workdir, pair[0], out)  # The small pair: the same output name.
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['temporaries'] == {'removed': [str(left)], 'left': []}  # ... the next run does.
  assert [p.name for p in out.parent.iterdir()] == ['fused.tif']


# ---------------------------------------------------------------------------------------------
# The workdir lock: of processes taking over a stale lock at the same instant, exactly one wins.

RACERS, ROUNDS = 8, 40


def _racer(folder, barrier, results):
  from u2net_jax.run import workdir

  for _ in range(ROUNDS):
    barrier.wait()  # The stale lock is in place: all start at once.
    lock = workdir.WorkdirLock(folder)
    try:
      lock.acquire()
      lock._stop.set()  # Holds it (no release) until the next round's stale lock replaces it.
      results.put(True)
    except errors.WorkdirError:
      results.put(False)
    barrier.wait()


@pytest.mark.filterwarnings('ignore::RuntimeWarning')  # JAX's fork warning: racers use no JAX.
def test_racing_takeovers_of_a_stale_lock_admit_exactly_one(tmp_path):
  import multiprocessing

  from u2net_jax.run import workdir

  ctx = multiprocessing.get_context('fork')
  barrier, results = ctx.Barrier(RACERS + 1), ctx.Queue()
  racers = [ctx.Process(target=_racer, args=(tmp_path, barrier, results)) for _ in range(RACERS)]
  for p in racers:
    p.start()
  stale = json.dumps({'host': socket.gethostname(), 'pid': _dead_pid(), 'started': 0})
  winners = []
  try:
    for _ in range(ROUNDS):
      (tmp_path / workdir.LOCK_NAME).write_text(stale)
      barrier.wait(timeout=60)
      barrier.wait(timeout=60)
      winners.append(sum(results.get(timeout=60) for _ in range(RACERS)))
  finally:
    for p in racers:
      p.join(timeout=10)
      if p.is_alive():
        p.kill()
  assert winners == [1] * ROUNDS
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir.LOCK_NAME]


# ---------------------------------------------------------------------------------------------
# Checkpoints: damage falls back, rotation is not damage, foreign folders are named.


@pytest.fixture
def two_steps(tmp_path):
  """A tiny-model workdir with params-only steps 0 and 5; returns (workdir, model config)."""
  from scene_test import TILE, TILE_BATCH
  from tiling_test import TINY_MODEL, random_params

  from u2net_jax import models
  from u2net_jax.run import checkpointing, config_utils

  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
  with config.unlocked():
    config.model.update(TINY_MODEL)
    config.eval.tile_size, config.eval.tile_batch = TILE, TILE_BATCH
  workdir = tmp_path / 'run'
  config_utils.save_config(config, workdir)
  params = random_params(models.create_model(config.model))
  for step in (0, 5):
    checkpointing.save_params(workdir, params, step=step)
  return workdir, config.model


def test_a_non_integer_meta_step_is_damage_and_falls_back(two_steps, caplog):
  from u2net_jax.run import checkpointing

  workdir, model = two_steps
  meta = workdir / 'checkpoints' / '5' / 'meta' / 'metadata'
  meta.write_text(meta.read_text().replace('"step": 5', '"step": "5a"'))
  _, step, _ = checkpointing.restore_params(workdir, model, which='latest')
  assert step == 0 and "meta records step '5a'" in caplog.text


def test_a_step_rotated_away_while_read_is_listed_again_not_damaged(two_steps, monkeypatch, caplog):
  import shutil

  from u2net_jax.run import checkpointing

  workdir, model = two_steps
  chosen = checkpointing.select_step(workdir, which='latest')
  shutil.rmtree(workdir / 'checkpoints' / str(chosen))  # A training run rotates it away.
  _, step, _ = checkpointing.restore_params(workdir, model, step=chosen, chosen_by_select=True)
  assert step == 0 and 'damaged' not in caplog.text
  # Gone between the listing and the read inside one restore.
  checkpointing.save_params(workdir, checkpointing.restore_params(workdir, model).params, step=7)
  real = checkpointing.restore

  def rotate_then_read(manager, step, **kw):
    if step == 7:
      shutil.rmtree(workdir / 'checkpoints' / '7')
    return real(manager, step, **kw)

  monkeypatch.setattr(checkpointing, 'restore', rotate_then_read)
  _, step, _ = checkpointing.restore_params(workdir, model, which='latest')
  assert step == 0 and 'damaged' not in caplog.text


def test_renamed_step_folders_are_named_not_ignored(two_steps, caplog):
  from u2net_jax.run import checkpointing

  workdir, model = two_steps
  folder = workdir / 'checkpoints'
  (folder / '5').rename(folder / '5_good')
  assert checkpointing.select_step(workdir, which='latest') == 0
  assert "not steps (not named by an integer): ['5_good']" in caplog.text
  (folder / '0').rename(folder / 'best')
  for call in (
    lambda: checkpointing.select_step(workdir),
    lambda: checkpointing.create_manager(workdir),  # What training opens: no fresh start.
  ):
    with pytest.raises(errors.CheckpointError, match=r"\['5_good', 'best'\] and no step"):
      call()


@pytest.mark.slow  # Orbax writes: seconds.
def test_convert_allow_non_finite_converts_what_it_suggests(tmp_path):
  from conftest import load_config
  from robustness_test import _tiny_pth

  from u2net_jax import convert
  from u2net_jax.run import checkpointing

  config = load_config('tiny')
  pth = _tiny_pth(tmp_path, config, float('nan'))
  with pytest.raises(Exception, match='--allow_non_finite'):
    convert.convert_to_workdir(pth, config, tmp_path / 'refused')
  convert.convert_to_workdir(pth, config, tmp_path / 'run', allow_non_finite=True)
  params, _, _ = checkpointing.restore_params(tmp_path / 'run', config.model)
  assert np.isnan(params['to_hrms1']['bias'][0])


# ---------------------------------------------------------------------------------------------
# Config files and --config.FIELD flags: one line naming the file or the field, with a suggestion.


@pytest.mark.parametrize(
  'field, suggestion',
  [('train.batchsize', 'train.batch_size'), ('trian.batch_size', 'train.batch_size')],
)
def test_a_mistyped_config_field_names_the_nearest(field, suggestion):
  from u2net_jax.run import config_utils

  argv = ['train.py', '--config=configs/tiny.py', f'--config.{field}=2']
  message = config_utils.override_problem(argv, AttributeError('raw'))
  assert message == (
    f"--config.{field}: configs/tiny.py has no field '{field}'; did you mean --config.{suggestion}?"
  )


@pytest.mark.parametrize(
  'case, message',
  [
    ('missing', r'conf\.py does not exist; did you mean .*conff\.py\?'),
    ('folder', 'is a folder; give a file'),
    ('no get_config', r'defines no get_config\(\)'),
    ('syntax', r'cannot be loaded \(line 1\): SyntaxError'),
  ],
)
def test_bad_config_files_are_one_clear_error(tmp_path, case, message):
  from u2net_jax.run import config_utils

  (tmp_path / 'conff.py').write_text('x = 1\n' if case == 'no get_config' else 'def get_config(')
  spec = {'missing': 'conf.py', 'folder': '.', 'no get_config': 'conff.py', 'syntax': 'conff.py'}
  with pytest.raises(config_utils.ConfigError, match=message) as e:
    config_utils.check_config_arg(tmp_path / spec[case])
  assert isinstance(e.value, FileNotFoundError) and '\n' not in str(e.value)


@pytest.mark.slow  # A train.py process.
def test_train_py_reports_a_mistyped_field_in_one_line(tmp_path):
  done = run_script('train.py', '--config=configs/tiny.py', '--config.train.batchsize=2')
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
    "error: --config.train.batchsize: configs/tiny.py has no field 'train.batchsize'; did you "
    'mean --config.train.batch_size?'
  )


def test_prepare_pansharpening_names_a_corrupt_tif(tmp_path):
  from u2net_jax.data import prepare_pansharpening as prep

  path = tmp_path / 'pan.tif'
  path.write_bytes(b'II*\x00' + b'\x00' * 64)  # A TIFF header and nothing readable.
  with pytest.raises(DataError, match=rf'{path}: not a readable GeoTIFF'):
    prep.load_array(path, None, 2)
