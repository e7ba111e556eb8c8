"""Tests of the classical methods on scenes by windows (`methods.streaming`, `fuse.py --method`).

On arrays (quick): every streamed method against its whole-image function on an image of odd MS
size (23 x 19), with windows that cut it into interior, edge and corner pieces and one window
holding it whole: bit-identical for the local method (EXP, whose interp23tap borders are
circular), <= 1e-9 of the sensor maximum for the two-pass ones; the whole-image methods below the
limit, and their refusal above it.

Through GeoTIFFs (`scene.fuse_files_with` with `ClassicalWindowFuser`, quick): the same equalities
on a scene of odd size with the PAN's georeference kept, float64 and uint16 outputs, nodata
pixels written as nodata (and, for the local method, nothing else changed beyond its halo). Slow:
`fuse.py --method` as a command (its flag errors in one line), `fuse.py --scenes --method` on a
2-worker LocalCluster, and the real WorldView-2 scene of `../shared`.
"""

import json

import numpy as np
import pytest
import rasterio
import scipy.io
from conftest import run_script, shared_path
from scene_test import CRS, PAN_PIXEL, write_tiff
from scipy import ndimage

from u2net_jax import toolbox
from u2net_jax.infer import classical_fuser, scene
from u2net_jax.methods import METHODS, common, streaming, window_ops

MAX = 2047
HL, WL = 23, 19  # MS pixels: odd, so windows end mid-image and at the edges.
STREAMED = sorted(n for n in METHODS if streaming.kind(n) != 'whole-image')


def _scene(seed=0, hl=HL, wl=WL, bands=8):
  rng = np.random.default_rng(seed)
  ms = ndimage.uniform_filter(rng.uniform(100, 1500, (hl, wl, bands)), (3, 3, 1))
  ms = np.round(ms)
  pan = toolbox.interp23tap(ms, 4).mean(axis=2) + rng.normal(0, 30, (4 * hl, 4 * wl))
  return np.clip(np.round(pan), 1, MAX), ms


@pytest.fixture(scope='module')
def scene_arrays():
  pan, ms = _scene()
  return pan, ms, toolbox.interp23tap(ms, 4)


def test_kinds_cover_every_method():
  kinds = {n: streaming.kind(n) for n in METHODS}
  assert kinds['exp'] == 'local'
  assert {n for n, k in kinds.items() if k == 'whole-image'} == {'c-gsa', 'tv', 'sr-d'}


@pytest.mark.parametrize('name', ['bt-h', 'mtf-glp-hpm-h'])
def test_four_band_haze_is_the_exact_percentile(name):
  pan, ms = _scene(bands=4)  # QB: the haze is a fraction of each band's 1st percentile.
  ref = METHODS[name](toolbox.interp23tap(ms, 4), pan, ms, sensor='QB')
  out = streaming.fuse_arrays(name, pan, ms, sensor='QB', window=36)
  assert np.abs(out - ref).max() <= 1e-9 * MAX


@pytest.mark.parametrize('window', [16, 36, 400])
def test_local_method_is_bit_identical_whatever_the_windows(scene_arrays, window):
  pan, ms, lms = scene_arrays
  ref = METHODS['exp'](lms, pan, ms, sensor='WV2')
  out = streaming.fuse_arrays('exp', pan, ms, sensor='WV2', window=window)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize('name', [n for n in STREAMED if n not in ('exp', 'bdsd')])
def test_two_pass_methods_equal_the_whole_image(scene_arrays, name):
  pan, ms, lms = scene_arrays
  ref = METHODS[name](lms, pan, ms, sensor='WV2')
  # 48: four windows, each with two image edges and two sides inside (92 x 76 PAN pixels).
  out = streaming.fuse_arrays(name, pan, ms, sensor='WV2', window=48)
  assert np.abs(out - ref).max() <= 1e-9 * MAX


def test_awlp_local_part_is_bit_identical_given_the_statistics(scene_arrays):
  # Only the image-wide statistics keep AWLP from bit-identity: with the whole image's, the
  # windows (symmetric wavelet padding at the image's edges only) give the same bits.
  pan, ms, lms = scene_arrays
  plan = streaming.make_plan('awlp', sensor='WV2', height=92, width=76, bands=8)
  pan_lr = toolbox.imresize(toolbox.imresize(pan, 1 / 4), 4)
  plan.pan_mean, plan.lr_std = pan.mean(), common.std2(pan_lr)
  plan.ms_mean, plan.ms_std = lms.mean(axis=(0, 1)), common.std2(lms, (0, 1))
  source = window_ops.ArraySource(pan, ms)
  out = np.empty(lms.shape)
  for y0, y1, x0, x1 in streaming.windows(92, 76, 40):
    out[y0:y1, x0:x1] = plan.fuse(source, (y0, y1, x0, x1))
  np.testing.assert_array_equal(out, METHODS['awlp'](lms, pan, ms, sensor='WV2'))


def test_bdsd_fits_one_block_per_image_height():
  # The toolbox's block is the image's height: a 20 x 40 MS holds two 80-pixel blocks, and the
  # windows (36) straddle them; a width that is not a multiple of the height is refused.
  pan, ms = _scene(hl=20, wl=40)
  ref = METHODS['bdsd'](toolbox.interp23tap(ms, 4), pan, ms, sensor='WV2')
  out = streaming.fuse_arrays('bdsd', pan, ms, sensor='WV2', window=36)
  assert np.abs(out - ref).max() <= 1e-9 * MAX
  with pytest.raises(streaming.StreamingError, match='--method=bdsd: block_size: the PAN height'):
    streaming.make_plan('bdsd', sensor='WV2', height=92, width=76, bands=8)


def test_window_operations_read_circular_and_replicate_borders(scene_arrays):
  pan, ms, lms = scene_arrays
  source = window_ops.ArraySource(pan, ms)
  corner = (0, 8, 68, 76)  # Top-right corner: wraps to the bottom and the left.
  np.testing.assert_array_equal(window_ops.lms_window(source, corner, 4), lms[0:8, 68:76])
  gains = toolbox.get_sensor('WV2')['ms_gnyq']
  pans = np.repeat(pan[..., None], 8, axis=2)
  from u2net_jax.methods import multiresolution as mra

  whole = mra.glp_low_pass(pans, gains, 4)
  at = lambda r, c: np.repeat(window_ops.gather(source.pan, r, c)[..., None], 8, axis=2)  # noqa: E731
  part = window_ops.glp_window(at, gains, source, corner, 4)
  assert np.abs(part - whole[0:8, 68:76]).max() < 1e-9


def test_whole_image_methods_run_below_the_limit_and_are_refused_above(scene_arrays):
  pan, ms, lms = scene_arrays
  ref = METHODS['c-gsa'](lms, pan, ms, sensor='WV2')
  np.testing.assert_array_equal(streaming.fuse_arrays('c-gsa', pan, ms, sensor='WV2'), ref)
  with pytest.raises(streaming.StreamingError) as e:
    streaming.make_plan('tv', sensor='WV2', height=92, width=76, bands=8, whole_image_limit=1000)
  message = str(e.value)
  assert message.startswith('--method=tv cannot stream a scene by windows: ')
  assert 'iterations couple every pixel' in message and '--whole_image_limit=1000' in message
  with pytest.raises(streaming.StreamingError, match='--sensor=WV2 has 8 bands; the MS has 4'):
    streaming.make_plan('gs', sensor='WV2', height=8, width=8, bands=4)
  with pytest.raises(streaming.StreamingError, match='--method=nope: unknown method; valid'):
    streaming.make_plan('nope', sensor='WV2', height=8, width=8, bands=8)


# ---------------------------------------------------------------------------------------------
# Through GeoTIFF files.


def _tiffs(folder, pan, ms, **kw):
  pan_path = write_tiff(folder / 'pan.tif', pan.astype(np.uint16), **kw)
  ms_path = write_tiff(folder / 'ms.tif', ms.astype(np.uint16), pixel=4 * PAN_PIXEL, **kw)
  return pan_path, ms_path


def _fuse(method, pan_path, ms_path, out, window=36, **kw):
  fuser = classical_fuser.ClassicalWindowFuser(method, 'WV2')
  options = dict(max_value=MAX, window=window, progress=False, overwrite=True) | kw
  return scene.fuse_files_with(fuser, pan_path, ms_path, out, **options)


def _read(path):
  with rasterio.open(path) as f:
    return f.read().transpose(1, 2, 0), f


@pytest.mark.parametrize('method', ['exp', 'gsa', 'mtf-glp-hpm-r'])
def test_geotiff_scene_equals_the_whole_image_method(scene_arrays, tmp_path, method):
  pan, ms, lms = scene_arrays
  pan_path, ms_path = _tiffs(tmp_path, pan, ms)
  ref = METHODS[method](lms, pan, ms, sensor='WV2')
  result = _fuse(method, pan_path, ms_path, tmp_path / 'f.tif', dtype='float64')
  out, f = _read(tmp_path / 'f.tif')
  assert result['windows'] == 9 and result['nodata_pixels'] == 0
  with rasterio.open(pan_path) as p:
    assert f.crs == p.crs == rasterio.crs.CRS.from_string(CRS) and f.transform == p.transform
  if method == 'exp':
    np.testing.assert_array_equal(out, ref)
  else:
    assert np.abs(out - ref).max() <= 1e-9 * MAX
  # The MS dtype (uint16): the float64 result rounded and clipped, as fuse.py stores networks'.
  _fuse(method, pan_path, ms_path, tmp_path / 'u.tif')
  stored, _ = _read(tmp_path / 'u.tif')
  expected = np.clip(np.rint(ref), 0, 65535)
  if method == 'exp':
    np.testing.assert_array_equal(stored, expected)
  else:  # A value within 1e-9 of k + 0.5 may round either way.
    assert np.abs(stored - expected).max() <= 1


def test_geotiff_nodata_is_written_as_nodata(scene_arrays, tmp_path):
  pan, ms, lms = scene_arrays
  ms_holes = ms.copy()
  ms_holes[5, 7] = 0  # Declared nodata: PAN pixels 20..23 x 28..31 depend on it.
  pan_holes = pan.copy()
  pan_holes[60, 50] = 0
  pan_path, ms_path = _tiffs(tmp_path, pan_holes, ms_holes, nodata=0)
  result = _fuse('exp', pan_path, ms_path, tmp_path / 'f.tif', dtype='float64', nodata=-1.0)
  out, f = _read(tmp_path / 'f.tif')
  bad = np.zeros(pan.shape, bool)
  bad[20:24, 28:32] = bad[60, 50] = True
  assert result['nodata_pixels'] == 17 and f.nodata == -1
  assert (out[bad] == -1).all() and (out[~bad] > 0).all()
  # EXP is local: beyond interp23tap's reach (9 MS pixels, circular) from the hole, the scene
  # without it, bit for bit (MS rows 15..17 are 10..12 rows away both ways round).
  ref = METHODS['exp'](lms, pan, ms, sensor='WV2')
  far = ~bad
  far[:60] = far[72:] = False
  np.testing.assert_array_equal(out[far], ref[far])


def test_statistics_skip_nodata_pixels(scene_arrays, tmp_path):
  # A nodata collar (the left 5 MS columns, their 20 PAN columns): written as nodata, and the
  # image-wide statistics are those of the valid pixels, not of the filled collar.
  pan, ms, _ = scene_arrays
  ms_c, pan_c = ms.copy(), pan.copy()
  ms_c[:, :5], pan_c[:, :20] = 0, 0
  pan_path, ms_path = _tiffs(tmp_path, pan_c, ms_c, nodata=0)
  fuser = classical_fuser.ClassicalWindowFuser('gs', 'WV2')
  options = dict(max_value=MAX, window=48, progress=False)
  result = scene.fuse_files_with(fuser, pan_path, ms_path, tmp_path / 'f.tif', **options)
  assert result['nodata_pixels'] == 92 * 20
  assert (_read(tmp_path / 'f.tif')[0][:, :20] == 0).all()
  valid = pan[:, 20:]
  assert abs(fuser.plan.pan_mean - valid.mean()) < 1e-9
  assert abs(fuser.plan.pan_std - valid.std(ddof=1)) < 1e-9


def test_resume_after_a_stop_writes_the_uninterrupted_file(scene_arrays, tmp_path, monkeypatch):
  # A two-pass method stopped after 3 of 9 windows and resumed: `prepare` recomputes the same
  # statistics, so the file is the uninterrupted run's, byte for byte.
  from scene_test import _interrupted_after

  pan, ms, _ = scene_arrays
  pan_path, ms_path = _tiffs(tmp_path, pan, ms)
  out = tmp_path / 'out' / 'f.tif'
  with monkeypatch.context() as m:
    _interrupted_after(m, 3)
    with pytest.raises(KeyboardInterrupt):
      _fuse('gsa', pan_path, ms_path, out, resume=True)
  result = _fuse('gsa', pan_path, ms_path, out, resume=True)
  assert (result['windows'], result['resumed_windows']) == (9, 3)
  _fuse('gsa', pan_path, ms_path, tmp_path / 'plain.tif')
  assert out.read_bytes() == (tmp_path / 'plain.tif').read_bytes()


# ---------------------------------------------------------------------------------------------
# Slow: the command line, the archive, the real WV2 scene.


@pytest.mark.slow
def test_cli_method_fuses_and_reports_flag_errors_in_one_line(scene_arrays, tmp_path):
  pan, ms, lms = scene_arrays
  pan_path, ms_path = _tiffs(tmp_path, pan, ms)
  args = ['fuse.py', '--method=MTF-GLP', f'--pan={pan_path}', f'--ms={ms_path}']
  done = run_script(*args, '--sensor=WV2', f'--out={tmp_path / "f.tif"}', '--dtype=float64')
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary['shape'] == [92, 76, 8] and summary['windows'] == 1
  out, _ = _read(tmp_path / 'f.tif')
  ref = METHODS['mtf-glp'](lms, pan, ms, sensor='WV2')
  assert np.abs(out - ref).max() <= 1e-9 * MAX
  for flags, message in (
    ([], 'error: --method=MTF-GLP needs --sensor (its MTF gains'),
    (['--sensor=QB'], 'the MS has 8 bands; the model takes 4'),
    (['--sensor=WV2', '--step=3'], 'error: --step chooses a network checkpoint'),
    (['--method=tv', '--sensor=WV2', '--whole_image_limit=1000'], 'error: --method=tv cannot'),
    (['--sensor=WV2', '--workdir=w'], 'error: --sensor goes with --method'),
  ):
    if '--workdir=w' in flags:
      args = [a for a in args if not a.startswith('--method')]
    bad = run_script(*args, *flags, f'--out={tmp_path / "bad.tif"}')
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr, bad.stderr
    assert last.startswith('error: ') and message in last, last
    assert not (tmp_path / 'bad.tif').exists()


@pytest.mark.slow
def test_archive_with_a_method_equals_single_runs(scene_arrays, tmp_path):
  pytest.importorskip('distributed', reason='dask.distributed is not installed')
  from u2net_jax.data import scene_lists
  from u2net_jax.infer import archive

  pan, ms, _ = scene_arrays
  pan2, ms2 = _scene(seed=1, hl=17, wl=25)
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  pairs = [_tiffs(tmp_path / 'a', pan, ms), _tiffs(tmp_path / 'b', pan2, ms2)]
  csv = tmp_path / 'scenes.csv'
  csv.write_text('pan,ms,out\n' + ''.join(f'{p},{m},s{i}.tif\n' for i, (p, m) in enumerate(pairs)))
  scenes = scene_lists.read_scenes(str(csv), str(tmp_path / 'out'))
  engine = archive.Engine(method='awlp', sensor='WV2')
  summary = archive.run(
    scenes, engine, tmp_path / 'out', options={'window': 36}, workers=2, stream=None
  )
  assert summary['done'] == 2 and summary['failed'] == 0, summary
  for i, (p, m) in enumerate(pairs):
    _fuse('awlp', p, m, tmp_path / f'single{i}.tif', cog=True)
    np.testing.assert_array_equal(
      _read(tmp_path / 'out' / f's{i}.tif')[0], _read(tmp_path / f'single{i}.tif')[0]
    )
  assert json.loads((tmp_path / 'out' / 's0.manifest.json').read_text())['engine'] == {
    'method': 'awlp',
    'sensor': 'WV2',
    'kind': 'two-pass',
  }
  # The command line: the same scenes with another method, one worker.
  done = run_script(
    'fuse.py',
    '--method=exp',
    '--sensor=WV2',
    f'--scenes={csv}',
    f'--out_dir={tmp_path / "cli"}',
    '--workers=1',
    '--dashboard_address=:0',
    '--noprogress',
  )
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout.strip().splitlines()[-1])['done'] == 2
  out, _ = _read(tmp_path / 'cli' / 's1.tif')
  np.testing.assert_array_equal(
    out, np.rint(METHODS['exp'](toolbox.interp23tap(ms2, 4), pan2, ms2, sensor='WV2'))
  )


@pytest.mark.slow
@pytest.mark.parametrize('method', ['exp', 'mtf-glp', 'gs'])
def test_real_wv2_scene(tmp_path, method):
  """The real WorldView-2 scene (1280 x 1280 PAN, 320 x 320 x 8 MS, uint16) as GeoTIFFs.

  Not MTF-GLP-HPM: on this scene its divisor (the equalised PAN's low-pass) comes near 0, the
  whole-image output reaches -2e6 and moves by ~1e-5 under rounding-level changes (see
  ../shared/toolbox/README.md, 'Conditioning'); streamed, it agrees to 2e-7 relative there.
  """
  data = scipy.io.loadmat(shared_path('data', 'pnn-wv2-ikonos-geoeye1', 'imgWV2.mat'))
  pan, ms = data['I_PAN'], data['I_MS']
  pan_path, ms_path = _tiffs(tmp_path, pan, ms)
  result = _fuse(method, pan_path, ms_path, tmp_path / 'f.tif', window=512, dtype='float64')
  out, _ = _read(tmp_path / 'f.tif')
  pan, ms = pan.astype(np.float64), ms.astype(np.float64)
  ref = METHODS[method](toolbox.interp23tap(ms, 4), pan, ms, sensor='WV2')
  assert result['windows'] == 9 and result['nodata_pixels'] == 0
  if method == 'exp':
    np.testing.assert_array_equal(out, ref)
  else:
    assert np.abs(out - ref).max() <= 1e-9 * MAX
