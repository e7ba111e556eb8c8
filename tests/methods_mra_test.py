"""Tests of `u2net_jax.methods.multiresolution` and `.variational`: equal to the MATLAB toolbox.

AWLP, MTF-GLP, -FS, -HPM, -HPM-H, -HPM-R, TV and SR-D against the toolbox's own outputs (GNU
Octave running the unmodified MATLAB code):
- on the shared WV2 references (`../shared/toolbox/refs`, skipped when absent): the full output
  of `wv2_rr_sample_0`, corners and per-band statistics of `wv2_rr_sample_1` and
  `wv2_fr_sample_0`;
- on the references in `tests/data/toolbox/mra_*.npz` (always run), made by
  `tests/data/toolbox/make_mra_refs.py`: an odd, non-square crop (PAN 84 x 92, MS 21 x 23) of
  WV3 and 64 x 64 crops for IKONOS, GeoEye1, QB and GF-2 (10-bit).
The tolerance is 1e-9 of the sensor's maximum at every pixel (1e-6 for TV, which iterates).
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from u2net_jax import methods, toolbox
from u2net_jax.methods import multiresolution as mra
from u2net_jax.methods import variational as var

DATA = Path(__file__).resolve().parent / 'data' / 'toolbox'
# Our name -> the toolbox references' file name.
NAMES = {
  'awlp': 'AWLP',
  'mtf-glp': 'MTF-GLP',
  'mtf-glp-fs': 'MTF-GLP-FS',
  'mtf-glp-hpm': 'MTF-GLP-HPM',
  'mtf-glp-hpm-h': 'MTF-GLP-HPM-H',
  'mtf-glp-hpm-r': 'MTF-GLP-HPM-R',
  'sr-d': 'SR-D',
  'tv': 'TV',
}
GENERATED = sorted(p.stem[len('mra_') :] for p in DATA.glob('mra_*.npz'))


def _tolerance(name: str, max_value: float) -> float:
  return (1e-6 if name == 'tv' else 1e-9) * max_value


def _check_summary(out, ref, prefix, tol):
  """Compares corners (`out_tl`, `out_br`) and per-band statistics with a reference."""
  k = ref[prefix + 'out_tl'].shape[0]
  np.testing.assert_allclose(out[:k, :k], ref[prefix + 'out_tl'], rtol=0, atol=tol)
  np.testing.assert_allclose(out[-k:, -k:], ref[prefix + 'out_br'], rtol=0, atol=tol)
  n = out.shape[0] * out.shape[1]
  np.testing.assert_allclose(out.min(axis=(0, 1)), ref[prefix + 'band_min'], rtol=0, atol=tol)
  np.testing.assert_allclose(out.max(axis=(0, 1)), ref[prefix + 'band_max'], rtol=0, atol=tol)
  np.testing.assert_allclose(out.sum(axis=(0, 1)), ref[prefix + 'band_sum'], rtol=0, atol=n * tol)
  big = np.abs(out).max()
  sumsq = (out * out).sum(axis=(0, 1))
  np.testing.assert_allclose(sumsq, ref[prefix + 'band_sumsq'], rtol=0, atol=2 * big * n * tol)


# ---------------------------------------------------------------------------------------------
# The shared WV2 references.


def _shared_input(name: str):
  import h5py

  kind, index = name.rsplit('_', 1)
  path = shared_path('official', f'{kind[: -len("_sample")]}_sample.h5')
  with h5py.File(path, 'r') as f:
    i = int(index)
    ms = np.asarray(f['ms'][i], np.float64).transpose(1, 2, 0)
    lms = np.asarray(f['lms'][i], np.float64).transpose(1, 2, 0)
    pan = np.asarray(f['pan'][i, 0], np.float64)
  return lms, pan, ms


@pytest.mark.parametrize('name', sorted(NAMES))
def test_shared_wv2_rr_sample_0_full_output(name):
  ref = np.load(shared_path('toolbox', 'refs', 'wv2_rr_sample_0', NAMES[name] + '.npz'))['out']
  lms, pan, ms = _shared_input('wv2_rr_sample_0')
  out = methods.METHODS[name](lms, pan, ms, sensor='WV2', ratio=4)
  assert out.shape == ref.shape and out.dtype == np.float64
  np.testing.assert_allclose(out, ref, rtol=0, atol=_tolerance(name, 2047))


@pytest.mark.parametrize(
  'name,sample',
  [
    # TV and SR-D (the slowest) are checked in full on wv2_rr_sample_0 in the quick subset.
    pytest.param(n, s, marks=pytest.mark.slow if n in ('tv', 'sr-d') else ())
    for s in ('wv2_rr_sample_1', 'wv2_fr_sample_0')
    for n in sorted(NAMES)
  ],
)
def test_shared_wv2_corners_and_band_statistics(name, sample):
  ref = np.load(shared_path('toolbox', 'refs', sample, NAMES[name] + '.npz'))
  lms, pan, ms = _shared_input(sample)
  out = methods.METHODS[name](lms, pan, ms, sensor='WV2', ratio=4)
  assert out.shape == tuple(ref['shape'])
  _check_summary(out, ref, '', _tolerance(name, 2047))


# ---------------------------------------------------------------------------------------------
# The generated references: other sensors, odd sizes.


@pytest.fixture(scope='module', params=GENERATED)
def generated(request):
  ref = np.load(DATA / f'mra_{request.param}.npz')
  ms = ref['ms'].astype(np.float64)
  # The references were made with this I_MS (make_mra_refs.py), so the inputs are exact.
  return ref, toolbox.interp23tap(ms, int(ref['ratio'])), ref['pan'].astype(np.float64), ms


def test_generated_references_cover_the_sensors_and_an_odd_size():
  sensors = {str(np.load(DATA / f'mra_{g}.npz')['sensor']) for g in GENERATED}
  assert sensors == {'WV3', 'IKONOS', 'GeoEye1', 'QB', 'GF2'}
  assert np.load(DATA / 'mra_wv3_84x92.npz')['ms'].shape == (21, 23, 8)
  assert sum(p.stat().st_size for p in DATA.glob('mra_*.npz')) < 2_000_000


@pytest.mark.parametrize('name', sorted(NAMES))
def test_generated_references(generated, name):
  ref, lms, pan, ms = generated
  sensor = toolbox.get_sensor(str(ref['sensor']))
  if f'{NAMES[name]}/out_tl' not in ref:
    # The toolbox demo has no TV parameters for this sensor: refused here too.
    assert name == 'tv' and sensor['tv'] is None
    with pytest.raises(ValueError, match='no TV parameters'):
      methods.METHODS[name](lms, pan, ms, sensor=sensor['name'])
    return
  out = methods.METHODS[name](lms, pan, ms, sensor=sensor['name'], ratio=int(ref['ratio']))
  assert out.shape == lms.shape
  _check_summary(out, ref, NAMES[name] + '/', _tolerance(name, sensor['max_value']))


# ---------------------------------------------------------------------------------------------
# Interface, options and refusals.


def _small(bands=4, h=32, w=40, seed=0):
  rng = np.random.default_rng(seed)
  ms = rng.uniform(100, 1000, (h // 4, w // 4, bands))
  lms = toolbox.interp23tap(ms, 4)
  pan = lms.mean(axis=2) + rng.normal(0, 20, (h, w))
  return lms, pan, ms


def test_registry_and_halo():
  for name in NAMES:
    assert name in methods.METHODS
  assert mra.halo('awlp') == 8
  assert mra.halo('mtf-glp') == mra.halo('mtf-glp-hpm-h') == 56  # 20 + 33, aligned to 4
  assert var.halo('tv') is None and var.halo('sr-d') is None
  with pytest.raises(ValueError, match='name'):
    mra.halo('tv')


@pytest.mark.parametrize('name', sorted(NAMES))
def test_refusals(name):
  fn = methods.METHODS[name]
  lms, pan, ms = _small()
  with pytest.raises(ValueError, match='lms: sensor IKONOS has 4 bands'):
    fn(lms[:, :, :3], pan, ms[:, :, :3], sensor='IKONOS')
  with pytest.raises(ValueError, match='multiples of ratio'):
    fn(lms[:30], pan[:30], ms, sensor='IKONOS')
  with pytest.raises(ValueError, match='pan'):
    fn(lms, np.stack([pan, pan], 2), ms, sensor='IKONOS')
  with pytest.raises(ValueError, match='sensor'):
    fn(lms, pan, ms, sensor='CAVE')
  with pytest.raises(ValueError, match='NaN'):
    fn(np.where(lms > 500, np.nan, lms), pan, ms, sensor='IKONOS')
  if name in ('tv', 'sr-d'):
    with pytest.raises(ValueError, match='ms_lr: expected shape'):
      fn(lms, pan, ms[:-1], sensor='IKONOS')


def test_tv_parameters_and_quirk_options():
  lms, pan, ms = _small()
  with pytest.raises(ValueError, match='no TV parameters for QB'):
    var.tv(lms, pan, ms, sensor='QB')
  params = dict(toolbox.SENSORS['IKONOS']['tv'])
  params['lam'] = params.pop('lambda')
  np.testing.assert_array_equal(
    var.tv(lms, pan, ms, sensor='QB', **params), var.tv(lms, pan, ms, sensor='IKONOS')
  )
  with pytest.raises(ValueError, match='ratio'):
    var.tv(lms, pan, lms[::2, ::2], sensor='IKONOS', ratio=2)
  with pytest.raises(ValueError, match='w: expected 4'):
    var.tv(lms, pan, ms, sensor='IKONOS', w=(0.5, 0.5))
  # With 4 bands the toolbox's pairing (z(:, :, i + 4)) is the right one.
  np.testing.assert_array_equal(
    var.tv(lms, pan, ms, sensor='IKONOS', fix_pairing=True), var.tv(lms, pan, ms, sensor='IKONOS')
  )
  lms8, pan8, ms8 = _small(bands=8)
  base = var.tv(lms8, pan8, ms8, sensor='WV3', maxiter=5)
  assert not np.allclose(var.tv(lms8, pan8, ms8, sensor='WV3', maxiter=5, fix_pairing=True), base)
  fixed = var.tv(lms8, pan8, ms8, sensor='WV3', maxiter=5, fix_majorizer=True)
  assert np.isfinite(fixed).all() and not np.allclose(fixed, base)


def test_sr_d_and_hpm_h_options():
  lms, pan, ms = _small()
  one = var.sr_d(lms, pan, ms, sensor='IKONOS', n_atoms=1)
  assert not np.allclose(one, var.sr_d(lms, pan, ms, sensor='IKONOS'))
  with pytest.raises(ValueError, match='at least ts=7'):
    var.sr_d(lms[:24, :24], pan[:24, :24], None, sensor='IKONOS')
  with pytest.raises(ValueError, match='ts, ol'):
    var.sr_d(lms, pan, ms, sensor='IKONOS', ts=4, ol=4)
  no_dec = mra.mtf_glp_hpm_h(lms, pan, sensor='IKONOS', decimation=False)
  assert not np.allclose(no_dec, mra.mtf_glp_hpm_h(lms, pan, sensor='IKONOS'))
  # AWLP uses no sensor fact.
  np.testing.assert_array_equal(mra.awlp(lms, pan), mra.awlp(lms, pan, sensor='IKONOS'))


def test_resize_kernels_match_matlab_conventions():
  x = np.arange(64.0).reshape(8, 8)
  np.testing.assert_array_equal(toolbox.imresize(x, 0.25, 'nearest'), x[2::4, 2::4])
  # Bilinear: antialiased when shrinking (8 taps), flat images stay flat, 4x up interpolates.
  np.testing.assert_allclose(toolbox.imresize(np.full((12, 8), 3.0), 0.25, 'bilinear'), 3.0)
  up = toolbox.imresize(np.array([[0.0, 4.0]]), 4, 'bilinear')
  np.testing.assert_allclose(up[0], [0, 0, 0.5, 1.5, 2.5, 3.5, 4, 4])
  with pytest.raises(ValueError, match='method'):
    toolbox.imresize(x, 0.5, 'lanczos3')
  k = toolbox.lp_filter_gauss_kernel(4)
  assert k.shape == (41, 41) and not np.allclose(k, toolbox.mtf_kernel(0.3, 4))


@pytest.mark.parametrize('name', ['awlp', 'mtf-glp'])
def test_halo_reproduces_the_interior(name):
  # The local part on a window extended by the halo equals the whole image's in the interior
  # (to rounding: the MTF filters are FFT convolutions, whose rounding depends on the size).
  x = np.random.default_rng(0).normal(0, 100, (184, 192, 1))
  low = {
    'awlp': lambda a: mra.awlp_low_pass(a, 2),
    'mtf-glp': lambda a: mra.glp_low_pass(a, [0.3], 4),
  }[name]
  h, (r0, c0, rows, cols) = mra.halo(name), (56, 60, 64, 72)
  window = low(x[r0 - h : r0 + rows + h, c0 - h : c0 + cols + h])[h:-h, h:-h]
  np.testing.assert_allclose(window, low(x)[r0 : r0 + rows, c0 : c0 + cols], rtol=0, atol=1e-11)
