"""Tests of the classical methods on scenes by windows (`methods.streaming`, `fuse.py --method`).

On arrays (quick): every streamed method against its whole-image function on an image of odd MS
size (23 x 19), with windows that cut it into interior, edge and corner pieces and one window
holding it whole: bit-identical for the local method (EXP, whose interp23tap borders are
circular), <= 1e-9 of the sensor maximum for the two-pass ones; the whole-image methods below the
limit, and their refusal above it.
"""

import numpy as np
import pytest
from scipy import ndimage

from u2net_jax import toolbox
from u2net_jax.methods import METHODS, streaming

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
  assert {n for n, k in kinds.items() if k == 'whole-image'} == {
    'c-gsa',
    'tv',
    'sr-d',
    'pracs',
    'bdsd',
    'bdsd-pc',
  }
  assert streaming.kind('bt-h', bands=4) == 'whole-image'  # The haze is a percentile on 4 bands.


@pytest.mark.parametrize('window', [16, 36, 400])
def test_local_method_is_bit_identical_whatever_the_windows(scene_arrays, window):
  pan, ms, lms = scene_arrays
  ref = METHODS['exp'](lms, pan, ms, sensor='WV2')
  out = streaming.fuse_arrays('exp', pan, ms, sensor='WV2', window=window)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize('name', [n for n in STREAMED if n != 'exp'])
def test_two_pass_methods_equal_the_whole_image(scene_arrays, name):
  pan, ms, lms = scene_arrays
  ref = METHODS[name](lms, pan, ms, sensor='WV2')
  # 36: windows inside, on each edge and in each corner (92 x 76 PAN pixels).
  out = streaming.fuse_arrays(name, pan, ms, sensor='WV2', window=36)
  assert np.abs(out - ref).max() <= 1e-9 * MAX


def test_window_operations_read_circular_and_replicate_borders(scene_arrays):
  pan, ms, lms = scene_arrays
  source = streaming.ArraySource(pan, ms)
  corner = (0, 8, 68, 76)  # Top-right corner: wraps to the bottom and the left.
  np.testing.assert_array_equal(streaming.lms_window(source, corner, 4), lms[0:8, 68:76])
  gains = toolbox.get_sensor('WV2')['ms_gnyq']
  pans = np.repeat(pan[..., None], 8, axis=2)
  from u2net_jax.methods import multiresolution as mra

  whole = mra.glp_low_pass(pans, gains, 4)
  at = lambda r, c: np.repeat(streaming.gather(source.pan, r, c)[..., None], 8, axis=2)  # noqa: E731
  part = streaming.glp_window(at, gains, source, corner, 4)
  assert np.abs(part - whole[0:8, 68:76]).max() < 1e-9


def test_whole_image_methods_run_below_the_limit_and_are_refused_above(scene_arrays):
  pan, ms, lms = scene_arrays
  ref = METHODS['bdsd-pc'](lms, pan, ms, sensor='WV2')
  np.testing.assert_array_equal(
    streaming.fuse_arrays('bdsd-pc', pan, ms, sensor='WV2', window=36), ref
  )
  with pytest.raises(streaming.StreamingError) as e:
    streaming.make_plan('tv', sensor='WV2', height=92, width=76, bands=8, whole_image_limit=1000)
  message = str(e.value)
  assert message.startswith('--method=tv cannot stream a scene by windows: ')
  assert 'iterations couple every pixel' in message and '--whole_image_limit=1000' in message
  with pytest.raises(streaming.StreamingError, match='--sensor=WV2 has 8 bands; the MS has 4'):
    streaming.make_plan('gs', sensor='WV2', height=8, width=8, bands=4)
  with pytest.raises(streaming.StreamingError, match='--method=nope: unknown method; valid'):
    streaming.make_plan('nope', sensor='WV2', height=8, width=8, bands=8)
