"""Per-image metrics with a reference: the reduced-resolution and HISR columns of the tables.

PSNR, SAM (`SAM.m`), ERGAS (`ERGAS.m`), Q_avg (`Q.m` / `img_qi.m`), Q2n (`q2n.m`), SCC (`SCC.m`)
and the HISR evaluation's SSIM, in float64 numpy, vectorised over windows, blocks and bands. The
toolbox conventions that matter (N - 1 statistics, Q2n's uint16 cast and mirror padding) are
listed in the package docstring (`u2net_jax.metrics`). The input checks at the top are shared
with the no-reference metrics.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from u2net_jax import toolbox

# ---------------------------------------------------------------------------------------------
# Input checks (shared with `no_reference`).


def as_pair(ref, out, names=('ref', 'out')) -> tuple[np.ndarray, np.ndarray]:
  """Two images as float64 H x W x C arrays of the same shape (`toolbox.as_image` checks).

  Args:
    ref: the first image (reference, or fused image).
    out: the second image (estimate, or lms).
    names: the two arguments' names, for the error messages.

  Returns:
    (ref, out) as float64 H x W x C arrays.
  """
  a = toolbox.as_image(ref, names[0])
  b = toolbox.as_image(out, names[1])
  if a.shape != b.shape:
    raise ValueError(f'{names[1]}: shape {b.shape} does not match {names[0]} shape {a.shape}')
  return a, b


def check_sensor_scale(x: np.ndarray, name: str, metric: str) -> None:
  """Raises a ValueError when `x` looks like [0, 1] data (max |value| <= 1).

  Args:
    x: the image.
    name: its argument name, for the message.
    metric: the metric that needs the sensor scale, for the message.
  """
  # Q2n rounds to uint16 (as MATLAB does): [0, 1] data would collapse to {0, 1} and give a
  # silently wrong number, so refuse it.
  peak = float(np.max(np.abs(x)))
  if peak <= 1.0:
    raise ValueError(
      f'{name}: all values lie in [-1, 1] (max |value| {peak:g}); {metric} casts to uint16 like '
      'the MATLAB toolbox and needs data on the sensor scale (e.g. 0..2047), not [0, 1]'
    )


def check_blocks(shape, block: int, name: str) -> None:
  """Raises a ValueError unless `block` is an integer >= 2 dividing both sides of `shape`.

  Args:
    shape: the image shape (H, W, ...).
    block: the block side.
    name: the image's argument name, for the message.
  """
  if int(block) != block or block < 2:
    raise ValueError(f'block: must be an integer >= 2, got {block}')
  h, w = shape[:2]
  if h % block or w % block:
    raise ValueError(f'{name}: size {h}x{w} is not a multiple of the block size {block}')


# ---------------------------------------------------------------------------------------------
# Metrics.


def psnr(ref, out, data_range: float = 1.0) -> float:
  """Peak signal-to-noise ratio: mean over bands of 10 log10(R^2 / MSE_band).

  Args:
    ref: H x W x C reference.
    out: H x W x C estimate.
    data_range: R, the peak value (1 for images in [0, 1]; the tables use images / sensor max).

  Returns:
    PSNR in dB (inf when a band is reproduced exactly).
  """
  ref, out = as_pair(ref, out)
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
  ref, out = as_pair(ref, out)
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
  ref, out = as_pair(ref, out)
  mu = np.mean(ref, axis=(0, 1))
  if np.any(mu == 0):
    raise ValueError(
      f'ref: band(s) {np.flatnonzero(mu == 0).tolist()} have zero mean; ERGAS is undefined'
    )
  mse = np.mean((ref - out) ** 2, axis=(0, 1))
  return float(100.0 / ratio * np.sqrt(np.mean(mse / mu**2)))


def uiqi_from_moments(mx, my, vx, vy, cxy):
  """Wang-Bovik UIQI from means, variances and covariance, with `img_qi.m`'s special cases.

  4 cxy mx my / ((vx + vy)(mx^2 + my^2)); where vx + vy = 0 (both windows flat) it is
  2 mx my / (mx^2 + my^2), and 1 where that is 0/0 too.

  Args:
    mx, my: the window means (broadcastable arrays).
    vx, vy, cxy: the variances and the covariance, with any common normalisation.

  Returns:
    The UIQI of every window, broadcast shape.
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
  ref, out = as_pair(ref, out)
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
  q = uiqi_from_moments(mx, my, vx, vy, cxy)
  return float(np.mean(np.mean(q, axis=(0, 1))))


def to_uint16_matlab(a: np.ndarray) -> np.ndarray:
  """MATLAB `uint16(a)` as float64: round half away from zero, saturate to [0, 65535].

  Args:
    a: a float array.

  Returns:
    The rounded, saturated values, float64.
  """
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
  ref, out = as_pair(ref, out)
  check_sensor_scale(ref, 'ref', 'q2n')
  check_sensor_scale(out, 'out', 'q2n')
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
  ref = to_uint16_matlab(np.pad(ref, width, mode='symmetric'))
  out = to_uint16_matlab(np.pad(out, width, mode='symmetric'))
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
  ref, out = as_pair(ref, out)
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
  ref, out = as_pair(ref, out)
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
