"""Tests of `infer.scene` (streaming scene fusion) and `tiling.cut_window`, on real GeoTIFFs.

A tiny WV3-shaped model with random parameters and 32-px tiles keeps each fusion to seconds; the
geometry and the streaming are those of the official 64-px tiling. The real-scene acceptance
(released weights, `evaluate.py`) is in `fuse_test.py`.
"""

import json

import h5py
import numpy as np
import pytest
import rasterio
import scipy.io
from conftest import REPO
from rasterio.transform import Affine
from tiling_test import TINY_MODEL, random_params

from u2net_jax import errors, models, toolbox
from u2net_jax.data import DataError, pancollection
from u2net_jax.data import prepare_pansharpening as prep
from u2net_jax.infer import network_fuser, scene, scene_resume, tiling
from u2net_jax.io import fileio, raster_sinks
from u2net_jax.run import checkpointing, config_utils

CRS = 'EPSG:32633'  # UTM 33N: a projected CRS in metres.
PAN_PIXEL = 0.5
SIZE = (136, 104)  # PAN pixels: 9 x 7 tiles of 16 px, the last row and column partly outside.
TILE_BATCH = 4
TILE = 16  # Tiles of 16 px (24 with margins) keep the tiny model fast; the geometry is general.
ORIGIN = (500000.0, 4600000.0)


def write_tiff(path, image, *, pixel=PAN_PIXEL, origin=ORIGIN, crs=CRS, nodata=None, names=None):
  """Writes (H, W) or (H, W, C) as a GeoTIFF, north-up with `pixel` metres."""
  image = image if image.ndim == 3 else image[..., None]
  transform = Affine(pixel, 0, origin[0], 0, -pixel, origin[1]) if crs else None
  with rasterio.open(
    path,
    'w',
    driver='GTiff',
    height=image.shape[0],
    width=image.shape[1],
    count=image.shape[2],
    dtype=image.dtype.name,
    crs=crs,
    transform=transform,
    nodata=nodata,
  ) as dst:
    dst.write(image.transpose(2, 0, 1))
    for i, name in enumerate(names or ()):
      dst.set_band_description(i + 1, name)
  return path


def make_pair(rng, height, width, bands=8, peak=2047):
  """A smooth uint16 PAN (H, W) and MS (H/4, W/4, bands) on the 11-bit scale."""
  low = rng.uniform(200, 1800, (height // 16 + 1, width // 16 + 1, bands))
  ref = np.kron(low, np.ones((16, 16, 1)))[:height, :width] + rng.uniform(-150, 150, (1, 1, bands))
  ref = np.clip(ref + rng.uniform(-100, 100, ref.shape), 0, peak)
  ms = ref.reshape(height // 4, 4, width // 4, 4, bands).mean(axis=(1, 3))
  return np.round(ref.mean(axis=2)).astype(np.uint16), np.round(ms).astype(np.uint16)


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  """A WV3 workdir with a tiny random model and 32-px tiles (4 tiles per call)."""
  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
  with config.unlocked():
    config.model.update(TINY_MODEL)
    config.eval.tile_size = TILE
    config.eval.tile_batch = TILE_BATCH
  workdir = tmp_path_factory.mktemp('tiny_wv3')
  config_utils.save_config(config, workdir)
  checkpointing.save_params(workdir, random_params(models.create_model(config.model)))
  return workdir


def whole_image(workdir, pan, ms):
  """The reference: the image fused at once by `tiling.Fuser`, on the 0..2047 uint16 scale."""
  config = config_utils.load_config(workdir)
  params, _, _ = checkpointing.restore_params(workdir, config.model)
  fuser = tiling.Fuser(
    config.model, params, tile_size=config.eval.tile_size, tile_batch=config.eval.tile_batch
  )
  mx = np.float32(config.data.max_value)
  pan_f = pan.astype(np.float32)[..., None] / mx
  fused = fuser(ms.astype(np.float32) / mx, pan_f)
  return scene._to_output(fused, config.data.max_value, np.dtype(np.uint16))


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
  """A 136 x 104 PAN (sides not multiples of the tile) and its 34 x 26 x 8 MS as GeoTIFFs."""
  folder = tmp_path_factory.mktemp('pair')
  pan, ms = make_pair(np.random.default_rng(0), *SIZE)
  names = [f'band {i}' for i in range(8)]
  write_tiff(folder / 'pan.tif', pan)
  write_tiff(folder / 'ms.tif', ms, pixel=4 * PAN_PIXEL, names=names)
  return folder, pan, ms


@pytest.fixture(scope='module')
def reference(tiny_workdir, pair):
  _, pan, ms = pair
  return whole_image(tiny_workdir, pan, ms)


# ---------------------------------------------------------------------------------------------
# Geometry.


@pytest.mark.parametrize(
  'height, width, tile, pad', [(100, 60, 64, 4), (36, 96, 8, 4), (8, 4, 4, 0)]
)
def test_cut_window_equals_the_whole_image_cut(height, width, tile, pad):
  rng = np.random.default_rng(height)
  image = rng.uniform(size=(height, width, 3)).astype(np.float32)
  rows, cols = tiling.tile_grid(height, width, tile)
  side = tile + 2 * pad
  whole = tiling._cut(image, rows, cols, tile, pad).reshape(rows, cols, side, side, 3)

  def read(y0, y1, x0, x1):
    assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width  # Only pixels of the image.
    return image[y0:y1, x0:x1]

  for r0 in range(rows):
    for c0 in range(cols):
      for r1, c1 in ((r0 + 1, c0 + 1), (min(rows, r0 + 2), min(cols, c0 + 3)), (rows, cols)):
        got = tiling.cut_window(
          read, height, width, range(r0, r1), range(c0, c1), tile=tile, pad=pad
        )
        want = whole[r0:r1, c0:c1].reshape(-1, side, side, 3)
        np.testing.assert_array_equal(got, want, err_msg=f'{(r0, r1, c0, c1)}')


# ---------------------------------------------------------------------------------------------
# Streaming: the same pixels whatever the window, georeference kept.


def test_window_tiles_fill_every_batch_position():
  """Windows as wide as a multiple of the batch put equally many tiles at every batch position."""
  assert network_fuser.window_tiles(1024, 64, 16) == (16, 16)  # The defaults: square windows.
  assert network_fuser.window_tiles(1024, 64, 64) == (4, 64)
  assert network_fuser.window_tiles(32, 16, 4) == (1, 4)
  for window, tile, batch, grid_cols in [
    (1024, 64, 64, 129),
    (1024, 64, 16, 21),
    (256, 16, 12, 50),
  ]:
    rows, cols = network_fuser.window_tiles(window, tile, batch)
    for r0, c0 in [(0, 0), (rows, cols), (3 * rows, 2 * cols)]:
      index = (np.arange(r0, r0 + rows)[:, None] * grid_cols + np.arange(c0, c0 + cols)).ravel()
      counts = np.bincount(index % batch, minlength=batch)
      assert (counts == rows * cols // batch).all(), (window, tile, batch, counts)


@pytest.mark.parametrize('window', [32, 1024])
def test_streamed_windows_equal_the_whole_image_fusion(tiny_workdir, pair, reference, window):
  folder, pan, _ = pair
  out = folder / f'fused_{window}.tif'
  result = network_fuser.fuse_files(
    tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', out, window=window, progress=False
  )
  rows, cols = tiling.tile_grid(*SIZE, TILE)
  win_rows, win_cols = network_fuser.window_tiles(window, TILE, TILE_BATCH)
  assert result['tiles'] == rows * cols
  assert result['windows'] == -(-rows // win_rows) * -(-cols // win_cols)
  with rasterio.open(out) as f:
    fused = f.read().transpose(1, 2, 0)
    assert f.crs == rasterio.crs.CRS.from_string(CRS)
    assert f.transform == Affine(PAN_PIXEL, 0, ORIGIN[0], 0, -PAN_PIXEL, ORIGIN[1])
    assert f.descriptions == tuple(f'band {i}' for i in range(8))
    assert f.profile['tiled'] and f.profile['compress'] == 'deflate'
  assert fused.dtype == np.uint16 and fused.shape == (*SIZE, 8)
  np.testing.assert_array_equal(fused, reference)


def test_array_inputs_and_outputs(tiny_workdir, pair, reference, tmp_path):
  _, pan, ms = pair
  np.save(tmp_path / 'pan.npy', pan)
  scipy.io.savemat(tmp_path / 'ms.mat', {'I_MS': ms})
  network_fuser.fuse_files(
    tiny_workdir, tmp_path / 'pan.npy', tmp_path / 'ms.mat', tmp_path / 'o.npy', progress=False
  )
  np.testing.assert_array_equal(np.load(tmp_path / 'o.npy'), reference)
  # A PanCollection file of one image (N x C x H x W) holds both inputs.
  h5 = tmp_path / 'one.h5'
  pancollection.write_h5(h5, {'pan': pan[None, None], 'ms': ms.transpose(2, 0, 1)[None]})
  result = network_fuser.fuse_files(
    tiny_workdir,
    h5,
    h5,
    tmp_path / 'o.mat',
    dtype='float32',
    window=32,
    progress=False,
  )
  sr = scipy.io.loadmat(tmp_path / 'o.mat')['sr']
  assert sr.dtype == np.float32 and result['dtype'] == 'float32'
  assert np.abs(np.rint(sr) - reference).max() == 0


def test_nodata_stays_nodata(tiny_workdir, pair, tmp_path):
  folder, pan, ms = pair
  pan = pan.copy()
  pan[:40, :50] = 0  # A no-data corner, declared.
  write_tiff(tmp_path / 'pan.tif', pan, nodata=0)
  out = tmp_path / 'fused.tif'
  result = network_fuser.fuse_files(
    tiny_workdir, tmp_path / 'pan.tif', folder / 'ms.tif', out, progress=False
  )
  assert result['nodata_pixels'] == 40 * 50
  with rasterio.open(out) as f:
    assert f.nodata == 0
    fused = f.read().transpose(1, 2, 0)
    mask = f.dataset_mask()
  assert (fused[:40, :50] == 0).all() and (mask[:40, :50] == 0).all()
  # Elsewhere the fused values (the random model clamps some pixels to 0 in every band).
  assert (fused[40:] > 0).any(axis=-1).mean() > 0.5


def test_cog_output(tiny_workdir, pair, reference, tmp_path):
  folder, _, _ = pair
  out = tmp_path / 'fused.tif'
  network_fuser.fuse_files(
    tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', out, cog=True, progress=False
  )
  with rasterio.open(out) as f:
    assert f.tags(ns='IMAGE_STRUCTURE').get('LAYOUT') == 'COG'
    assert f.crs == rasterio.crs.CRS.from_string(CRS)
    np.testing.assert_array_equal(f.read().transpose(1, 2, 0), reference)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['fused.tif']  # No temporary left.


# ---------------------------------------------------------------------------------------------
# Networks that take the upsampled MS (`lms`, issue 23).


@pytest.mark.parametrize('size', [(136, 104), (12, 20), (64, 48)])
def test_window_lms_equals_the_whole_image_interpolation(size):
  """Any window (borders, corners, an MS smaller than the halo) gets interp23tap's very bits."""
  h, w = size[0] // 4, size[1] // 4
  ms = np.random.default_rng(h).integers(0, 2048, (h, w, 3)).astype(np.uint16)
  whole = toolbox.interp23tap(ms.astype(np.float64), 4).astype(np.float32) / np.float32(2047)

  class Reader:
    height, width, max_value = h, w, 2047.0

    def values(self, y0, y1, x0, x1):
      assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w  # Only pixels of the image.
      return ms[y0:y1, x0:x1].astype(np.float32)

    def __call__(self, y0, y1, x0, x1):
      return self.values(y0, y1, x0, x1) / np.float32(2047)

  big_h, big_w = size
  for y0, y1, x0, x1 in [
    (0, big_h, 0, big_w),
    (0, 8, 0, 8),
    (big_h - 5, big_h, big_w - 9, big_w),
    (3, 11, 5, 17),
    (big_h // 2, big_h // 2 + 1, 1, 2),
  ]:
    got = network_fuser.window_lms(Reader(), y0, y1, x0, x1)
    np.testing.assert_array_equal(got, whole[y0:y1, x0:x1], err_msg=str((y0, y1, x0, x1)))


def test_read_padded_equals_numpy_pad():
  image = np.arange(5 * 7 * 2, dtype=np.float32).reshape(5, 7, 2)
  reads = []

  def read(y0, y1, x0, x1):
    assert 0 <= y0 < y1 <= 5 and 0 <= x0 < x1 <= 7
    reads.append((y0, y1, x0, x1))
    return image[y0:y1, x0:x1]

  for mode in ('wrap', 'symmetric', 'reflect', 'edge'):
    padded = np.pad(image, ((13, 13), (13, 13), (0, 0)), mode)
    for y0, y1, x0, x1 in [(-13, 18, -13, 20), (-2, 3, 4, 9), (1, 4, 2, 6)]:
      got = scene.read_padded(read, y0, y1, x0, x1, 5, 7, mode)
      np.testing.assert_array_equal(got, padded[y0 + 13 : y1 + 13, x0 + 13 : x1 + 13], mode)
  assert reads[-1] == (1, 4, 2, 6)  # Inside the image: one read.


@pytest.fixture(scope='module', params=[pytest.param('pannet', marks=pytest.mark.slow), 'dicnn'])
def lms_workdir(request, tmp_path_factory):
  """A WV3 workdir of a network that takes `lms`, random parameters, 16-px tiles."""
  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
  with config.unlocked():
    config.model.name = request.param
    config.eval.tile_size = TILE
    config.eval.tile_batch = TILE_BATCH
  workdir = tmp_path_factory.mktemp(request.param)
  config_utils.save_config(config, workdir)
  checkpointing.save_params(workdir, random_params(models.create_model(config.model), 3))
  return workdir


def test_lms_networks_fuse_scenes_as_evaluate_does(lms_workdir, pair, tmp_path):
  """Window by window (several window sizes) = the whole image through `tiling.Fuser` with the
  test sets' `lms` (float32 of interp23tap of the MS on the sensor scale, divided), bit for bit."""
  folder, pan, ms = pair
  config = config_utils.load_config(lms_workdir)
  params, _, _ = checkpointing.restore_params(lms_workdir, config.model)
  fuser = tiling.Fuser(config.model, params, tile_size=TILE, tile_batch=TILE_BATCH)
  assert fuser.needs_lms
  mx = np.float32(2047)
  lms = toolbox.interp23tap(ms.astype(np.float64), 4).astype(np.float32) / mx
  fused = fuser(ms.astype(np.float32) / mx, pan.astype(np.float32)[..., None] / mx, lms)
  want = scene._to_output(fused, 2047, np.dtype(np.float32))
  for window in (32, 64, 1024):
    out = tmp_path / f'fused_{window}.npy'
    network_fuser.fuse_files(
      lms_workdir,
      folder / 'pan.tif',
      folder / 'ms.tif',
      out,
      window=window,
      dtype='float32',
      progress=False,
    )
    np.testing.assert_array_equal(np.load(out), want, err_msg=f'window {window}')


# ---------------------------------------------------------------------------------------------
# Refusals: a clear error and nothing written.


def _misregistered(folder, pan, ms, case):
  if case == 'shifted origin':
    shifted = (ORIGIN[0] + 3 * PAN_PIXEL, ORIGIN[1])
    return write_tiff(folder / 'ms.tif', ms, pixel=4 * PAN_PIXEL, origin=shifted), 'corners differ'
  if case == 'MS pixel 3x':
    return write_tiff(folder / 'ms.tif', ms, pixel=3 * PAN_PIXEL), 'is 3x the PAN pixel'
  if case == 'other CRS':
    return write_tiff(folder / 'ms.tif', ms, pixel=4 * PAN_PIXEL, crs='EPSG:32634'), 'EPSG:32634'
  return write_tiff(folder / 'ms.tif', ms[..., :4], pixel=4 * PAN_PIXEL), '4 bands'


@pytest.mark.parametrize('case', ['shifted origin', 'MS pixel 3x', 'other CRS', '4 bands'])
def test_misregistered_inputs_are_refused(tiny_workdir, pair, tmp_path, case):
  folder, pan, ms = pair
  inputs = tmp_path / 'in'
  inputs.mkdir()
  ms_path, message = _misregistered(inputs, pan, ms, case)
  out = tmp_path / 'out' / 'fused.tif'
  with pytest.raises(DataError, match=message) as e:
    network_fuser.fuse_files(tiny_workdir, folder / 'pan.tif', ms_path, out, progress=False)
  assert str(folder / 'pan.tif') in str(e.value) and str(ms_path) in str(e.value)
  assert not (tmp_path / 'out').exists()


def test_sizes_and_outputs_are_checked(tiny_workdir, pair, tmp_path):
  folder, pan, ms = pair
  write_tiff(tmp_path / 'ms.tif', ms[:-1], pixel=4 * PAN_PIXEL)
  with pytest.raises(DataError, match=r'expected exactly 4x the MS 33x26, i.e. 132x104'):
    network_fuser.fuse_files(
      tiny_workdir, folder / 'pan.tif', tmp_path / 'ms.tif', tmp_path / 'o.tif'
    )
  np.save(tmp_path / 'pan.npy', pan)
  with pytest.raises(DataError, match='has a coordinate system'):
    network_fuser.fuse_files(
      tiny_workdir, tmp_path / 'pan.npy', folder / 'ms.tif', tmp_path / 'o.tif'
    )
  existing = tmp_path / 'existing.tif'
  existing.write_bytes(b'keep')
  with pytest.raises(fileio.OutputError, match='--overwrite'):
    network_fuser.fuse_files(tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', existing)
  assert existing.read_bytes() == b'keep'
  with pytest.raises(fileio.OutputError, match='unsupported output format'):
    network_fuser.fuse_files(
      tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', tmp_path / 'o.png'
    )
  with pytest.raises(DataError, match='multiple of the tile size 16'):
    network_fuser.fuse_files(
      tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', tmp_path / 'o.tif', window=40
    )
  assert sorted(p.name for p in tmp_path.iterdir()) == ['existing.tif', 'ms.tif', 'pan.npy']


def test_a_failed_run_leaves_no_file(tiny_workdir, pair, tmp_path, monkeypatch):
  folder, _, _ = pair
  writes = []

  def write_then_fail(self, y0, x0, block):
    writes.append((y0, x0))
    if len(writes) == 2:  # A kill after the first window was written.
      raise KeyboardInterrupt

  monkeypatch.setattr(raster_sinks.GeoTiffSink, 'write', write_then_fail)
  with pytest.raises(KeyboardInterrupt):
    network_fuser.fuse_files(
      tiny_workdir, folder / 'pan.tif', folder / 'ms.tif', tmp_path / 'o.tif', window=64
    )
  assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Resuming (`fuse.py --resume`, issue 25); the SIGKILL of a real fuse.py is in fuse_test.py.


def _interrupted_after(monkeypatch, windows):
  """Makes the partial output's window writes stop the run (KeyboardInterrupt) after `windows`."""
  written = []
  write = scene_resume.PartialSink.write

  def write_then_stop(self, y0, x0, block):
    if len(written) == windows:
      raise KeyboardInterrupt
    written.append((y0, x0))
    write(self, y0, x0, block)

  monkeypatch.setattr(scene_resume.PartialSink, 'write', write_then_stop)
  return written


@pytest.mark.parametrize(
  'suffix',
  [
    '.tif',
    pytest.param('.npy', marks=pytest.mark.slow),
    pytest.param('.mat', marks=pytest.mark.slow),
  ],
)
def test_resume_continues_to_the_same_output(
  tiny_workdir, pair, reference, tmp_path, monkeypatch, suffix
):
  """Stopped after 2 of 6 windows, resumed: the uninterrupted run's file (GeoTIFF: its bytes)."""
  folder, _, _ = pair
  inputs = (tiny_workdir, folder / 'pan.tif', folder / 'ms.tif')
  out = tmp_path / f'fused{suffix}'
  with monkeypatch.context() as m:
    _interrupted_after(m, 2)
    with pytest.raises(KeyboardInterrupt):
      network_fuser.fuse_files(*inputs, out, window=64, resume=True, progress=False)
  journal = scene_resume.paths(out)['json']
  assert json.loads(journal.read_text())['state']['done'] == 2 and not out.exists()
  written = _interrupted_after(monkeypatch, 10**6)
  result = network_fuser.fuse_files(*inputs, out, window=64, resume=True, progress=False)
  assert (result['windows'], result['resumed_windows'], len(written)) == (6, 2, 4)
  assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # Journal and partial gone.
  if suffix == '.tif':
    plain = tmp_path / 'plain' / out.name
    network_fuser.fuse_files(*inputs, plain, window=64, progress=False)
    assert out.read_bytes() == plain.read_bytes()  # The same file, byte for byte.
  else:
    fused = np.load(out) if suffix == '.npy' else scipy.io.loadmat(out)['sr']
    np.testing.assert_array_equal(fused, reference)


def test_resume_refuses_a_journal_of_another_run(tiny_workdir, pair, tmp_path, monkeypatch):
  folder, pan, ms = pair
  inputs = (tiny_workdir, folder / 'pan.tif', folder / 'ms.tif')
  out = tmp_path / 'fused.tif'
  with monkeypatch.context() as m:
    _interrupted_after(m, 2)
    with pytest.raises(KeyboardInterrupt):
      network_fuser.fuse_files(*inputs, out, window=64, resume=True, progress=False)
  partial = scene_resume.paths(out)['npy']
  before = partial.read_bytes()
  with pytest.raises(errors.OptionError, match=r'--resume: .* records another run .*dtype'):
    network_fuser.fuse_files(*inputs, out, window=64, dtype='float32', resume=True, progress=False)
  with pytest.raises(errors.OptionError, match=r'records another run .*windows'):
    network_fuser.fuse_files(*inputs, out, window=32, resume=True, progress=False)
  other = write_tiff(tmp_path / 'ms.tif', ms + 1, pixel=4 * PAN_PIXEL)
  with pytest.raises(errors.OptionError, match=r'records another run .*inputs\.MS'):
    network_fuser.fuse_files(tiny_workdir, folder / 'pan.tif', other, out, window=64, resume=True)
  assert partial.read_bytes() == before and not out.exists()
  # Without --resume: today's behaviour (the partial run is left for a later --resume).
  network_fuser.fuse_files(*inputs, out, window=64, progress=False)
  assert out.exists() and partial.exists()
  scene_resume.paths(out)['json'].write_text('{"version": 1, "run"')  # A damaged journal.
  with pytest.raises(errors.OptionError, match=r'journal .* cannot be read'):
    network_fuser.fuse_files(*inputs, out, window=64, resume=True, overwrite=True, progress=False)


# ---------------------------------------------------------------------------------------------
# The data preparation reads GeoTIFF.


def test_prepare_pansharpening_reads_geotiff(tmp_path):
  pan, ms = make_pair(np.random.default_rng(1), 128, 96)
  write_tiff(tmp_path / 'pan.tif', pan)
  write_tiff(tmp_path / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
  np.testing.assert_array_equal(prep.load_array(tmp_path / 'pan.tif', None, 2), pan)
  np.testing.assert_array_equal(prep.load_array(tmp_path / 'ms.tif', None, 3), ms)
  np.save(tmp_path / 'pan.npy', pan)
  np.save(tmp_path / 'ms.npy', ms)
  written = {}
  for kind in ('tif', 'npy'):
    written[kind] = prep.prepare(
      [str(tmp_path / f'pan.{kind}')],
      [str(tmp_path / f'ms.{kind}')],
      'WV3',
      str(tmp_path / kind),
      outputs=['test', 'full'],
    )
  for out in ('test', 'full'):
    with h5py.File(written['tif'][out]) as a, h5py.File(written['npy'][out]) as b:
      assert sorted(a) == sorted(b)
      for key in a:
        np.testing.assert_array_equal(a[key][()], b[key][()])
