"""Tests of `u2net_jax.metrics` against the benchmark toolbox's reference values.

The reference values live in `../shared/metrics/` (real WV2, IKONOS, WV3 and Hyperion data, values
computed with the toolbox's conventions); those tests skip when `../shared` is absent (a fresh
clone). The other tests check the invariants of the definitions and compare the vectorised code
with literal, loop-by-loop transcriptions of the MATLAB functions on small real or synthetic images.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sensor_image

from u2net_jax import metrics
from u2net_jax.metrics import reference

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
VECTORS = SHARED / 'metrics' / 'metric_vectors.json'
ARRAYS = SHARED / 'metrics' / 'metric_vectors.npz'

# The toolbox's metrics must be reproduced to 1e-9 relative; the two that depend on the MTF
# kernel (not verified against MATLAB's fwind1) to 1e-3.
RTOL = 1e-9
RTOL_MTF = 1e-3


def _load_vectors():
  if not (VECTORS.exists() and ARRAYS.exists()):
    return None, None
  with VECTORS.open() as f:
    cases = json.load(f)['cases']
  with np.load(ARRAYS) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return cases, arrays


CASES, ARRAYS_ = _load_vectors()
needs_shared = pytest.mark.skipif(
  CASES is None, reason=f'reference vectors not found under {SHARED / "metrics"} (no ../shared)'
)


def _case(name):
  (case,) = [c for c in CASES if c['name'] == name]
  return case, [ARRAYS_[a] for a in case['arrays']]


_RR = {
  'psnr_unit_range': lambda r, o: metrics.psnr(r / 2047, o / 2047, data_range=1.0),
  'sam_deg': metrics.sam,
  'ergas': lambda r, o: metrics.ergas(r, o, ratio=4),
  'q2n': lambda r, o: metrics.q2n(r, o, block=32, shift=32),
  'q_avg': lambda r, o: metrics.q_index(r, o, block=32),
  'scc': metrics.scc,
}
_FR = {
  'd_lambda': lambda f, l, p: metrics.d_lambda(f, l, block=32),
  'd_s': lambda f, l, p: metrics.d_s(f, l, p, ratio=4, block=32),
  'qnr': lambda f, l, p: metrics.qnr(f, l, p, ratio=4, block=32),
  'd_lambda_k': lambda f, l, p: metrics.d_lambda_k(f, l, 'WV3', ratio=4),
  'hqnr': lambda f, l, p: metrics.hqnr(f, l, p, 'WV3', ratio=4),
}
_HISR = {
  'psnr': metrics.psnr,
  'ssim': metrics.ssim,
  'sam_deg': metrics.sam,
  'ergas': lambda r, o: metrics.ergas(r, o, ratio=4),
}
_FUNCS = {'reduced_resolution': _RR, 'full_resolution': _FR, 'hisr': _HISR}


def _vector_params():
  if CASES is None:
    return [pytest.param(None, None, marks=needs_shared)]
  return [pytest.param(c['name'], k, id=f'{c["name"]}-{k}') for c in CASES for k in c['expected']]


# ---------------------------------------------------------------------------------------------
# The shared reference vectors.


@pytest.mark.parametrize('case_name,metric', _vector_params())
def test_reference_vectors(case_name, metric):
  case, arrays = _case(case_name)
  expected = case['expected'][metric]
  got = _FUNCS[case['kind']][metric](*arrays)
  rtol = RTOL_MTF if metric in ('d_lambda_k', 'hqnr') else RTOL
  assert got == pytest.approx(expected, rel=rtol, abs=0)


@needs_shared
def test_reduced_resolution_protocol_without_crop_matches_vectors():
  case, (ref, out) = _case('rr8')
  got = metrics.reduced_resolution_metrics(ref, out, max_value=2047, crop=0)
  exp = case['expected']
  names = {
    'PSNR': 'psnr_unit_range',
    'Q2n': 'q2n',
    'Q_avg': 'q_avg',
    'SAM': 'sam_deg',
    'ERGAS': 'ergas',
    'SCC': 'scc',
  }
  assert list(got) == list(names)
  for key, ref_key in names.items():
    assert got[key] == pytest.approx(exp[ref_key], rel=RTOL), key


@needs_shared
def test_reduced_resolution_protocol_crops_like_the_toolbox():
  _, (ref, out) = _case('rr8')
  got = metrics.reduced_resolution_metrics(ref, out, max_value=2047, crop=21)
  # MATLAB I(21:end-21, 21:end-21): 128 -> 87 pixels; PSNR stays on the whole image.
  ref_c, out_c = ref[20:-21, 20:-21], out[20:-21, 20:-21]
  assert ref_c.shape[:2] == (87, 87)
  assert got['PSNR'] == metrics.psnr(ref / 2047, out / 2047)
  assert got['SAM'] == metrics.sam(ref_c, out_c)
  assert got['Q2n'] == metrics.q2n(ref_c, out_c)
  assert got['Q_avg'] == metrics.q_index(ref_c, out_c)
  assert got['ERGAS'] == metrics.ergas(ref_c, out_c)
  assert got['SCC'] == metrics.scc(ref_c, out_c)


@needs_shared
def test_full_resolution_protocol_matches_vectors():
  case, (fused, lms, pan) = _case('fr_wv3')
  got = metrics.full_resolution_metrics(fused, lms, pan, 'WV3')
  exp = case['expected']
  assert list(got) == ['D_lambda', 'D_s', 'QNR', 'D_lambda_K', 'HQNR']
  assert got['D_lambda'] == pytest.approx(exp['d_lambda'], rel=RTOL)
  assert got['D_s'] == pytest.approx(exp['d_s'], rel=RTOL)
  assert got['QNR'] == pytest.approx(exp['qnr'], rel=RTOL)
  assert got['D_lambda_K'] == pytest.approx(exp['d_lambda_k'], rel=RTOL_MTF)
  assert got['HQNR'] == pytest.approx(exp['hqnr'], rel=RTOL_MTF)
  assert got['QNR'] == pytest.approx((1 - got['D_lambda']) * (1 - got['D_s']), rel=1e-15)
  assert got['HQNR'] == pytest.approx((1 - got['D_lambda_K']) * (1 - got['D_s']), rel=1e-15)


@needs_shared
def test_hisr_protocol_matches_vectors():
  case, (ref, out) = _case('hisr31')
  got = metrics.hisr_metrics(ref, out, ratio=4)
  exp = case['expected']
  assert list(got) == ['PSNR', 'SSIM', 'SAM', 'ERGAS']
  for key in got:
    ref_key = 'sam_deg' if key == 'SAM' else key.lower()
    assert got[key] == pytest.approx(exp[ref_key], rel=RTOL), key


# ---------------------------------------------------------------------------------------------
# Invariants.


def test_identical_images_give_ideal_values():
  x = sensor_image(64, 64, 8)
  assert metrics.psnr(x / 2047, x / 2047) == math.inf
  assert metrics.sam(x, x) == pytest.approx(0, abs=1e-6)
  assert metrics.ergas(x, x) == 0
  assert metrics.q2n(x, x) == pytest.approx(1, abs=1e-12)
  assert metrics.q_index(x, x) == pytest.approx(1, abs=1e-12)
  assert metrics.scc(x, x) == pytest.approx(1, abs=1e-12)
  assert metrics.ssim(x / 2047, x / 2047) == pytest.approx(1, abs=1e-12)
  assert metrics.d_lambda(x, x) == 0


def test_identical_flat_images_give_ideal_values():
  # Flat windows and blocks take the toolbox's special cases, not 0/0.
  x = np.full((64, 64, 4), 700.0)
  assert metrics.q2n(x, x) == pytest.approx(1, abs=1e-12)
  assert metrics.q_index(x, x) == 1
  assert metrics.d_lambda(x, x) == 0


def test_sam_is_scale_invariant():
  ref, out = sensor_image(32, 32, 8, seed=1), sensor_image(32, 32, 8, seed=2)
  base = metrics.sam(ref, out)
  assert base > 1
  assert metrics.sam(ref, 3.5 * out) == pytest.approx(base, rel=1e-12)
  assert metrics.sam(0.25 * ref, out) == pytest.approx(base, rel=1e-12)


def test_sam_skips_zero_pixels():
  ref, out = sensor_image(16, 16, 4, seed=1), sensor_image(16, 16, 4, seed=2)
  ref_z, out_z = ref.copy(), out.copy()
  ref_z[0, :5] = 0
  out_z[3, 3] = 0
  keep = np.ones((16, 16), bool)
  keep[0, :5] = keep[3, 3] = False
  exp = metrics.sam(ref[keep][None], out[keep][None])
  assert metrics.sam(ref_z, out_z) == pytest.approx(exp, rel=1e-13)


def test_qnr_is_the_product_of_its_distortions():
  lms = sensor_image(64, 64, 4, seed=3)
  fused = lms + sensor_image(64, 64, 4, seed=4, smooth=False) * 0.05
  pan = lms.mean(axis=2) + 5 * np.sin(np.arange(64))[:, None]
  dl = metrics.d_lambda(fused, lms)
  ds = metrics.d_s(fused, lms, pan)
  assert metrics.qnr(fused, lms, pan) == pytest.approx((1 - dl) * (1 - ds), rel=1e-15)
  dlk = metrics.d_lambda_k(fused, lms, 'QB')
  assert metrics.hqnr(fused, lms, pan, 'QB') == pytest.approx((1 - dlk) * (1 - ds), rel=1e-15)
  assert 0 < dl < 1 and 0 < ds < 1 and 0 < dlk < 1


# ---------------------------------------------------------------------------------------------
# Q2n and Q_avg against literal transcriptions of the MATLAB code.


def _onion_mult_loop(x, y):
  """`onion_mult.m`, literally, on 1-D vectors."""
  n = len(x)
  if n == 1:
    return x * y
  half = n // 2
  a, b, c, d = x[:half], x[half:].copy(), y[:half], y[half:].copy()
  b[1:], d[1:] = -b[1:], -d[1:]
  if n == 2:
    return np.array([a[0] * c[0] - d[0] * b[0], a[0] * d[0] + c[0] * b[0]])
  conj = lambda v: np.concatenate([v[:1], -v[1:]])
  r1 = _onion_mult_loop(a, c)
  r2 = _onion_mult_loop(d, conj(b))
  r3 = _onion_mult_loop(conj(a), d)
  r4 = _onion_mult_loop(c, b)
  return np.concatenate([r1 - r2, r3 + r4])


def _onions_quality_loop(dat1, dat2, size):
  """`onions_quality.m`, band by band and pixel by pixel (on a size x size x 2^n block)."""
  dat1, dat2 = dat1.astype(float).copy(), dat2.astype(float).copy()
  dat2[:, :, 1:] = -dat2[:, :, 1:]
  n3 = dat1.shape[2]
  for i in range(n3):
    s, t = dat1[:, :, i].mean(), dat1[:, :, i].std(ddof=1)
    t = t if t != 0 else np.finfo(float).eps
    dat1[:, :, i] = (dat1[:, :, i] - s) / t + 1
    if s == 0:
      dat2[:, :, i] = dat2[:, :, i] - s + 1 if i == 0 else -(-dat2[:, :, i] - s + 1)
    else:
      dat2[:, :, i] = (dat2[:, :, i] - s) / t + 1 if i == 0 else -((-dat2[:, :, i] - s) / t + 1)
  m1 = np.array([dat1[:, :, i].mean() for i in range(n3)])
  m2 = np.array([dat2[:, :, i].mean() for i in range(n3)])
  mod_q1m, mod_q2m = np.sqrt(np.sum(m1**2)), np.sqrt(np.sum(m2**2))
  mod_q1, mod_q2 = np.sqrt(np.sum(dat1**2, axis=2)), np.sqrt(np.sum(dat2**2, axis=2))
  n = size * size
  termine2 = mod_q1m * mod_q2m
  termine4 = mod_q1m**2 + mod_q2m**2
  int1 = n / (n - 1) * np.mean(mod_q1**2)
  int2 = n / (n - 1) * np.mean(mod_q2**2)
  termine3 = int1 + int2 - n / (n - 1) * (mod_q1m**2 + mod_q2m**2)
  mean_bias = 2 * termine2 / termine4
  if termine3 == 0:
    q = np.zeros(n3)
    q[-1] = mean_bias
    return q
  qu = np.zeros_like(dat1)
  for r in range(size):
    for c in range(size):
      qu[r, c] = _onion_mult_loop(dat1[r, c], dat2[r, c])
  qm = _onion_mult_loop(m1, m2)
  qv = np.array([n / (n - 1) * qu[:, :, i].mean() for i in range(n3)])
  return (qv - n / (n - 1) * qm) * mean_bias * (2 / termine3)


def _matlab_uint16(x):
  """MATLAB uint16(): np.round, except that ties go away from zero; saturated."""
  r = np.round(x)
  tie = x - np.floor(x) == 0.5
  r[tie] = np.floor(x[tie]) + 1
  return np.clip(r, 0, 65535)


def _q2n_loop(ref, out, block, shift):
  """`q2n.m`, literally: mirror padding, uint16, band padding, block loop."""
  n1, n2, n3 = ref.shape
  stepx, stepy = math.ceil(n1 / shift), math.ceil(n2 / shift)
  est1, est2 = (stepx - 1) * shift + block - n1, (stepy - 1) * shift + block - n2

  def pad(a):
    b = np.zeros((n1 + est1, n2 + est2, n3))
    b[:n1, :n2] = a
    for j in range(est2):
      b[:, n2 + j] = b[:, n2 - 1 - j]
    for j in range(est1):
      b[n1 + j, :] = b[n1 - 1 - j, :]
    return b

  ref, out = _matlab_uint16(pad(ref)), _matlab_uint16(pad(out))
  nb = 2 ** math.ceil(math.log2(n3))
  ref = np.concatenate([ref, np.zeros(ref.shape[:2] + (nb - n3,))], axis=2)
  out = np.concatenate([out, np.zeros(out.shape[:2] + (nb - n3,))], axis=2)
  values = np.zeros((stepx, stepy))
  for j in range(stepx):
    for i in range(stepy):
      rs, cs = slice(j * shift, j * shift + block), slice(i * shift, i * shift + block)
      q = _onions_quality_loop(ref[rs, cs], out[rs, cs], block)
      values[j, i] = np.sqrt(np.sum(q**2))
  return values.mean()


@pytest.mark.parametrize(
  'shape,block',
  [
    ((32, 32, 4), 16),  # Q4 on whole blocks
    ((40, 40, 8), 16),  # Q8 on a size that needs mirror padding
    ((37, 21, 3), 16),  # 3 bands zero-padded to 4; rectangular, padded both ways
    ((24, 24, 5), 8),  # 5 bands zero-padded to 8
  ],
)
def test_q2n_matches_literal_transcription(shape, block):
  ref = np.round(sensor_image(*shape, seed=5)) + 0.5  # Ties: rounding half away from zero.
  out = ref * 0.98 + 40 * sensor_image(*shape, seed=6, smooth=False) / 2047 - 20
  out[:3, :4, 0] = ref[:3, :4, 0]
  exp = _q2n_loop(ref, out, block, block)
  assert metrics.q2n(ref, out, block=block, shift=block) == pytest.approx(exp, rel=1e-12)


def test_q2n_flat_blocks_match_literal_transcription():
  ref = sensor_image(32, 32, 4, seed=7)
  out = ref * 0.97 + 11
  ref[:16, :16] = 500.0  # A flat reference block: std 0 -> eps.
  out[:16, :16] = 480.0
  ref[16:, 16:, 1] = 0.0  # A zero-mean band: the `s == 0` branch.
  exp = _q2n_loop(ref, out, 16, 16)
  assert metrics.q2n(ref, out, block=16, shift=16) == pytest.approx(exp, rel=1e-12)


@pytest.mark.parametrize('bands', [4, 8])
def test_q2n_identical_images_with_padding(bands):
  x = sensor_image(100, 100, bands, seed=8)  # 100 -> 128: mirror padding
  assert metrics.q2n(x, x) == pytest.approx(1, abs=1e-12)
  y = x + sensor_image(100, 100, bands, seed=9, smooth=False) * 0.1
  assert 0.5 < metrics.q2n(x, y) < 1


def test_uint16_cast_rounds_half_away_from_zero_and_saturates():
  x = np.array([0.5, 1.5, 2.5, 2.4999999999999996, -0.5, -3.0, 65534.5, 70000.0])
  np.testing.assert_array_equal(reference.to_uint16_matlab(x), [1, 2, 3, 2, 0, 0, 65535, 65535])


def _img_qi_loop(a, b, block):
  """Wang & Bovik's `img_qi.m`, window by window, with its sums and special cases."""
  n = block * block
  h, w = a.shape[0] - block + 1, a.shape[1] - block + 1
  qmap = np.ones((h, w))
  for i in range(h):
    for j in range(w):
      x, y = a[i : i + block, j : j + block], b[i : i + block, j : j + block]
      sx, sy = x.sum(), y.sum()
      num = 4 * (n * (x * y).sum() - sx * sy) * sx * sy
      den1 = n * ((x * x).sum() + (y * y).sum()) - sx * sx - sy * sy
      msq = sx * sx + sy * sy
      if den1 * msq != 0:
        qmap[i, j] = num / (den1 * msq)
      elif den1 == 0 and msq != 0:
        qmap[i, j] = 2 * sx * sy / msq
  return qmap.mean()


def test_q_index_matches_literal_img_qi_with_flat_windows():
  ref = np.round(sensor_image(20, 22, 2, seed=10))  # Integers: the literal sums are exact.
  out = np.round(ref * 0.9 + sensor_image(20, 22, 2, seed=11, smooth=False) * 0.02)
  ref[:10, :10] = 300  # Flat windows in both images.
  out[:10, :10] = 320
  ref[10:, 12:, 1] = 0  # Flat zero windows in one image.
  exp = np.mean([_img_qi_loop(ref[:, :, k], out[:, :, k], 8) for k in range(2)])
  assert metrics.q_index(ref, out, block=8) == pytest.approx(exp, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_clear_errors():
  x = sensor_image(64, 64, 4)
  with pytest.raises(ValueError, match=r'out: shape \(64, 60, 4\) does not match'):
    metrics.sam(x, x[:, :60])
  nan = x.copy()
  nan[3, 3, 1] = np.nan
  with pytest.raises(ValueError, match='ref: contains 1 NaN/Inf'):
    metrics.ergas(nan, x)
  inf = x.copy()
  inf[0, 0, 0] = np.inf
  with pytest.raises(ValueError, match='out: contains 1 NaN/Inf'):
    metrics.psnr(x, inf)
  with pytest.raises(ValueError, match='sensor scale'):
    metrics.q2n(x / 2047, x / 2047)
  with pytest.raises(ValueError, match='out: .*sensor scale'):
    metrics.q2n(x, x / 2047)
  with pytest.raises(ValueError, match='sensor scale'):
    metrics.reduced_resolution_metrics(x / 2047, x / 2047, max_value=1.0, crop=0)
  with pytest.raises(ValueError, match='too small to mirror-pad'):
    metrics.q2n(x[:10, :10], x[:10, :10])
  with pytest.raises(ValueError, match='fused: size 48x64 is not a multiple of the block size'):
    metrics.d_lambda(x[:48], x[:48], block=32)
  with pytest.raises(ValueError, match='smaller than the Q window'):
    metrics.q_index(x[:20], x[:20], block=32)
  with pytest.raises(ValueError, match='pan: shape'):
    metrics.d_s(x, x, x[:32, :, 0])
  with pytest.raises(ValueError, match='4 bands but sensor'):
    metrics.d_lambda_k(x, x, 'WV3')
  with pytest.raises(ValueError, match='CAVE is a hisr dataset without MTF gains'):
    metrics.d_lambda_k(x, x, 'CAVE')
  with pytest.raises(ValueError, match='ref: .*expects data in \\[0, 1\\]'):
    metrics.hisr_metrics(x, x)
  with pytest.raises(ValueError, match='expected an H x W x C'):
    metrics.psnr(np.ones(5), np.ones(5))


# ---------------------------------------------------------------------------------------------
# Aggregation and tables.


def test_aggregate_uses_n_minus_1_std_and_formats_the_table():
  rows = [{'PSNR': 30.0, 'SAM': 2.0}, {'PSNR': 32.0, 'SAM': 4.0}, {'PSNR': 34.0, 'SAM': 3.0}]
  agg = metrics.aggregate(rows)
  assert agg['PSNR'] == (32.0, pytest.approx(2.0))  # MATLAB std([30 32 34]) = 2
  assert agg['SAM'][1] == pytest.approx(1.0)
  assert metrics.aggregate(rows[:1])['SAM'] == (2.0, 0.0)
  table = metrics.format_table({'U2Net': agg, 'other': metrics.aggregate(rows[:2])})
  lines = table.splitlines()
  assert lines[0].split() == ['PSNR', 'SAM']
  assert '32.0000±2.0000' in lines[2] and lines[2].startswith('U2Net')
  with pytest.raises(ValueError, match='keys'):
    metrics.aggregate([{'PSNR': 1.0}, {'SAM': 1.0}])
  with pytest.raises(ValueError, match='no images'):
    metrics.aggregate([])


# ---------------------------------------------------------------------------------------------
# JAX versions.


def _batch():
  ref = np.stack([sensor_image(24, 20, 6, seed=s) / 2047 for s in (14, 15, 16)])
  out = np.stack([sensor_image(24, 20, 6, seed=s) / 2047 for s in (17, 18, 19)])
  out[1, :2, :3] = 0  # Zero spectra, masked out of SAM.
  ref[2, 5, 5] = 0
  return ref, out


@pytest.mark.parametrize(
  'jax_fn,np_fn',
  [
    (metrics.psnr_jax, metrics.psnr),
    (metrics.sam_jax, metrics.sam),
    (metrics.ergas_jax, metrics.ergas),
  ],
)
def test_jax_metrics_equal_numpy(jax_fn, np_fn):
  ref, out = _batch()
  exp = np.array([np_fn(r, o) for r, o in zip(ref, out, strict=True)])
  with jax.enable_x64(True):
    got = jax.jit(jax_fn)(jnp.asarray(ref), jnp.asarray(out))
    assert got.shape == (3,) and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-10)
  # Default float32, as inside the training loop.
  got32 = jax.jit(jax_fn)(jnp.asarray(ref, jnp.float32), jnp.asarray(out, jnp.float32))
  np.testing.assert_allclose(np.asarray(got32), exp, rtol=2e-5)


def test_jax_metrics_reject_bad_shapes():
  ref, out = _batch()
  with pytest.raises(ValueError, match='same \\(B, H, W, C\\) shape'):
    metrics.psnr_jax(ref, out[:, :-1])
  with pytest.raises(ValueError, match='same \\(B, H, W, C\\) shape'):
    metrics.sam_jax(ref[0], out[0])
