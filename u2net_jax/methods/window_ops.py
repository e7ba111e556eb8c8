"""The toolbox's image operations by windows, and image-wide statistics gathered window by window.

What `methods.streaming`'s plans are built from (issue 22):

- reading: `gather` reads a window's rows and columns that may repeat (replicate borders) or wrap
  (circular borders) as a few rectangles; `ArraySource` is a scene held as arrays;
- window operations, each the window's part of a whole-image operation of the toolbox, reading
  what it depends on with the toolbox's borders: `lms_window` (interp23tap, circular; bit for
  bit, by `interp23tap`: polyphase, only the crop's outputs), `glp_window` (MTF filter with
  replicate borders, decimation, interp23tap; `_filter_decimate` computes only the decimated
  outputs, in the frequency domain),
  `lp_gauss_window` (LPfilterGauss), `awlp_lowpass_window` and `atrous_lowpass_window` (the B3
  wavelets, symmetric padding only at the image's edges; AWLP's bit for bit),
  `down_up_window` (imresize down and up, bicubic, symmetric; sparse resize matrices);
- accumulators: `Moments` (means and covariances from shifted sums), `LeastSquares` (the R of a
  QR of the rows seen so far: regressions as accurate as the whole-image QR, and any least
  squares with constraints solvable on R), `Percentile` (MATLAB's prctile, exactly, from the
  smallest values).

Windows are (y0, y1, x0, x1) on the PAN grid, aligned to the ratio; a `source` has `pan(y0, y1,
x0, x1)` -> (h, w) and `ms(...)` -> (h, w, C) (MS grid) in float64 on the sensor scale.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import fft as sp_fft
from scipy import linalg, signal, sparse

from u2net_jax import toolbox
from u2net_jax.methods import multiresolution as mra

# interp23tap's support, in MS pixels each side: 11 taps at x2 (6 MS pixels), 11 at x4 (3); 12
# leaves room.
INTERP_MARGIN = 12
MTF_HALF = 20  # The 41 x 41 MTF and LPfilterGauss kernels.
# AWLP / GSA's B3-spline a trous low-pass: 2 analysis and 2 synthesis levels of 5 taps.
_B3_HALF = 2
_B3 = math.sqrt(2) * np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16

# ---------------------------------------------------------------------------------------------
# Reading.


class ArraySource:
  """A scene held as arrays (tests, small scenes): the `source` interface of the plans.

  Args:
    pan: (H, W) PAN.
    ms_lr: (H / ratio, W / ratio, C) MS.
  """

  def __init__(self, pan: np.ndarray, ms_lr: np.ndarray):
    self._pan = np.asarray(pan, np.float64)
    self._ms = np.asarray(ms_lr, np.float64)
    self.height, self.width = self._pan.shape[:2]
    self.bands = self._ms.shape[2]

  def pan(self, y0, y1, x0, x1):
    return self._pan[y0:y1, x0:x1]

  def ms(self, y0, y1, x0, x1):
    return self._ms[y0:y1, x0:x1]


def _segments(idx: np.ndarray) -> list[np.ndarray]:
  """`idx` cut into runs of consecutive increasing integers."""
  return np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)


def gather(read, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """`image[rows][:, cols]` for index arrays that may repeat (replicate) or wrap (circular).

  Reads each run of needed rows x run of needed columns once with `read(y0, y1, x0, x1)`: a
  window on the image's edge with circular borders reads two strips, not the whole image.
  """
  ur, uc = np.unique(rows), np.unique(cols)
  block = np.concatenate(
    [
      np.concatenate([read(r[0], r[-1] + 1, c[0], c[-1] + 1) for c in _segments(uc)], axis=1)
      for r in _segments(ur)
    ],
    axis=0,
  )
  return block[np.searchsorted(ur, rows)][:, np.searchsorted(uc, cols)]


# ---------------------------------------------------------------------------------------------
# Window operations: each returns the window's part of a whole-image operation.


def lms_window(source, window, ratio: int) -> np.ndarray:
  """`interp23tap(I_MS_LR, ratio)[y0:y1, x0:x1]`, bit-identical (circular borders read).

  Returns:
    (y1 - y0, x1 - x0, C) float64.
  """
  y0, y1, x0, x1 = window
  return _interp_window(lambda kr, kc: gather(source.ms, kr, kc), source, window, ratio)


def _interp_window(low_at, source, window, ratio):
  """interp23tap of a low-resolution image given as `low_at(rows, cols)` (MS grid indices)."""
  y0, y1, x0, x1 = window
  m = INTERP_MARGIN
  hl, wl = source.height // ratio, source.width // ratio
  kr = np.arange(y0 // ratio - m, y1 // ratio + m) % hl
  kc = np.arange(x0 // ratio - m, x1 // ratio + m) % wl
  crop = (m * ratio, m * ratio + y1 - y0, m * ratio, m * ratio + x1 - x0)
  return interp23tap(low_at(kr, kc), ratio, crop)


# interp23tap's filter is half-band: its taps at even offsets but 0 are 0, so of the
# zero-inserted signal it filters, an output on a sample is the sample times the centre tap and
# one between samples is the sum over the 6 odd taps of (left + right neighbour) * tap.
_CDF23_HALF = toolbox._CDF23_HALF  # Centre first.
_ODD_TAPS = (11, 9, 7, 5, 3, 1)
_INTERP_BLOCK = 8  # Lines per block: the block's temporaries stay in the cache.


def interp23tap(image: np.ndarray, ratio: int, crop=None) -> np.ndarray:
  """`toolbox.interp23tap(image, ratio)[y0:y1, x0:x1]` bit for bit, ~3x faster: each x2 step
  computes only the outputs between samples (polyphase), without the inserted zeros, by blocks of
  lines, and only those the crop depends on.

  Bit for bit because it does the float operations `scipy.ndimage.correlate1d` does for a
  symmetric filter, in its order (`centre * w0`, then `+= (left + right) * w_j` from the
  outermost tap in), less the terms that add an exact 0 (zero samples, zero taps): the same sum.

  Args:
    image: (H, W, C) or (H, W).
    ratio: a power of two.
    crop: (y0, y1, x0, x1) of the (ratio H, ratio W) output; default all of it.
  """
  a = np.asarray(image, np.float64)
  steps = ratio.bit_length() - 1
  h, w = a.shape[:2]
  y0, y1, x0, x1 = (0, ratio * h, 0, ratio * w) if crop is None else crop
  outputs = []  # Each step's output range, unwrapped positions (circular: mod its length).
  for _ in range(steps):
    outputs.insert(0, (y0, y1, x0, x1))
    y0, y1, x0, x1 = _interp_inputs(y0, y1) + _interp_inputs(x0, x1)
  a = a[np.arange(y0, y1) % h][:, np.arange(x0, x1) % w]  # Circular borders: read once.
  phase = 1  # The first step puts the samples at odd positions, later ones at even.
  for oy0, oy1, ox0, ox1 in outputs:
    a = _interp_axis(a, 0, phase, y0, oy0, oy1)
    a = _interp_axis(a, 1, phase, x0, ox0, ox1)
    y0, x0, phase = oy0, ox0, 0
  return a


def _interp_pairs(o0, o1):
  """The samples i0..i1-1 whose output pairs (2i, 2i + 1) cover the outputs o0..o1-1."""
  return (o0 - 1) // 2, o1 // 2 + 1


def _interp_inputs(o0, o1):
  """The input positions a x2 step reads for its outputs o0..o1-1."""
  i0, i1 = _interp_pairs(o0, o1)
  return i0 - 6, i1 + 6


def _interp_axis(a, axis, phase, base, o0, o1):
  """Outputs o0..o1-1 of one x2 step of interp23tap along `axis`, from `a` holding the input
  positions base, base + 1, ... (those `_interp_inputs` names)."""
  i0, i1 = _interp_pairs(o0, o1)
  shape = list(a.shape)
  shape[axis] = 2 * (i1 - i0)
  result = np.empty(shape)  # C order: the blocks of lines along the other axis stay contiguous.
  a, out = np.moveaxis(a, axis, 0), np.moveaxis(result, axis, 0)
  n, m = i1 - i0, a.shape[1]
  first = i0 - 6 - base  # a's index of input position i0 - 6.
  between = np.empty((n, min(_INTERP_BLOCK, m)) + a.shape[2:])
  s = np.empty_like(between)
  for c0 in range(0, m, _INTERP_BLOCK):
    c1 = min(m, c0 + _INTERP_BLOCK)
    ext = np.ascontiguousarray(a[first : first + n + 12, c0:c1])  # The layout of t and sb.
    t, sb = between[:, : c1 - c0], s[:, : c1 - c0]
    for k, j in enumerate(_ODD_TAPS):
      lo, hi = (-(j + 1) // 2, (j - 1) // 2) if phase else (-(j - 1) // 2, (j + 1) // 2)
      np.add(ext[6 + lo : 6 + lo + n], ext[6 + hi : 6 + hi + n], out=sb)
      if k == 0:
        np.multiply(sb, _CDF23_HALF[j], out=t)
      else:
        sb *= _CDF23_HALF[j]
        t += sb
    out[1 - phase :: 2, c0:c1] = t
    out[phase::2, c0:c1] = ext[6 : 6 + n] * _CDF23_HALF[0]
  lo = o0 - 2 * i0
  return result[(slice(None),) * axis + (slice(lo, lo + o1 - o0),)]


@functools.lru_cache(maxsize=16)
def mtf_kernels(gains: tuple[float, ...], ratio: int) -> np.ndarray:
  return np.stack([toolbox.mtf_kernel(g, ratio) for g in gains], axis=-1)


def glp_window(pan_at, gains, source, window, ratio: int, scale=None, offset=None) -> np.ndarray:
  """`mra.glp_low_pass(P_b, gains, ratio)[window]` of the bands P_b = scale_b PAN + offset_b:
  MTF filter (replicate), decimate, interp23tap.

  Filtering is linear, so the PAN is filtered once per band's kernel and each band's affine map
  applied to the decimated result (`filter(s P + o) = s filter(P) + o sum(h)`: the same values as
  filtering each band to rounding); the filter computes only the decimated outputs
  (`_filter_decimate`).

  Args:
    pan_at: (rows, cols) -> (len(rows), len(cols)): the image to low-pass (the PAN, centred) at
      PAN-grid indices; or -> (len(rows), len(cols), len(gains)): one image per band.
    gains: the MTF gains at Nyquist, one per band.
    scale, offset: (len(gains),) each band's affine map of the image (default 1 and 0).

  Returns:
    (h, w, len(gains)) float64.
  """
  kernels = mtf_kernels(tuple(float(g) for g in gains), ratio)
  h, w = source.height, source.width
  off = ratio // 2  # `common.decimate` keeps ratio // 2 + ratio k.
  scale = np.ones(len(gains)) if scale is None else np.asarray(scale, np.float64)
  offset = np.zeros(len(gains)) if offset is None else np.asarray(offset, np.float64)
  offset = offset * kernels.sum(axis=(0, 1))
  bands = range(len(gains))

  def low_at(kr, kc):
    rows_out = []
    for rs in _segments(kr):
      row = []
      for cs in _segments(kc):
        rows = np.clip(
          np.arange(rs[0] * ratio + off - MTF_HALF, rs[-1] * ratio + off + 21), 0, h - 1
        )
        cols = np.clip(
          np.arange(cs[0] * ratio + off - MTF_HALF, cs[-1] * ratio + off + 21), 0, w - 1
        )
        image = pan_at(rows, cols)
        if image.ndim == 3:  # One image per band.
          low = [_filter_decimate(image[..., i], kernels[..., i : i + 1], ratio) for i in bands]
          row.append(np.concatenate(low, axis=2) * scale + offset)
        else:
          row.append(_filter_decimate(image, kernels, ratio) * scale + offset)
      rows_out.append(np.concatenate(row, axis=1))
    return np.concatenate(rows_out, axis=0)

  return _interp_window(low_at, source, window, ratio)


def _fast_len(n: int, ratio: int) -> int:
  """The smallest FFT-friendly length >= n that is a multiple of ratio."""
  n = sp_fft.next_fast_len(n, real=True)
  while n % ratio:
    n = sp_fft.next_fast_len(n + 1, real=True)
  return n


def _filter_decimate(x: np.ndarray, kernels: np.ndarray, ratio: int) -> np.ndarray:
  """`fftconvolve(x[..., None], kernels, 'valid', axes=(0, 1))[::ratio, ::ratio]`, decimating in
  the frequency domain: one transform of `x` for all kernels, and per kernel the spectrum
  folded (aliased) along the rows so the row inverse is `ratio` times shorter.

  A circular convolution of a length L >= the input's, L a multiple of ratio, equals the linear
  one on the valid outputs; its samples ratio m are the inverse transform of length L / ratio of
  the spectrum summed over its ratio aliases (divided by ratio).

  Args:
    x: (R, C) image.
    kernels: (k, k, B), k odd, with (k - 1) a multiple of ratio.

  Returns:
    (ceil((R - k + 1) / ratio), ceil((C - k + 1) / ratio), B) float64.
  """
  k = kernels.shape[0]
  r, c = x.shape
  l0, l1 = _fast_len(r, ratio), _fast_len(c, ratio)
  spec = sp_fft.rfft2(x, s=(l0, l1))
  kspec = sp_fft.fft(sp_fft.rfft(kernels, n=l1, axis=1), n=l0, axis=0)
  first = (k - 1) // ratio  # The first valid output is the circular one at k - 1.
  nr, nc = -(-(r - k + 1) // ratio), -(-(c - k + 1) // ratio)
  out = np.empty((nr, nc, kernels.shape[2]))
  for b in range(kernels.shape[2]):
    folded = (spec * kspec[:, :, b]).reshape(ratio, l0 // ratio, -1).sum(axis=0)
    rows = sp_fft.ifft(folded[:, :], axis=0)[first : first + nr] / ratio
    out[:, :, b] = sp_fft.irfft(rows, n=l1, axis=1)[:, k - 1 :: ratio][:, :nc]
  return out


def lp_gauss_window(source, window, ratio: int) -> np.ndarray:
  """`toolbox.lp_filter_gauss(PAN, ratio)[window]` (replicate borders). Returns (h, w)."""
  y0, y1, x0, x1 = window
  rows = np.clip(np.arange(y0 - MTF_HALF, y1 + MTF_HALF), 0, source.height - 1)
  cols = np.clip(np.arange(x0 - MTF_HALF, x1 + MTF_HALF), 0, source.width - 1)
  kernel = toolbox.lp_filter_gauss_kernel(ratio)
  return signal.fftconvolve(gather(source.pan, rows, cols), kernel, mode='valid')


def _valid(x: np.ndarray, axis: int) -> np.ndarray:
  return mra._valid_filter(x, _B3, axis)


def _edge_pad(x, axis, lo, hi):
  """Half-sample symmetric padding by 4 on the sides that are the image's edges."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (4 if lo else 0, 4 if hi else 0)
  return np.pad(x, widths, mode='symmetric')


def b3_region(source_h, source_w, window, margin):
  """The PAN region [r0, r1) x [c0, c1) read for a B3 low-pass, and which sides are edges."""
  y0, y1, x0, x1 = window
  r0, r1 = max(0, y0 - margin), min(source_h, y1 + margin)
  c0, c1 = max(0, x0 - margin), min(source_w, x1 + margin)
  return (r0, r1, c0, c1), (r0 == 0, r1 == source_h, c0 == 0, c1 == source_w)


def awlp_lowpass_window(images, edges, levels):
  """`mra.awlp_low_pass` of a region: symmetric padding only on the image's edges, so interior
  sides consume their real margin (4 * levels pixels); the same float operations per pixel."""
  top, bottom, left, right = edges
  x = images
  for _ in range(levels):
    x = _valid(_edge_pad(x, 1, left, right), 1)
    x = _valid(_edge_pad(x, 0, top, bottom), 0)
  for _ in range(levels):
    x = _valid(_valid(x, 0), 1) / 4
  return x


def atrous_lowpass_window(image, edges):
  """`component_substitution._atrous_lowpass_matrix` applied along both axes to a region (the
  full-resolution low-pass of `lp_filter_plus_dec`, before decimation): symmetric extension at
  the image's edges only; each synthesis level / 2."""
  top, bottom, left, right = edges
  x = image
  for axis, lo, hi in ((0, top, bottom), (1, left, right)):
    for _ in range(2):
      x = _valid(_edge_pad(x, axis, lo, hi), axis)
    for _ in range(2):
      x = _valid(x, axis) / 2
  return x


@functools.lru_cache(maxsize=8)
def resize_sparse(in_len: int, scale: float) -> sparse.csr_matrix:
  """`toolbox.resize_matrix(in_len, scale)` (bicubic, antialiased) as a sparse matrix, built row
  by row with MATLAB's `contributions` (the dense one is in_len^2 / 4 floats: 512 MB at 16384)."""
  out_len, rows, cols, weights = toolbox.resize_contributions(in_len, scale)
  return sparse.csr_matrix((weights, (rows, cols)), shape=(out_len, in_len))


def _down_up_rows(n: int, ratio: int, a: int, b: int):
  """Rows a..b-1 of imresize(imresize(., 1/ratio), ratio) along an axis of length n: the dense
  (b - a, q1 - q0) operator and the input range [q0, q1) it reads."""
  down, up = resize_sparse(n, 1 / ratio), resize_sparse(n // ratio, float(ratio))
  op = (up[a:b] @ down).tocsc()
  used = np.flatnonzero(np.diff(op.indptr))
  q0, q1 = int(used[0]), int(used[-1]) + 1
  return op[:, q0:q1].toarray(), q0, q1


def down_up_window(source, window, ratio, image_at=None):
  """`imresize(imresize(X, 1/ratio), ratio)[window]` (bicubic, symmetric borders) of the PAN, or
  of `image_at(y0, y1, x0, x1)` -> (h, w, K) (any image on the PAN grid, K bands at once)."""
  y0, y1, x0, x1 = window
  ry, p0, p1 = _down_up_rows(source.height, ratio, y0, y1)
  rx, q0, q1 = _down_up_rows(source.width, ratio, x0, x1)
  if image_at is None:
    return ry @ source.pan(p0, p1, q0, q1) @ rx.T
  x = np.tensordot(ry, image_at(p0, p1, q0, q1), axes=(1, 0))
  return np.tensordot(rx, x, axes=(1, 1)).transpose(1, 0, 2)


# ---------------------------------------------------------------------------------------------
# Image-wide statistics accumulated window by window.


class Moments:
  """Count, means and covariances (N - 1) of per-pixel features, from shifted sums."""

  def __init__(self):
    self.n, self.shift, self.s1, self.s2 = 0, None, None, None

  def add(self, features: np.ndarray) -> None:
    x = features.reshape(-1, features.shape[-1])
    if not x.shape[0]:
      return
    if self.shift is None:  # The first window's means: sums of small deviations.
      self.shift = x.mean(axis=0)
      self.s1 = np.zeros_like(self.shift)
      self.s2 = np.zeros((x.shape[1], x.shape[1]))
    d = x - self.shift
    self.n += d.shape[0]
    self.s1 += d.sum(axis=0)
    self.s2 += d.T @ d

  def mean(self) -> np.ndarray:
    return self.shift + self.s1 / self.n

  def cov(self) -> np.ndarray:
    return (self.s2 - np.outer(self.s1, self.s1) / self.n) / (self.n - 1)

  def std(self) -> np.ndarray:
    return np.sqrt(np.maximum(np.diag(self.cov()), 0))  # A constant's: 0, not -1e-16.


class LeastSquares:
  """Least squares x \\ y over rows seen window by window: the R of a QR of [x, y], updated."""

  def __init__(self):
    self.r = None

  def add(self, x: np.ndarray, y: np.ndarray) -> None:
    """Adds rows: x (..., K) and y (...) or (..., T) targets."""
    self.k = x.shape[-1]
    x = x.reshape(-1, self.k)
    if not x.shape[0]:
      return
    a = np.concatenate([x, y.reshape(x.shape[0], -1)], axis=1)
    if self.r is not None:
      a = np.concatenate([self.r, a], axis=0)
    self.r = np.linalg.qr(a, mode='r')

  def solve(self) -> np.ndarray:
    """The least-squares solution(s): (K,) for one target, (K, T) for several."""
    k = self.k
    out = linalg.solve_triangular(self.r[:k, :k], self.r[:k, k:])
    return out[:, 0] if out.shape[1] == 1 else out

  def reduced(self) -> tuple[np.ndarray, np.ndarray]:
    """(R11, R12): ||x g - y_t||^2 = ||R11 g - R12[:, t]||^2 + a constant, for any g."""
    return self.r[: self.k, : self.k], self.r[: self.k, self.k :]


class Percentile:
  """MATLAB's `prctile` (numpy's 'hazen') of each column over every row seen, exactly.

  The percentile of N values needs two order statistics; only the smallest ones can be among them
  (1% of N for the haze's 1st percentile), so the smallest K are kept across windows
  (`np.partition`): exact, in memory K x columns.
  """

  def __init__(self, n_max: int, q: float):
    self.q, self.n, self.kept = q, 0, None
    self.k = self._ranks(n_max)[1] + 1  # Enough for any count up to n_max.

  def _ranks(self, n):
    v = n * self.q / 100 - 0.5  # numpy's hazen: n q + (alpha + q (1 - alpha - beta)) - 1
    lo = math.floor(v)
    return min(max(lo, 0), n - 1), min(max(lo + 1, 0), n - 1), v - lo

  def add(self, x: np.ndarray) -> None:
    self.n += x.shape[0]
    x = x if self.kept is None else np.concatenate([self.kept, x], axis=0)
    self.kept = np.partition(x, self.k - 1, axis=0)[: self.k] if x.shape[0] > self.k else x

  def value(self) -> np.ndarray:
    lo, hi, g = self._ranks(self.n)
    s = np.sort(self.kept, axis=0)
    a, b = s[lo], s[hi]
    diff = b - a
    return a + diff * g if g < 0.5 else b - diff * (1 - g)  # numpy's _lerp
