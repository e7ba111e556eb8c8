"""Fusion quality metrics that reproduce the benchmark's MATLAB toolbox and the HISR evaluation.

Every published pansharpening number (the U2Net paper's Tables 1-3, PanCollection, DLPan-Toolbox)
comes from the benchmark's MATLAB toolbox; the HISR numbers (Table 4) from the Deng-lab Python
evaluation. This module computes the same numbers in float64 numpy, vectorised, following the
conventions written down in `../shared/metrics/README.md` (checked there against the toolbox's own
code to ~1e-14). The points where widely copied Python ports go wrong, and this module does not:

- standard deviations and covariances use N - 1 (MATLAB `std2`, `cov`), and Q2n's hypercomplex
  covariance the N/(N - 1) factor of `onions_quality.m`;
- Q2n casts to uint16 like MATLAB: round half away from zero, saturate to [0, 65535] -- so its
  inputs must be on the sensor scale (0..2047), never [0, 1] (rejected with a ValueError);
- Q2n mirror-pads to whole blocks repeating the edge sample (numpy 'symmetric');
- `interp23tap` uses the toolbox's zero insertion phase and circular borders; `imresize` is MATLAB's
  antialiased bicubic.

All images are H x W x C (an H x W array is taken as one band); the argument order is (reference,
estimate), and for the no-reference metrics (fused, lms, pan). The protocols of the paper's tables
are `reduced_resolution_metrics`, `full_resolution_metrics` and `hisr_metrics`; `aggregate` and
`format_table` print "mean±std" like the tables. `psnr_jax`, `sam_jax` and `ergas_jax` are batched,
jit-compatible versions of the cheap metrics for validation inside the training loop.

Bad input (mismatched shapes, NaN/Inf, sizes the block metrics cannot take, [0, 1] data given to a
sensor-scale metric) raises a ValueError that names the argument and the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from u2net_jax import toolbox

# ---------------------------------------------------------------------------------------------
# Input checks.


def _as_pair(ref, out, names=('ref', 'out')) -> tuple[np.ndarray, np.ndarray]:
  a = toolbox.as_image(ref, names[0])
  b = toolbox.as_image(out, names[1])
  if a.shape != b.shape:
    raise ValueError(f'{names[1]}: shape {b.shape} does not match {names[0]} shape {a.shape}')
  return a, b


def _check_sensor_scale(x: np.ndarray, name: str, metric: str) -> None:
  # Q2n rounds to uint16 (as MATLAB does): [0, 1] data would collapse to {0, 1} and give a
  # silently wrong number, so refuse it.
  peak = float(np.max(np.abs(x)))
  if peak <= 1.0:
    raise ValueError(
      f'{name}: all values lie in [-1, 1] (max |value| {peak:g}); {metric} casts to uint16 like '
      'the MATLAB toolbox and needs data on the sensor scale (e.g. 0..2047), not [0, 1]'
    )


def _check_blocks(shape, block: int, name: str) -> None:
  if int(block) != block or block < 2:
    raise ValueError(f'block: must be an integer >= 2, got {block}')
  h, w = shape[:2]
  if h % block or w % block:
    raise ValueError(f'{name}: size {h}x{w} is not a multiple of the block size {block}')


# ---------------------------------------------------------------------------------------------
# Reduced-resolution metrics (with a reference).


def psnr(ref, out, data_range: float = 1.0) -> float:
  """Peak signal-to-noise ratio: mean over bands of 10 log10(R^2 / MSE_band).

  Args:
    ref: H x W x C reference.
    out: H x W x C estimate.
    data_range: R, the peak value (1 for images in [0, 1]; the tables use images / sensor max).

  Returns:
    PSNR in dB (inf when a band is reproduced exactly).
  """
  ref, out = _as_pair(ref, out)
  mse = np.mean((ref - out) ** 2, axis=(0, 1))
  with np.errstate(divide='ignore'):
    return float(np.mean(10.0 * np.log10(data_range**2 / mse)))


def sam(ref, out) -> float:
  """Spectral angle mapper (`SAM.m`): mean over pixels of the angle between spectra, in degrees.

  Pixels where |ref| |out| = 0 are left out of the mean; the cosine is clipped to [-1, 1] (MATLAB
  takes the real part of a complex acos, the same thing).

  Args:
    ref: H x W x C reference.
    out: H x W x C estimate.

  Returns:
    SAM in degrees (NaN if no pixel has a non-zero spectrum in both images, as in MATLAB).
  """
  ref, out = _as_pair(ref, out)
  dot = np.sum(ref * out, axis=-1)
  prod_norm = np.sqrt(np.sum(ref * ref, axis=-1) * np.sum(out * out, axis=-1))
  valid = prod_norm != 0
  if not valid.any():
    return float('nan')
  angles = np.arccos(np.clip(dot[valid] / prod_norm[valid], -1.0, 1.0))
  return float(np.sum(angles) / angles.size * 180.0 / np.pi)


def ergas(ref, out, ratio: float = 4) -> float:
  """ERGAS (`ERGAS.m`): 100/ratio * sqrt(mean over bands of MSE_band / mean(ref_band)^2).

  Args:
    ref: H x W x C reference.
    out: H x W x C estimate.
    ratio: resolution ratio between the MS and PAN (or LR and HR HSI) images.

  Returns:
    ERGAS (0 for identical images).
  """
  ref, out = _as_pair(ref, out)
  mu = np.mean(ref, axis=(0, 1))
  if np.any(mu == 0):
    raise ValueError(
      f'ref: band(s) {np.flatnonzero(mu == 0).tolist()} have zero mean; ERGAS is undefined'
    )
  mse = np.mean((ref - out) ** 2, axis=(0, 1))
  return float(100.0 / ratio * np.sqrt(np.mean(mse / mu**2)))


def _uiqi_from_moments(mx, my, vx, vy, cxy):
  """Wang-Bovik UIQI from means, variances and covariance, with `img_qi.m`'s special cases.

  4 cxy mx my / ((vx + vy)(mx^2 + my^2)); where vx + vy = 0 (both windows flat) it is
  2 mx my / (mx^2 + my^2), and 1 where that is 0/0 too. vx, vy, cxy may share any normalisation.
  """
  den_v = vx + vy
  den_m = mx * mx + my * my
  den = den_v * den_m
  q = np.ones(np.broadcast(mx, my, vx, vy, cxy).shape)
  with np.errstate(divide='ignore', invalid='ignore'):
    flat = (den_v == 0) & (den_m != 0)
    q = np.where(flat, 2 * mx * my / den_m, q)
    q = np.where(den != 0, 4 * cxy * mx * my / den, q)
  return q


def _window_sums(a: np.ndarray, k: int) -> np.ndarray:
  """Sums over every k x k window (stride 1, 'valid') of the leading two axes of `a`."""
  for axis in (0, 1):
    c = np.cumsum(a, axis=axis)
    zero = np.zeros_like(np.take(c, [0], axis=axis))
    c = np.concatenate([zero, c], axis=axis)
    n = c.shape[axis]
    a = np.take(c, np.arange(k, n), axis=axis) - np.take(c, np.arange(0, n - k), axis=axis)
  return a


def _flat_windows(a: np.ndarray, k: int) -> np.ndarray:
  """True for the k x k valid windows of each band of `a` whose values are all equal."""
  lo = ndimage.minimum_filter(a, size=(k, k, 1), mode='nearest')
  hi = ndimage.maximum_filter(a, size=(k, k, 1), mode='nearest')
  # scipy centres a size-k window at offset k // 2: the window starting at j ends up at j + k // 2.
  h, w = a.shape[0] - k + 1, a.shape[1] - k + 1
  return (hi == lo)[k // 2 : k // 2 + h, k // 2 : k // 2 + w]


def q_index(ref, out, block: int = 32) -> float:
  """Q_avg: the universal image quality index (UIQI) averaged over windows and bands (`Q.m`).

  Per band, Wang & Bovik's `img_qi.m` on every block x block window (stride 1, 'valid'), mean over
  windows, then mean over bands. The moments are computed on mean-removed data (the index does not
  change) so that running sums lose no precision.

  Args:
    ref: H x W x C reference.
    out: H x W x C estimate; H and W must be at least `block`.
    block: window side (32 in the toolbox).

  Returns:
    Q_avg in [-1, 1] (1 for identical images).
  """
  ref, out = _as_pair(ref, out)
  if int(block) != block or block < 2:
    raise ValueError(f'block: must be an integer >= 2, got {block}')
  if min(ref.shape[:2]) < block:
    raise ValueError(
      f'ref: size {ref.shape[0]}x{ref.shape[1]} is smaller than the Q window {block}'
    )
  n = float(block * block)
  mx = _window_sums(ref, block) / n
  my = _window_sums(out, block) / n
  # Mean-removed copies: the (co)variances are shift invariant, and the running sums of
  # centred products cancel far less than those of raw 11-bit values.
  x = ref - ref.mean(axis=(0, 1))
  y = out - out.mean(axis=(0, 1))
  sx, sy = _window_sums(x, block), _window_sums(y, block)
  vx = _window_sums(x * x, block) - sx * sx / n
  vy = _window_sums(y * y, block) - sy * sy / n
  cxy = _window_sums(x * y, block) - sx * sy / n
  # A flat window has exactly zero variance (and covariance); the running sums only get near 0.
  fx, fy = _flat_windows(ref, block), _flat_windows(out, block)
  vx = np.where(fx, 0.0, vx)
  vy = np.where(fy, 0.0, vy)
  cxy = np.where(fx | fy, 0.0, cxy)
  q = _uiqi_from_moments(mx, my, vx, vy, cxy)
  return float(np.mean(np.mean(q, axis=(0, 1))))


def _to_uint16_matlab(a: np.ndarray) -> np.ndarray:
  """MATLAB `uint16(a)` as float64: round half away from zero, saturate to [0, 65535]."""
  a = np.clip(a, 0.0, 65535.0)
  r = np.floor(a)
  # a - floor(a) is exact, so the half-way test is too (np.round would round half to even).
  return r + (a - r >= 0.5)


def _conj(q: np.ndarray) -> np.ndarray:
  """Hypercomplex conjugate along the last axis: negate every component but the first."""
  return np.concatenate([q[..., :1], -q[..., 1:]], axis=-1)


def _onion_mult(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Product of 2^n-ons along the last axis (Cayley-Dickson recursion of `onion_mult.m`)."""
  n = x.shape[-1]
  if n == 1:
    return x * y
  half = n // 2
  a, b = x[..., :half], _conj(x[..., half:])
  c, d = y[..., :half], _conj(y[..., half:])
  if n == 2:
    return np.concatenate([a * c - d * b, a * d + c * b], axis=-1)
  r1 = _onion_mult(a, c)
  r2 = _onion_mult(d, _conj(b))
  r3 = _onion_mult(_conj(a), d)
  r4 = _onion_mult(c, b)
  return np.concatenate([r1 - r2, r3 + r4], axis=-1)


def _onions_quality(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
  """Q2n of each block (`onions_quality.m`), vectorised over blocks.

  Args:
    ref: (..., P, 2^n) reference blocks, P pixels each, already uint16-rounded.
    out: (..., P, 2^n) estimate blocks.

  Returns:
    (...,) the norm of each block's hypercomplex quality.
  """
  p = ref.shape[-2]
  k = p / (p - 1.0)  # The unbiased N/(N - 1) factor of the toolbox.
  # Both blocks are normalised by the *reference* block's mean and std (N - 1), std 0 -> eps;
  # a zero-mean reference band shifts the estimate by 1 without scaling (the `s == 0` branch).
  s = np.mean(ref, axis=-2, keepdims=True)
  t = np.std(ref, axis=-2, ddof=1, keepdims=True)
  t = np.where(t == 0, toolbox.MATLAB_EPS, t)
  x = (ref - s) / t + 1.0
  y = np.where(s == 0, out - s + 1.0, (out - s) / t + 1.0)
  y = _conj(y)
  m1 = np.mean(x, axis=-2)
  m2 = np.mean(y, axis=-2)
  mod_q1m = np.sqrt(np.sum(m1 * m1, axis=-1))
  mod_q2m = np.sqrt(np.sum(m2 * m2, axis=-1))
  mod_q1 = np.sqrt(np.sum(x * x, axis=-1))
  mod_q2 = np.sqrt(np.sum(y * y, axis=-1))
  termine2 = mod_q1m * mod_q2m
  termine4 = mod_q1m**2 + mod_q2m**2
  int1 = k * np.mean(mod_q1**2, axis=-1)
  int2 = k * np.mean(mod_q2**2, axis=-1)
  termine3 = int1 + int2 - k * (mod_q1m**2 + mod_q2m**2)
  mean_bias = 2 * termine2 / termine4
  qu = _onion_mult(x, y)
  qm = _onion_mult(m1, m2)
  qv = k * np.mean(qu, axis=-2)
  with np.errstate(divide='ignore', invalid='ignore'):
    q = (qv - k * qm) * mean_bias[..., None] * (2 / termine3)[..., None]
    value = np.sqrt(np.sum(q * q, axis=-1))
  # termine3 = 0 exactly when every band of both blocks is flat; the toolbox then returns the
  # mean-bias term alone. Decide it on the data, not on termine3's rounding residue.
  flat = np.all(np.ptp(ref, axis=-2) == 0, axis=-1) & np.all(np.ptp(out, axis=-2) == 0, axis=-1)
  return np.where(flat, np.abs(mean_bias), value)


def q2n(ref, out, block: int = 32, shift: int = 32) -> float:
  """Q2n (Q4, Q8, ...): Garzelli-Nencini hypercomplex quality on blocks (`q2n.m`).

  Both images are mirror-padded (bottom/right, edge sample repeated) to whole blocks, rounded to
  uint16 (half away from zero, saturated), their band count zero-padded to a power of two; each
  block x block block taken every `shift` pixels gives the norm of its hypercomplex quality, and
  Q2n is the mean over blocks.

  Args:
    ref: H x W x C reference on the sensor scale (e.g. 0..2047); [0, 1] data is rejected.
    out: H x W x C estimate on the same scale.
    block: block side (32).
    shift: block step (32).

  Returns:
    Q2n in [0, 1] (1 for identical images).
  """
  ref, out = _as_pair(ref, out)
  _check_sensor_scale(ref, 'ref', 'q2n')
  _check_sensor_scale(out, 'out', 'q2n')
  if int(block) != block or block < 2:
    raise ValueError(f'block: must be an integer >= 2, got {block}')
  if int(shift) != shift or shift < 1:
    raise ValueError(f'shift: must be a positive integer, got {shift}')
  h, w, c = ref.shape
  steps = (math.ceil(h / shift), math.ceil(w / shift))
  pads = [max((s - 1) * shift + block - n, 0) for s, n in zip(steps, (h, w), strict=True)]
  if pads[0] > h or pads[1] > w:
    # q2n.m mirrors the last `pad` rows/columns, so it cannot pad by more than the image size.
    raise ValueError(
      f'ref: size {h}x{w} is too small to mirror-pad to whole {block}x{block} blocks every '
      f'{shift} px (the padding {pads[0]}x{pads[1]} would exceed the image)'
    )
  width = ((0, pads[0]), (0, pads[1]), (0, 0))
  ref = _to_uint16_matlab(np.pad(ref, width, mode='symmetric'))
  out = _to_uint16_matlab(np.pad(out, width, mode='symmetric'))
  n_bands = 1 << (c - 1).bit_length()
  if n_bands != c:
    zeros = ((0, 0), (0, 0), (0, n_bands - c))
    ref, out = np.pad(ref, zeros), np.pad(out, zeros)
  # (steps_y, steps_x, block*block, bands) block views, in MATLAB's column-major pixel order
  # (irrelevant to the means, kept for the record).
  win = np.lib.stride_tricks.sliding_window_view
  rb = win(ref, (block, block), axis=(0, 1))[::shift, ::shift][: steps[0], : steps[1]]
  ob = win(out, (block, block), axis=(0, 1))[::shift, ::shift][: steps[0], : steps[1]]
  rb = rb.transpose(0, 1, 4, 3, 2).reshape(steps[0], steps[1], block * block, n_bands)
  ob = ob.transpose(0, 1, 4, 3, 2).reshape(steps[0], steps[1], block * block, n_bands)
  return float(np.mean(_onions_quality(rb, ob)))


def scc(ref, out) -> float:
  """Spatial correlation coefficient (`SCC.m`) of Sobel gradient magnitudes.

  On the interior [1:-1, 1:-1] of each band, G = sqrt(Sobel_y^2 + Sobel_x^2) with zero padding
  ('same' size); SCC = sum(G_out G_ref) / (|G_out| |G_ref|) over all pixels and bands at once, with
  no mean removal.

  Args:
    ref: H x W x C reference (H, W >= 3).
    out: H x W x C estimate.

  Returns:
    sCC (1 for identical images).
  """
  ref, out = _as_pair(ref, out)
  if min(ref.shape[:2]) < 3:
    raise ValueError(f'ref: size {ref.shape[0]}x{ref.shape[1]} has no interior for SCC')
  g_ref, g_out = _sobel_magnitude(ref[1:-1, 1:-1]), _sobel_magnitude(out[1:-1, 1:-1])
  num = np.sum(g_out * g_ref)
  return float(num / np.sqrt(np.sum(g_out**2)) / np.sqrt(np.sum(g_ref**2)))


def _sobel_magnitude(a: np.ndarray) -> np.ndarray:
  """|grad| with fspecial('sobel') and its transpose, zero padding, 'same' size, per band."""
  p = np.pad(a, ((1, 1), (1, 1), (0, 0)))
  h, w = a.shape[:2]
  s = lambda i, j: p[i : i + h, j : j + w]
  gy = (s(0, 0) + 2 * s(0, 1) + s(0, 2)) - (s(2, 0) + 2 * s(2, 1) + s(2, 2))
  gx = (s(0, 0) + 2 * s(1, 0) + s(2, 0)) - (s(0, 2) + 2 * s(1, 2) + s(2, 2))
  return np.sqrt(gy * gy + gx * gx)


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-(x * x) / (2 * sigma * sigma))
  return g / g.sum()


def ssim(ref, out, data_range: float = 1.0) -> float:
  """SSIM as in the HISR evaluation: mean over bands of the mean SSIM map.

  11 x 11 Gaussian window (sigma 1.5, normalised), zero padding so the map has the image's size and
  the borders count, C1 = (0.01 R)^2, C2 = (0.03 R)^2.

  Args:
    ref: H x W x C reference.
    out: H x W x C estimate.
    data_range: R (1 for data in [0, 1]).

  Returns:
    SSIM (1 for identical images).
  """
  ref, out = _as_pair(ref, out)
  g = _gaussian_1d()
  blur = lambda a: ndimage.correlate1d(
    ndimage.correlate1d(a, g, axis=0, mode='constant'), g, axis=1, mode='constant'
  )
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = blur(ref), blur(out)
  sxx = blur(ref * ref) - mu_x * mu_x
  syy = blur(out * out) - mu_y * mu_y
  sxy = blur(ref * out) - mu_x * mu_y
  num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
  return float(np.mean(np.mean(num / den, axis=(0, 1))))


# ---------------------------------------------------------------------------------------------
# Full-resolution (no-reference) metrics.


def _block_moments(a: np.ndarray, block: int):
  """Per non-overlapping block and band: mean, centred data, and a 'flat block' mask."""
  h, w, c = a.shape
  b = a.reshape(h // block, block, w // block, block, c).transpose(0, 2, 1, 3, 4)
  b = b.reshape(-1, block * block, c)
  mean = b.mean(axis=1)
  return mean, b - mean[:, None, :], np.ptp(b, axis=1) == 0


def _block_q(mx, xc, fx, my, yc, fy) -> np.ndarray:
  """Mean over blocks of UIQI(x_band, y_band) for matching bands -> (C,)."""
  n1 = xc.shape[1] - 1.0
  vx = np.where(fx, 0.0, np.sum(xc * xc, axis=1) / n1)
  vy = np.where(fy, 0.0, np.sum(yc * yc, axis=1) / n1)
  cxy = np.where(fx | fy, 0.0, np.sum(xc * yc, axis=1) / n1)
  return np.mean(_uiqi_from_moments(mx, my, vx, vy, cxy), axis=0)


def _band_pair_q(a: np.ndarray, block: int) -> np.ndarray:
  """(C, C) matrix of mean-over-blocks UIQI between every pair of bands of `a`."""
  m, c, f = _block_moments(a, block)
  cov = np.einsum('npi,npj->nij', c, c) / (c.shape[1] - 1.0)
  var = np.where(f, 0.0, np.diagonal(cov, axis1=1, axis2=2))
  cov = np.where(f[:, :, None] | f[:, None, :], 0.0, cov)
  q = _uiqi_from_moments(m[:, :, None], m[:, None, :], var[:, :, None], var[:, None, :], cov)
  return np.mean(q, axis=0)


def d_lambda(fused, lms, block: int = 32) -> float:
  """QNR spectral distortion D_lambda (`D_lambda.m`, p = 1, toolbox 1.0 option).

  Mean over band pairs i < j of |Q(F_i, F_j) - Q(M_i, M_j)|, Q = UIQI on non-overlapping
  block x block blocks (covariance N - 1), mean over blocks. A flat block, where MATLAB's `uqi`
  gives 0/0 = NaN, takes `img_qi.m`'s value instead (2 mx my / (mx^2 + my^2), or 1).

  Args:
    fused: H x W x C pansharpened image (H, W multiples of `block`).
    lms: H x W x C MS image interpolated to the PAN size.
    block: block side (32).

  Returns:
    D_lambda (0 is ideal).
  """
  fused, lms = _as_pair(fused, lms, ('fused', 'lms'))
  _check_blocks(fused.shape, block, 'fused')
  c = fused.shape[2]
  if c < 2:
    raise ValueError(f'fused: D_lambda needs at least 2 bands, got {c}')
  diff = np.abs(_band_pair_q(fused, block) - _band_pair_q(lms, block))
  return float(np.mean(diff[np.triu_indices(c, k=1)]))


def _as_pan(pan, shape) -> np.ndarray:
  """The PAN as H x W float64, checked against the fused image's size."""
  p = toolbox.as_image(pan, 'pan')
  if p.shape[2] != 1 or p.shape[:2] != tuple(shape[:2]):
    raise ValueError(f'pan: shape {np.shape(pan)} does not match the fused size {shape[:2]}')
  return p[:, :, 0]


def d_s(fused, lms, pan, ratio: int = 4, block: int = 32) -> float:
  """QNR spatial distortion D_s (`D_s.m`, q = 1, toolbox 1.0 option); also HQNR's.

  Mean over bands of |Q(F_i, P) - Q(M_i, P~)|, Q as in `d_lambda`, with
  P~ = interp23tap(imresize(P, 1/ratio), ratio): the PAN reduced with MATLAB's antialiased bicubic
  and re-interpolated with the 23-tap kernel.

  Args:
    fused: H x W x C pansharpened image (H, W multiples of `block` and of `ratio`).
    lms: H x W x C MS image interpolated to the PAN size.
    pan: H x W (or H x W x 1) panchromatic image.
    ratio: resolution ratio (power of two).
    block: block side (32).

  Returns:
    D_s (0 is ideal).
  """
  fused, lms = _as_pair(fused, lms, ('fused', 'lms'))
  p = _as_pan(pan, fused.shape)
  _check_blocks(fused.shape, block, 'fused')
  ratio = toolbox.check_ratio(ratio)
  if fused.shape[0] % ratio or fused.shape[1] % ratio:
    raise ValueError(f'pan: size {p.shape} is not a multiple of the ratio {ratio}')
  p_low = toolbox.interp23tap(toolbox.imresize(p, 1.0 / ratio), ratio)
  # (blocks, pixels, 1) moments of the PAN broadcast against the bands.
  q_high = _block_q(*_block_moments(fused, block), *_block_moments(p[:, :, None], block))
  q_low = _block_q(*_block_moments(lms, block), *_block_moments(p_low[:, :, None], block))
  return float(np.mean(np.abs(q_high - q_low)))


def qnr(fused, lms, pan, ratio: int = 4, block: int = 32) -> float:
  """QNR = (1 - D_lambda)(1 - D_s) with alpha = beta = 1 (`QNR.m`).

  Args:
    fused: H x W x C pansharpened image.
    lms: H x W x C MS image interpolated to the PAN size.
    pan: H x W panchromatic image.
    ratio: resolution ratio.
    block: block side (32).

  Returns:
    QNR (1 is ideal).
  """
  return (1 - d_lambda(fused, lms, block)) * (1 - d_s(fused, lms, pan, ratio, block))


def d_lambda_k(fused, lms, sensor: str, ratio: int = 4, block: int = 32) -> float:
  """Khan's spectral distortion of HQNR (`D_lambda_K.m`): 1 - Q2n(lms, MTF(fused)).

  The fused image is low-passed at full size by the sensor's MTF-matched filters (`mtf_filter`,
  not decimated) and compared with `lms` by Q2n on block x block blocks every `block` pixels.

  Args:
    fused: H x W x C pansharpened image on the sensor scale (H, W multiples of `block`).
    lms: H x W x C MS image interpolated to the PAN size, sensor scale.
    sensor: sensor name (see `get_sensor`); its gains must match C.
    ratio: resolution ratio.
    block: block side (32).

  Returns:
    D_lambda^K (0 is ideal).
  """
  fused, lms = _as_pair(fused, lms, ('fused', 'lms'))
  _check_blocks(fused.shape, block, 'fused')
  info = toolbox.get_sensor(sensor)
  gains = info['ms_gnyq']
  if gains is None:
    raise ValueError(f'sensor: {info["name"]} is a {info["task"]} dataset without MTF gains')
  if len(gains) != fused.shape[2]:
    raise ValueError(
      f'fused: {fused.shape[2]} bands but sensor {sensor!r} has {len(gains)} MTF gains'
    )
  _check_sensor_scale(fused, 'fused', 'd_lambda_k (Q2n)')
  _check_sensor_scale(lms, 'lms', 'd_lambda_k (Q2n)')
  return 1 - q2n(lms, toolbox.mtf_filter(fused, gains, ratio), block, block)


def hqnr(fused, lms, pan, sensor: str, ratio: int = 4, block: int = 32) -> float:
  """Hybrid QNR = (1 - D_lambda^K)(1 - D_s): the "QNR" column of the U2Net paper's Table 1.

  Args:
    fused: H x W x C pansharpened image on the sensor scale.
    lms: H x W x C MS image interpolated to the PAN size.
    pan: H x W panchromatic image.
    sensor: sensor name (see `get_sensor`).
    ratio: resolution ratio.
    block: block side (32).

  Returns:
    HQNR (1 is ideal).
  """
  dl = d_lambda_k(fused, lms, sensor, ratio, block)
  return (1 - dl) * (1 - d_s(fused, lms, pan, ratio, block))


# ---------------------------------------------------------------------------------------------
# The tables' protocols.


def reduced_resolution_metrics(
  ref, out, max_value: float, ratio: int = 4, crop: int = 21, block: int = 32
) -> dict[str, float]:
  """The reduced-resolution protocol of the pansharpening tables (`indexes_evaluation.m`).

  PSNR on the uncropped images divided by `max_value`; SAM, ERGAS, Q2n, Q_avg and SCC on the
  images cropped like `I(crop:end-crop, crop:end-crop, :)` (numpy [crop-1 : -crop]; 256 -> 215
  for crop 21), no clipping.

  Args:
    ref: H x W x C ground truth on the sensor scale.
    out: H x W x C fused image on the sensor scale (the network output clamped to [0, 1] and
      multiplied by `max_value` beforehand, as for the published tables).
    max_value: sensor maximum (2047, or 1023 for GF-2).
    ratio: resolution ratio (ERGAS).
    crop: the toolbox's `dim_cut` (21); 0 for none.
    block: Q2n and Q_avg block size (32).

  Returns:
    {'PSNR', 'Q2n', 'Q_avg', 'SAM', 'ERGAS', 'SCC'} -> float.
  """
  ref, out = _as_pair(ref, out)
  if not max_value > 0:
    raise ValueError(f'max_value: must be positive, got {max_value}')
  result = {'PSNR': psnr(ref / max_value, out / max_value, data_range=1.0)}
  if crop:
    h, w = ref.shape[:2]
    if h - crop <= crop - 1 or w - crop <= crop - 1:
      raise ValueError(f'ref: size {h}x{w} is too small for a crop of {crop}')
    ref = ref[crop - 1 : h - crop, crop - 1 : w - crop]
    out = out[crop - 1 : h - crop, crop - 1 : w - crop]
  result['Q2n'] = q2n(ref, out, block, block)
  result['Q_avg'] = q_index(ref, out, block)
  result['SAM'] = sam(ref, out)
  result['ERGAS'] = ergas(ref, out, ratio)
  result['SCC'] = scc(ref, out)
  return result


def full_resolution_metrics(
  fused, lms, pan, sensor: str, ratio: int = 4, block: int = 32
) -> dict[str, float]:
  """The full-resolution protocol (`indexes_evaluation_FS.m`): QNR and HQNR branches.

  No crop, no clipping. The paper's Table 1 "QNR" column is 'HQNR'.

  Args:
    fused: H x W x C fused image on the sensor scale (H, W multiples of `block`).
    lms: H x W x C MS image interpolated to the PAN size (`interp23tap`), sensor scale.
    pan: H x W panchromatic image.
    sensor: sensor name (see `get_sensor`).
    ratio: resolution ratio.
    block: block side (32).

  Returns:
    {'D_lambda', 'D_s', 'QNR', 'D_lambda_K', 'HQNR'} -> float.
  """
  dl = d_lambda(fused, lms, block)
  ds = d_s(fused, lms, pan, ratio, block)
  dlk = d_lambda_k(fused, lms, sensor, ratio, block)
  return {
    'D_lambda': dl,
    'D_s': ds,
    'QNR': (1 - dl) * (1 - ds),
    'D_lambda_K': dlk,
    'HQNR': (1 - dlk) * (1 - ds),
  }


def hisr_metrics(ref, out, ratio: int = 4, clip: bool = True) -> dict[str, float]:
  """The HISR protocol (Table 4, CAVE/Harvard): PSNR, SSIM, SAM, ERGAS on data in [0, 1], no crop.

  Args:
    ref: H x W x C ground truth in [0, 1].
    out: H x W x C estimate; clamped to [0, 1] first when `clip` (as the evaluation does).
    ratio: resolution ratio (ERGAS).
    clip: clamp `out` to [0, 1].

  Returns:
    {'PSNR', 'SSIM', 'SAM', 'ERGAS'} -> float.
  """
  ref, out = _as_pair(ref, out)
  if ref.max() > 1.0 + 1e-6 or ref.min() < -1e-6:
    raise ValueError(
      f'ref: values span [{ref.min():g}, {ref.max():g}]; hisr_metrics expects data in [0, 1]'
    )
  if clip:
    out = np.clip(out, 0.0, 1.0)
  return {
    'PSNR': psnr(ref, out, data_range=1.0),
    'SSIM': ssim(ref, out, data_range=1.0),
    'SAM': sam(ref, out),
    'ERGAS': ergas(ref, out, ratio),
  }


def aggregate(results: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
  """Mean and standard deviation over images, as the tables print them.

  Args:
    results: one metrics dict per image, all with the same keys.

  Returns:
    name -> (mean, std), std with N - 1 like MATLAB's `std` (0 for a single image).
  """
  results = list(results)
  if not results:
    raise ValueError('results: no images to aggregate')
  keys = list(results[0])
  for i, r in enumerate(results):
    if list(r) != keys:
      raise ValueError(f'results[{i}]: keys {list(r)} differ from results[0] keys {keys}')
  out = {}
  for k in keys:
    v = np.array([r[k] for r in results], dtype=np.float64)
    out[k] = (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)
  return out


def format_table(rows: Mapping[str, Mapping[str, tuple[float, float]]], digits: int = 4) -> str:
  """A plain-text table of 'mean±std' per metric, one row per method or dataset.

  Args:
    rows: row name -> `aggregate` output.
    digits: decimals printed.

  Returns:
    The table as a string (columns are the union of the metrics, in first-seen order).
  """
  cols: list[str] = []
  for agg in rows.values():
    cols += [k for k in agg if k not in cols]
  cells = [['', *cols]]
  for name, agg in rows.items():
    cells.append(
      [name] + [f'{agg[k][0]:.{digits}f}±{agg[k][1]:.{digits}f}' if k in agg else '-' for k in cols]
    )
  widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# JAX versions of the cheap metrics, for validation inside the training loop.


def _check_batch(ref, out) -> None:
  if ref.ndim != 4 or ref.shape != out.shape:
    raise ValueError(
      f'out: expected ref and out of the same (B, H, W, C) shape, got {ref.shape} and {out.shape}'
    )


def psnr_jax(ref, out, data_range: float = 1.0) -> jnp.ndarray:
  """Batched `psnr`: (B, H, W, C) x 2 -> (B,) mean over bands of 10 log10(R^2 / MSE_band).

  Args:
    ref: (B, H, W, C) references.
    out: (B, H, W, C) estimates.
    data_range: R.

  Returns:
    (B,) PSNR per image; jit-compatible.
  """
  ref, out = jnp.asarray(ref), jnp.asarray(out)
  _check_batch(ref, out)
  mse = jnp.mean((ref - out) ** 2, axis=(1, 2))
  return jnp.mean(10.0 * jnp.log10(data_range**2 / mse), axis=-1)


def sam_jax(ref, out) -> jnp.ndarray:
  """Batched `sam` in degrees: (B, H, W, C) x 2 -> (B,).

  Pixels with a zero spectrum in either image are masked out of the mean. The angle is computed as
  2 atan2(|u - v|, |u + v|) of the unit spectra u, v -- the same angle as arccos(u.v), but accurate
  in float32 where arccos near 1 is not.

  Args:
    ref: (B, H, W, C) references.
    out: (B, H, W, C) estimates.

  Returns:
    (B,) SAM per image (NaN for an image with no valid pixel); jit-compatible.
  """
  ref, out = jnp.asarray(ref), jnp.asarray(out)
  _check_batch(ref, out)
  nr = jnp.sqrt(jnp.sum(ref * ref, axis=-1, keepdims=True))
  no = jnp.sqrt(jnp.sum(out * out, axis=-1, keepdims=True))
  valid = (nr * no)[..., 0] > 0
  u = ref / jnp.where(nr > 0, nr, 1)
  v = out / jnp.where(no > 0, no, 1)
  diff = jnp.sqrt(jnp.sum((u - v) ** 2, axis=-1))
  summ = jnp.sqrt(jnp.sum((u + v) ** 2, axis=-1))
  angle = 2.0 * jnp.arctan2(diff, summ)
  total = jnp.sum(jnp.where(valid, angle, 0.0), axis=(1, 2))
  return total / jnp.sum(valid, axis=(1, 2)) * (180.0 / jnp.pi)


def ergas_jax(ref, out, ratio: float = 4) -> jnp.ndarray:
  """Batched `ergas`: (B, H, W, C) x 2 -> (B,).

  Args:
    ref: (B, H, W, C) references.
    out: (B, H, W, C) estimates.
    ratio: resolution ratio.

  Returns:
    (B,) ERGAS per image; jit-compatible.
  """
  ref, out = jnp.asarray(ref), jnp.asarray(out)
  _check_batch(ref, out)
  mse = jnp.mean((ref - out) ** 2, axis=(1, 2))
  mu = jnp.mean(ref, axis=(1, 2))
  return 100.0 / ratio * jnp.sqrt(jnp.mean(mse / mu**2, axis=-1))


# Transitional (issue 11): the sensor table and the resampling moved to `u2net_jax.toolbox`; these
# names go as soon as no caller reads them from here.
SENSORS = toolbox.SENSORS
get_sensor = toolbox.get_sensor
interp23tap = toolbox.interp23tap
imresize = toolbox.imresize
mtf_kernel = toolbox.mtf_kernel
mtf_filter = toolbox.mtf_filter
