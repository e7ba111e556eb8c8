"""Tests of `u2net_jax.toolbox`: the sensor table and the benchmark toolbox's resampling.

`interp23tap` is checked against the shared reference vectors (`../shared/metrics/`, skipped when
absent); the other tests check the MATLAB conventions (sample phase, imresize geometry, the MTF
kernel's construction and band handling) and the sensor table's consistency.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import sensor_image

from u2net_jax import toolbox

ARRAYS = Path(__file__).resolve().parents[1].parent / 'shared' / 'metrics' / 'metric_vectors.npz'


# ---------------------------------------------------------------------------------------------
# The sensor table.


def test_sensors_and_aliases():
  pansharpening = {n for n, s in toolbox.SENSORS.items() if s['task'] == 'pansharpening'}
  assert pansharpening == {'WV3', 'WV2', 'QB', 'GF2', 'IKONOS', 'GeoEye1'}
  assert {n for n, s in toolbox.SENSORS.items() if s['task'] == 'hisr'} == {'CAVE', 'Harvard'}
  for name, s in toolbox.SENSORS.items():
    assert set(s) >= {'ms_gnyq', 'pan_gnyq', 'max_value'}, name
  assert toolbox.SENSORS['WV3']['ms_gnyq'][0] == 0.325
  assert toolbox.SENSORS['GF2']['max_value'] == 1023
  assert toolbox.get_sensor('ge1') is toolbox.SENSORS['GeoEye1']
  assert toolbox.get_sensor('GeoEye-1') is toolbox.SENSORS['GeoEye1']
  assert toolbox.get_sensor('gf-2') is toolbox.SENSORS['GF2']
  assert toolbox.get_sensor('wv3') is toolbox.SENSORS['WV3']
  assert toolbox.get_sensor('cave') is toolbox.SENSORS['CAVE']
  assert toolbox.get_sensor('harvard') is toolbox.SENSORS['Harvard']
  with pytest.raises(ValueError, match='valid names'):
    toolbox.get_sensor('Landsat')


@pytest.mark.parametrize(
  'name,bands,max_value,guide',
  [
    ('WV3', 8, 2047, 1),
    ('WV2', 8, 2047, 1),
    ('QB', 4, 2047, 1),
    ('IKONOS', 4, 2047, 1),
    ('GeoEye1', 4, 2047, 1),
    ('GF2', 4, 1023, 1),
    ('CAVE', 31, 1.0, 3),
    ('Harvard', 31, 1.0, 3),
  ],
)
def test_sensor_table_entries_are_consistent(name, bands, max_value, guide):
  s = toolbox.SENSORS[name]
  assert s['name'] == name
  assert (s['bands'], s['max_value'], s['guide_bands']) == (bands, max_value, guide)
  assert s['task'] in toolbox.TASKS
  assert len(s['rgb_bands']) == 3 and all(0 <= b < bands for b in s['rgb_bands'])
  if s['task'] == 'pansharpening':
    assert len(s['ms_gnyq']) == bands and all(0 < g < 1 for g in s['ms_gnyq'])
    assert 0 < s['pan_gnyq'] < 1
  else:
    assert s['ms_gnyq'] is None and s['pan_gnyq'] is None


# ---------------------------------------------------------------------------------------------
# Resampling and MTF helpers.


@pytest.mark.skipif(not ARRAYS.exists(), reason=f'{ARRAYS} not found (no ../shared)')
def test_interp23tap_reproduces_the_shared_lms():
  # The vectors' `lms` is the toolbox's interp23tap of the 32x32 WV3 MS.
  with np.load(ARRAYS) as npz:
    ms, lms_ref = npz['fr_wv3_ms'], npz['fr_wv3_lms']
  lms = toolbox.interp23tap(ms, ratio=4)
  np.testing.assert_allclose(lms, lms_ref, rtol=0, atol=1e-9)


def test_interp23tap_shapes_and_constant():
  x = np.full((8, 6, 3), 123.0)
  y = toolbox.interp23tap(x, ratio=4)
  assert y.shape == (32, 24, 3)
  # The CDF23 coefficients are printed to 12 decimals: the odd taps sum to 1 - 4e-10, so a
  # constant comes back to ~1e-9 (as in MATLAB).
  np.testing.assert_allclose(y, 123.0, rtol=1e-8)
  assert toolbox.interp23tap(x[:, :, 0], ratio=2).shape == (16, 12)


def test_interp23tap_keeps_the_samples_at_the_toolbox_phase():
  # The 23-tap kernel interpolates (its even taps are 0 but the centre's 1): the samples come
  # back where MATLAB puts them, I(2:2:end) at x2 (0-based 1, 3, ...), then I(1:2:end) at x4,
  # so rows and columns 2 mod 4.
  x = sensor_image(16, 16, 2, seed=12)
  y = toolbox.interp23tap(x, ratio=4)
  np.testing.assert_allclose(y[2::4, 2::4], x, rtol=1e-13)


def test_imresize_matches_matlab_geometry():
  # MATLAB's antialiased bicubic reproduces a linear ramp away from the borders, at the output
  # sample positions u = x / scale + (1 - 1/scale) / 2 (1-based).
  ramp = np.arange(1, 65, dtype=float)[:, None] * np.ones((1, 40))
  y = toolbox.imresize(ramp, 0.25)
  assert y.shape == (16, 10)
  u = np.arange(1, 17) / 0.25 + 0.5 * (1 - 4)
  np.testing.assert_allclose(y[3:-3, 5], u[3:-3], rtol=1e-12)
  np.testing.assert_allclose(toolbox.imresize(np.full((9, 7, 2), 5.0), 0.5), 5.0, rtol=1e-12)


def test_mtf_kernel_construction():
  h = toolbox.mtf_kernel(0.3, ratio=4)
  assert h.shape == (41, 41)
  np.testing.assert_allclose(h, h.T, atol=1e-15)
  np.testing.assert_allclose(h, h[::-1, ::-1], atol=1e-15)
  # fwind1 leaves the sum slightly under 1, as in the toolbox.
  assert 0.998 < h.sum() < 0.999
  assert toolbox.mtf_kernel(0.3, normalize=True).sum() == pytest.approx(1, abs=1e-14)
  # Frequency response near the MS Nyquist frequency (1/8 cycle/pixel) close to the gain.
  m = np.arange(41) - 20
  response = np.sum(h.sum(axis=0) * np.cos(2 * np.pi * m / 8))
  assert response == pytest.approx(0.3, abs=0.025)
  # Lower gain, narrower passband.
  assert np.sum(toolbox.mtf_kernel(0.15).sum(0) * np.cos(2 * np.pi * m / 8)) < response


def test_mtf_filter_band_handling():
  x = sensor_image(48, 40, 4, seed=13)
  gains = toolbox.get_sensor('QB')['ms_gnyq']
  y = toolbox.mtf_filter(x, gains)
  assert y.shape == x.shape
  for k in range(4):
    np.testing.assert_allclose(toolbox.mtf_filter(x[:, :, k], gains[k]), y[:, :, k], rtol=1e-12)
  # Replicate borders: a constant image stays constant (times the kernel's sum).
  flat = toolbox.mtf_filter(np.full((30, 30), 10.0), 0.3)
  np.testing.assert_allclose(flat, 10.0 * toolbox.mtf_kernel(0.3).sum(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_clear_errors():
  x = sensor_image(64, 64, 4)
  with pytest.raises(ValueError, match='ratio: must be a power of two'):
    toolbox.interp23tap(x, ratio=3)
  with pytest.raises(ValueError, match='expected H x W x C or H x W'):
    toolbox.imresize(np.ones(5), 0.5)
  with pytest.raises(ValueError, match='gnyq: must lie in'):
    toolbox.mtf_kernel(1.5)
  with pytest.raises(ValueError, match='gnyq: 3 gains for an image with 4 bands'):
    toolbox.mtf_filter(x, [0.3, 0.3, 0.3])
  nan = x.copy()
  nan[3, 3, 1] = np.nan
  with pytest.raises(ValueError, match='image: contains 1 NaN/Inf'):
    toolbox.mtf_filter(nan, 0.3)


def test_the_data_package_degrades_images_without_the_metrics():
  # Wald's protocol and the demo data use the toolbox directly: importing them must not bring in
  # the metrics (nor jax).
  code = (
    'import sys, u2net_jax.data.wald, u2net_jax.data.demo; '
    "print(sorted(m for m in sys.modules if m.startswith('u2net_jax.metrics') or m == 'jax'))"
  )
  repo = Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, '-c', code], cwd=repo, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'
