"""methods.window_ops' fast kernels equal the toolbox's operations (issue 22): interp23tap bit
for bit (any crop), the decimated MTF filter to rounding."""

import numpy as np
import pytest
from scipy import signal

from u2net_jax import toolbox
from u2net_jax.methods import window_ops


@pytest.mark.parametrize('ratio', [2, 4, 8])
@pytest.mark.parametrize('shape', [(1, 1, 3), (7, 9, 4), (17, 23), (20, 18, 8)])
def test_interp23tap_is_the_toolbox_s_bit_for_bit_on_any_crop(shape, ratio):
  rng = np.random.default_rng(0)
  x = rng.random(shape) * 2047
  ref = toolbox.interp23tap(x, ratio)
  np.testing.assert_array_equal(window_ops.interp23tap(x, ratio), ref)
  h, w = ref.shape[:2]
  for _ in range(4):
    y0, x0 = rng.integers(0, h), rng.integers(0, w)
    y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
    crop = window_ops.interp23tap(x, ratio, (y0, y1, x0, x1))
    np.testing.assert_array_equal(crop, ref[y0:y1, x0:x1])


@pytest.mark.parametrize('shape', [(61, 45), (85, 130)])
def test_filter_decimate_is_fftconvolve_then_decimation(shape):
  x = np.random.default_rng(1).random(shape) * 2047
  kernels = window_ops.mtf_kernels(tuple(toolbox.get_sensor('WV2')['ms_gnyq']), 4)
  bands = np.repeat(x[..., None], 8, axis=2)
  ref = signal.fftconvolve(bands, kernels, mode='valid', axes=(0, 1))[::4, ::4]
  out = window_ops._filter_decimate(x, kernels, 4)
  assert out.shape == ref.shape
  assert np.abs(out - ref).max() <= 1e-12 * 2047
