"""The classical methods on scenes of any size, window by window (issue 22).

  plan = streaming.make_plan('mtf-glp-hpm', sensor='WV2', height=H, width=W, bands=8)
  for _ in range(plan.passes):                                 # 0, 1 or 2 statistic passes
    for window in windows: plan.accumulate(source, window)
    plan.finalize(source)
  for window in windows: out = plan.fuse(source, window)   # (h, w, C) float64, sensor scale

A `source` reads the scene at random positions on the sensor scale in float64
(`source.pan(y0, y1, x0, x1)` -> (h, w), `source.ms(y0, y1, x0, x1)` -> (h, w, C) on the MS
grid; `ArraySource` for arrays). Windows are (y0, y1, x0, x1) on the PAN grid, aligned to the
ratio. Each method's whole-image function (`u2net_jax.methods.METHODS`) is the reference; the
scene is read as the toolbox's demos take it: `I_MS_LR` = the MS, `I_MS` = interp23tap(I_MS_LR),
`I_PAN` = the PAN. A window reads what its output depends on, with the toolbox's borders:
interp23tap's are circular (a window on an edge reads the opposite edge), the MTF filters'
replicate, imresize's and the B3 wavelets' symmetric (applied only where the image ends, so a
window's interior sides consume real neighbours).

What each method is, for a streamer (`kind`):

- **local** (`exp`): the output at a pixel is a fixed function of a neighbourhood, computed
  with the same float operations, so the result is **bit-identical** to the whole-image
  function, whatever the windows. EXP is the only one: every other method scales, equalises or
  regresses with statistics of the whole image.
- **two-pass** (all the others but three): a local filter whose coefficients are image-wide
  statistics (means, standard deviations, covariances, regressions, the haze's band minimum or
  1st percentile). A statistics pass accumulates them window by window (`_Moments`: shifted sums
  and cross products; `_LeastSquares`: the R of a QR of the rows seen so far, so a regression is
  as accurate as the whole-image QR, and BDSD-PC's constrained fit is solved on R; `_Percentile`:
  the smallest 1% of the values, so the percentile is exact); `finalize` reduces them to the
  coefficients the whole-image function computes; the fusion pass applies them. PRACS needs two
  statistics passes (its regressions are on bands matched with the first pass's statistics);
  BDSD accumulates one fit per H x H block (the toolbox's block size is the height). The sums
  are taken in another order, and the 41 x 41 MTF filters are FFT convolutions whose rounding
  depends on the array's size, so the result equals the whole-image one to rounding (tested at
  <= 1e-9 of the sensor maximum; ~1e-12 observed, 5e-10 for BDSD), not bit for bit. Where the
  method is ill-conditioned the whole-image result itself moves more under rounding: MTF-GLP-HPM
  divides by a low-pass that nears 0 on real scenes (../shared/toolbox/README.md).
- **whole-image** (`c-gsa`: a k-means over all pixels; `tv`: 50 iterations coupling every
  pixel; `sr-d`: a dictionary learnt from every patch): no exact window decomposition exists, so
  `WholeImagePlan` reads the scene whole and runs the function once, when the scene has at most
  `whole_image_limit` PAN pixels (`fuse.py --whole_image_limit`), and refuses larger scenes
  with one line naming the method and why.

Size: ~1000 lines (formatted): the window operations every plan shares (reads with the toolbox's
borders, MTF/GLP, B3 and bicubic low-passes by windows), three accumulators and one small plan
per method family; split, the plans would import each other's private window operations.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from scipy import linalg, optimize, signal, sparse

from u2net_jax import toolbox
from u2net_jax.methods import METHODS, common
from u2net_jax.methods import multiresolution as mra

# interp23tap's support, in MS pixels each side: 11 taps at x2 (6 MS pixels), 11 at x4 (3); 12
# leaves room.
_INTERP_MARGIN = 12
_MTF_HALF = 20  # The 41 x 41 MTF and LPfilterGauss kernels.
# AWLP / GSA's B3-spline a trous low-pass: 2 analysis and 2 synthesis levels of 5 taps.
_B3_HALF = 2
_B3 = math.sqrt(2) * np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16

# Why a method is whole-image only (the refusal for scenes over the limit names it).
WHOLE_IMAGE_REASONS = {
  'c-gsa': 'its k-means segmentation clusters every pixel of the scene at once',
  'tv': "TV_pansharpen's 50 iterations couple every pixel of the scene",
  'sr-d': 'its dictionary is learnt from every patch of the scene',
}
DEFAULT_WHOLE_IMAGE_LIMIT = 4096 * 4096  # PAN pixels: ~7 GB of float64 arrays for 8 bands.


class StreamingError(ValueError):
  """A method cannot fuse this scene by windows (the message names the method and why)."""


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
  m = _INTERP_MARGIN
  hl, wl = source.height // ratio, source.width // ratio
  kr = np.arange(y0 // ratio - m, y1 // ratio + m) % hl
  kc = np.arange(x0 // ratio - m, x1 // ratio + m) % wl
  up = toolbox.interp23tap(low_at(kr, kc), ratio)
  return up[m * ratio : m * ratio + y1 - y0, m * ratio : m * ratio + x1 - x0]


@functools.lru_cache(maxsize=16)
def _mtf_kernels(gains: tuple[float, ...], ratio: int) -> np.ndarray:
  return np.stack([toolbox.mtf_kernel(g, ratio) for g in gains], axis=-1)


def glp_window(pan_at, gains, source, window, ratio: int) -> np.ndarray:
  """`mra.glp_low_pass(P, gains, ratio)[window]`: MTF filter (replicate), decimate, interp23tap.

  Args:
    pan_at: (rows, cols) -> (len(rows), len(cols), len(gains)): the image to low-pass (the PAN,
      equalised per band or repeated) at PAN-grid indices.
    gains: the MTF gains at Nyquist, one per band.

  Returns:
    (h, w, len(gains)) float64.
  """
  kernels = _mtf_kernels(tuple(float(g) for g in gains), ratio)
  h, w = source.height, source.width
  off = ratio // 2  # `common.decimate` keeps ratio // 2 + ratio k.

  def low_at(kr, kc):
    rows_out = []
    for rs in _segments(kr):
      row = []
      for cs in _segments(kc):
        rows = np.clip(
          np.arange(rs[0] * ratio + off - _MTF_HALF, rs[-1] * ratio + off + 21), 0, h - 1
        )
        cols = np.clip(
          np.arange(cs[0] * ratio + off - _MTF_HALF, cs[-1] * ratio + off + 21), 0, w - 1
        )
        filtered = signal.fftconvolve(pan_at(rows, cols), kernels, mode='valid', axes=(0, 1))
        row.append(filtered[::ratio, ::ratio])
      rows_out.append(np.concatenate(row, axis=1))
    return np.concatenate(rows_out, axis=0)

  return _interp_window(low_at, source, window, ratio)


def lp_gauss_window(source, window, ratio: int) -> np.ndarray:
  """`toolbox.lp_filter_gauss(PAN, ratio)[window]` (replicate borders). Returns (h, w)."""
  y0, y1, x0, x1 = window
  rows = np.clip(np.arange(y0 - _MTF_HALF, y1 + _MTF_HALF), 0, source.height - 1)
  cols = np.clip(np.arange(x0 - _MTF_HALF, x1 + _MTF_HALF), 0, source.width - 1)
  kernel = toolbox.lp_filter_gauss_kernel(ratio)
  return signal.fftconvolve(gather(source.pan, rows, cols), kernel, mode='valid')


def _valid(x: np.ndarray, axis: int) -> np.ndarray:
  return mra._valid_filter(x, _B3, axis)


def _edge_pad(x, axis, lo, hi):
  """Half-sample symmetric padding by 4 on the sides that are the image's edges."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (4 if lo else 0, 4 if hi else 0)
  return np.pad(x, widths, mode='symmetric')


def _b3_region(source_h, source_w, window, margin):
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
def _resize_sparse(in_len: int, scale: float) -> sparse.csr_matrix:
  """`toolbox.resize_matrix(in_len, scale)` (bicubic, antialiased) as a sparse matrix, built row
  by row with MATLAB's `contributions` (the dense one is in_len^2 / 4 floats: 512 MB at 16384)."""
  base, width = toolbox._cubic, 4.0
  out_len = int(math.ceil(in_len * scale))
  kernel = base
  if scale < 1:
    kernel = lambda x: scale * base(scale * x)  # noqa: E731
    width = width / scale
  x = np.arange(1, out_len + 1, dtype=np.float64)
  u = x / scale + 0.5 * (1 - 1 / scale)
  left = np.floor(u - width / 2)
  taps = int(math.ceil(width)) + 2
  idx = left[:, None] + np.arange(taps)[None, :]
  weights = kernel(u[:, None] - idx)
  weights = weights / np.sum(weights, axis=1, keepdims=True)
  aux = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
  idx = aux[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
  rows = np.repeat(np.arange(out_len), taps)
  return sparse.csr_matrix((weights.ravel(), (rows, idx.ravel())), shape=(out_len, in_len))


def _down_up_rows(n: int, ratio: int, a: int, b: int):
  """Rows a..b-1 of imresize(imresize(., 1/ratio), ratio) along an axis of length n: the dense
  (b - a, q1 - q0) operator and the input range [q0, q1) it reads."""
  down, up = _resize_sparse(n, 1 / ratio), _resize_sparse(n // ratio, float(ratio))
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


class _Moments:
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


class _LeastSquares:
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


# ---------------------------------------------------------------------------------------------
# Plans: one per method family.


class Plan:
  """How one method fuses a scene by windows.

  Attributes:
    name: the method.
    kind: 'local', 'two-pass' or 'whole-image'.
    passes: statistic passes before the fusion (0, 1 or 2): each pass is `accumulate` over
      every window, then `finalize` (which moves the plan to its next pass).
    halo: PAN pixels of context a window's output depends on beyond the window (information:
      the plan reads what it needs itself, circular borders included).
  """

  kind = 'two-pass'
  passes = 1
  halo = 0

  def __init__(self, name, sensor, ratio, height, width, bands, options):
    self.name, self.ratio = name, ratio
    self.sensor = toolbox.get_sensor(sensor) if sensor is not None else None
    self.height, self.width, self.bands = height, width, bands
    self.options = options
    self._acc: dict[str, Any] = {}

  def accumulate(self, source, window) -> None:
    """A statistics pass: adds the window's valid pixels (`source.valid`) to the statistics."""
    valid = getattr(source, 'valid', None)
    self._valid = None if valid is None else valid(*window)
    if self._valid is not None and self._valid.all():
      self._valid = None
    self._accumulate(source, window)

  def _accumulate(self, source, window) -> None:
    pass

  def _valid_on(self, shape) -> np.ndarray | None:
    """The window's valid pixels on its PAN grid or (`shape` smaller) its MS grid, where an MS
    pixel is valid when all its PAN pixels are; None when all are."""
    valid = self._valid
    if valid is None or shape == valid.shape:
      return valid
    r = self.ratio
    return valid.reshape(valid.shape[0] // r, r, valid.shape[1] // r, r).all(axis=(1, 3))

  def _rows(self, x: np.ndarray) -> np.ndarray:
    """(h, w, K) or (h, w) of the window's PAN or MS grid -> (valid pixels, K) rows."""
    x = x if x.ndim == 3 else x[..., None]
    rows = x.reshape(-1, x.shape[-1])
    valid = self._valid_on(x.shape[:2])
    return rows if valid is None else rows[valid.reshape(-1)]

  def finalize(self, source=None) -> None:
    """Reduces the statistics to the coefficients (after pass 1)."""

  def fuse(self, source, window) -> np.ndarray:
    """The fused (h, w, C) float64 window on the sensor scale."""
    raise NotImplementedError

  def _moments(self, key):
    return self._acc.setdefault(key, _Moments())

  def _lms(self, source, window):
    return lms_window(source, window, self.ratio)

  def _pan_at(self, source):
    return lambda rows, cols: gather(source.pan, rows, cols)


class ExpPlan(Plan):
  kind, passes = 'local', 0
  halo = 4 * _INTERP_MARGIN

  def fuse(self, source, window):
    return self._lms(source, window)


class GlpPlan(Plan):
  """MTF-GLP and MTF-GLP-HPM: the PAN equalised per band with image-wide statistics."""

  halo = _MTF_HALF + 4 * _INTERP_MARGIN

  def _accumulate(self, source, window):
    y0, y1, x0, x1 = window
    pan = source.pan(y0, y1, x0, x1)
    lp = lp_gauss_window(source, window, self.ratio)
    self._moments('m').add(
      self._rows(np.concatenate([pan[..., None], lp[..., None], self._lms(source, window)], -1))
    )

  def finalize(self, source=None):
    m = self._acc['m']
    mean, std = m.mean(), m.std()
    self.pan_mean, self.lp_std, self.ms_mean, self.ms_std = mean[0], std[1], mean[2:], std[2:]

  def fuse(self, source, window):
    lms = self._lms(source, window)
    y0, y1, x0, x1 = window

    def eq(pan):  # multiresolution._equalized_pan
      return common.equalize_pan(
        pan[..., None], self.pan_mean, self.lp_std, self.ms_mean, self.ms_std
      )

    low = glp_window(
      lambda r, c: eq(gather(source.pan, r, c)), self.sensor['ms_gnyq'], source, window, self.ratio
    )
    pan_eq = eq(source.pan(y0, y1, x0, x1))
    if self.name == 'mtf-glp':
      return lms + pan_eq - low
    return lms * (pan_eq / (low + common.EPS))


class GlpRegressionPlan(Plan):
  """MTF-GLP-FS and MTF-GLP-HPM-R: per-band gains from covariances with the GLP low-pass PAN."""

  halo = _MTF_HALF + 4 * _INTERP_MARGIN

  def _pan_lp(self, source, window):
    c = self.bands
    at = self._pan_at(source)
    return glp_window(
      lambda r, cc: np.repeat(at(r, cc)[..., None], c, axis=2),
      self.sensor['ms_gnyq'],
      source,
      window,
      self.ratio,
    )

  def _accumulate(self, source, window):
    y0, y1, x0, x1 = window
    pan = source.pan(y0, y1, x0, x1)
    feats = [pan[..., None], self._lms(source, window), self._pan_lp(source, window)]
    self._moments('m').add(self._rows(np.concatenate(feats, -1)))

  def finalize(self, source=None):
    m, c = self._acc['m'], self.bands
    cov, mean = m.cov(), m.mean()
    ms, lp = slice(1, 1 + c), slice(1 + c, 1 + 2 * c)
    if self.name == 'mtf-glp-fs':  # g = cov(MS_b, P) / cov(P_LP_b, P)
      self.gains = cov[ms, 0] / cov[lp, 0]
    else:  # HPM-R: g = cov(MS_b, P_LP_b) / var(P_LP_b), cb = mean(MS_b) / g - mean(P)
      idx = np.arange(c)
      self.gains = cov[1 + idx, 1 + c + idx] / cov[1 + c + idx, 1 + c + idx]
      self.cb = mean[ms] / self.gains - mean[0]

  def fuse(self, source, window):
    y0, y1, x0, x1 = window
    pan = source.pan(y0, y1, x0, x1)[..., None]
    lms, lp = self._lms(source, window), self._pan_lp(source, window)
    if self.name == 'mtf-glp-fs':
      return lms + self.gains * (pan - lp)
    return lms * (pan + self.cb) / (lp + self.cb + common.EPS)


class _Percentile:
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


class HazePlan(Plan):
  """MTF-GLP-HPM-H and BT-H: the haze is each band's minimum, or on 4 bands a fraction of its
  1st percentile (`common.haze_minimum`), found exactly by `_Percentile`."""

  halo = _MTF_HALF + 4 * _INTERP_MARGIN

  def _accumulate(self, source, window):
    lms = self._lms(source, window)
    lp = lp_gauss_window(source, window, self.ratio)
    flat, lp = self._rows(lms), self._rows(lp)
    if self.bands == 4:
      n = self.height * self.width
      self._acc.setdefault('prc', _Percentile(n, common.HAZE_PERCENTILE)).add(flat)
    elif flat.shape[0]:
      mins = flat.min(axis=0)
      self._acc['min'] = np.minimum(self._acc.get('min', mins), mins)
    ls = self._acc.setdefault('ls', _LeastSquares())
    if self.name == 'mtf-glp-hpm-h':  # [1, MS] \ LPfilterGauss(P) (MTF_GLP_HPM_Haze_min.m)
      ls.add(np.concatenate([np.ones((flat.shape[0], 1)), flat], 1), lp)
    else:  # BT-H: MS \ LPfilterGauss(P), no constant (BroveyRegHazeMin.m:61)
      ls.add(flat, lp)
      self._moments('m').add(np.concatenate([lp, flat], -1))

  def finalize(self, source=None):
    if self.bands == 4:
      self.haze = np.asarray(common.HAZE_FRACTIONS_4) * self._acc['prc'].value()
    else:
      self.haze = self._acc['min']
    w = self._acc['ls'].solve()
    if self.name == 'mtf-glp-hpm-h':
      self.haze_pan = float(w @ np.concatenate([[1.0], self.haze]))
      return
    self.alpha = w
    m = self._acc['m']
    mean, cov = m.mean(), m.cov()
    self.lp_mean, self.lp_std = mean[0], math.sqrt(max(cov[0, 0], 0.0))
    self.i_mean = (mean[1:] - self.haze) @ w  # intensity = (MS - haze) alpha, linear
    self.i_std = math.sqrt(max(w @ cov[1:, 1:] @ w, 0.0))

  def fuse(self, source, window):
    y0, y1, x0, x1 = window
    lms, pan = self._lms(source, window), source.pan(y0, y1, x0, x1)
    haze = self.haze
    if self.name == 'mtf-glp-hpm-h':
      c, at = self.bands, self._pan_at(source)
      lp = glp_window(
        lambda r, cc: np.repeat(at(r, cc)[..., None], c, axis=2),
        self.sensor['ms_gnyq'],
        source,
        window,
        self.ratio,
      )
      ratio_img = (pan[..., None] - self.haze_pan) / (lp - self.haze_pan + common.EPS)
      return (lms - haze) * ratio_img + haze
    intensity = (lms - haze) @ self.alpha
    pan_eq = common.equalize_pan(pan, self.lp_mean, self.lp_std, self.i_mean, self.i_std)
    return np.maximum(lms - haze, 0) * (pan_eq / (intensity + common.EPS))[..., None] + haze


class AwlpPlan(Plan):
  levels = 2
  halo = 4 * _INTERP_MARGIN

  def _accumulate(self, source, window):
    y0, y1, x0, x1 = window
    pan = source.pan(y0, y1, x0, x1)
    low = down_up_window(source, window, self.ratio)
    self._moments('m').add(
      self._rows(np.concatenate([pan[..., None], low[..., None], self._lms(source, window)], -1))
    )

  def finalize(self, source=None):
    m = self._acc['m']
    mean, std = m.mean(), m.std()
    self.pan_mean, self.lr_std, self.ms_mean, self.ms_std = mean[0], std[1], mean[2:], std[2:]

  def fuse(self, source, window):
    y0, y1, x0, x1 = window
    lms = self._lms(source, window)
    levels = math.ceil(math.log2(self.ratio))
    (r0, r1, c0, c1), edges = _b3_region(self.height, self.width, window, 4 * levels)
    pans = common.equalize_pan(
      source.pan(r0, r1, c0, c1)[..., None], self.pan_mean, self.lr_std, self.ms_mean, self.ms_std
    )
    low = awlp_lowpass_window(pans, edges, levels)
    # The low-pass covers the region less its consumed interior margins.
    oy, ox = (0 if edges[0] else 4 * levels), (0 if edges[2] else 4 * levels)
    low = low[y0 - r0 - oy : y1 - r0 - oy, x0 - c0 - ox : x1 - c0 - ox]
    pans = pans[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0]
    bands = self.bands
    intensity_ratio = lms / (lms.sum(axis=2, keepdims=True) / bands + common.EPS)
    return (pans - low) * intensity_ratio + lms


class GsPlan(Plan):
  """GS and GSA: Gram-Schmidt injection with gains cov(I, MS_b) / var(I)."""

  halo = 4 * _INTERP_MARGIN

  def _accumulate(self, source, window):
    y0, y1, x0, x1 = window
    pan, lms = source.pan(y0, y1, x0, x1), self._lms(source, window)
    if self.name == 'gs':
      intensity = lms.mean(axis=2)  # GS.m:43
      feats = np.concatenate([pan[..., None], intensity[..., None], lms], -1)
      self._moments('m').add(self._rows(feats))
      return
    self._moments('m').add(self._rows(np.concatenate([pan[..., None], lms], -1)))
    # GSA.m:54-56: the B3 low-passed PAN decimated, regressed on [MS_LR, 1] (the means that GSA
    # subtracts change only the constant, which the centred intensity drops).
    r = self.ratio
    (r0, r1, c0, c1), edges = _b3_region(self.height, self.width, window, 8)
    low = atrous_lowpass_window(source.pan(r0, r1, c0, c1), edges)
    oy, ox = (0 if edges[0] else 8), (0 if edges[2] else 8)
    low = low[y0 - r0 - oy : y1 - r0 - oy, x0 - c0 - ox : x1 - c0 - ox]
    low = common.decimate(low, r)
    ms_lr = source.ms(y0 // r, y1 // r, x0 // r, x1 // r)
    design = np.concatenate([ms_lr, np.ones(ms_lr.shape[:2] + (1,))], -1)
    self._acc.setdefault('ls', _LeastSquares()).add(self._rows(design), self._rows(low))

  def finalize(self, source=None):
    m = self._acc['m']
    mean, cov = m.mean(), m.cov()
    self.pan_mean, self.ms_mean = mean[0], mean[-self.bands :]
    if self.name == 'gs':
      # GS.m:46-48: the PAN matched to the zero-mean intensity (mean 0, std of I).
      self.pan_std, self.i_mean = math.sqrt(max(cov[0, 0], 0.0)), mean[1]
      self.i_std = math.sqrt(max(cov[1, 1], 0.0))
      self.gains = cov[1, 2:] / cov[1, 1]
      return
    a = self._acc['ls'].solve()[:-1]
    ms_cov = cov[1:, 1:]
    self.alpha = a
    self.gains = (a @ ms_cov) / (a @ ms_cov @ a)

  def fuse(self, source, window):
    y0, y1, x0, x1 = window
    pan, lms = source.pan(y0, y1, x0, x1), self._lms(source, window)
    if self.name == 'gs':
      i0 = lms.mean(axis=2) - self.i_mean
      pan0 = common.equalize_pan(pan, self.pan_mean, self.pan_std, 0.0, self.i_std)
    else:
      i0 = (lms - self.ms_mean) @ self.alpha
      pan0 = pan - self.pan_mean
    # _gs_fusion: MS0 + (P0 - I0) g, then each band's mean reset to the MS's (the fused
    # zero-mean bands have mean 0: P0 and I0 share theirs).
    return (lms - self.ms_mean) + (pan0 - i0)[..., None] * self.gains + self.ms_mean


class BdsdPlan(Plan):
  """BDSD (the toolbox's block = the image height: one fit per H x H block along the width) and
  BDSD-PC (one constrained fit): least squares at reduced resolution, applied per pixel.

  The fitting data (`bdsd._reduced_resolution`) by windows of the MS grid: GT =
  imresize(I_MS, 1/ratio) (bicubic, antialiased), its MTF-filtered version (replicate borders
  on the MS grid: 20 MS pixels of halo) and the MTF_PAN-filtered PAN decimated.
  """

  halo = 4 * (_MTF_HALF + 4) + 4 * _INTERP_MARGIN

  def __init__(self, *args):
    super().__init__(*args)
    if self.name == 'bdsd':
      from u2net_jax.methods import bdsd

      try:
        self.block = bdsd._check_block_size(
          self.height, (self.height, self.width), self.ratio, self.bands
        )
      except ValueError as e:
        raise StreamingError(f'--method=bdsd: {e}') from e

  def _gt(self, source, kr, kc):
    """imresize(I_MS, 1/ratio) at MS-grid rows kr x columns kc (runs of indices)."""
    r = self.ratio
    ur, uc = np.unique(kr), np.unique(kc)
    mats = []
    for u, n in ((ur, self.height), (uc, self.width)):
      m = _resize_sparse(n, 1 / r)[u[0] : u[-1] + 1].tocsc()
      used = np.flatnonzero(np.diff(m.indptr))
      p0, p1 = int(used[0]) // r * r, -(-(int(used[-1]) + 1) // r) * r
      mats.append((m[:, p0:p1].toarray(), p0, p1))
    (a, p0, p1), (b, q0, q1) = mats
    lms = lms_window(source, (p0, p1, q0, q1), r)
    g = np.tensordot(b, np.tensordot(a, lms, axes=(1, 0)), axes=(1, 1)).transpose(1, 0, 2)
    return g[np.searchsorted(ur, kr)][:, np.searchsorted(uc, kc)]

  def _fit_data(self, source, window):
    """(GT, MTF(GT), decimated MTF_PAN(PAN)) on the window's MS-grid pixels."""
    r, s = self.ratio, self.sensor
    y0, y1, x0, x1 = window
    a, b, c, d = y0 // r, y1 // r, x0 // r, x1 // r
    hl, wl = self.height // r, self.width // r
    kr = np.clip(np.arange(a - _MTF_HALF, b + _MTF_HALF), 0, hl - 1)
    kc = np.clip(np.arange(c - _MTF_HALF, d + _MTF_HALF), 0, wl - 1)
    gt_ext = self._gt(source, kr, kc)
    kernels = _mtf_kernels(tuple(float(g) for g in s['ms_gnyq']), r)
    ms_lp = signal.fftconvolve(gt_ext, kernels, mode='valid', axes=(0, 1))
    gt = gt_ext[_MTF_HALF : _MTF_HALF + b - a, _MTF_HALF : _MTF_HALF + d - c]
    off = r // 2
    rows = np.clip(np.arange(a * r + off - _MTF_HALF, (b - 1) * r + off + 21), 0, self.height - 1)
    cols = np.clip(np.arange(c * r + off - _MTF_HALF, (d - 1) * r + off + 21), 0, self.width - 1)
    kernel = toolbox.mtf_kernel(s['pan_gnyq'], r)
    pan_lp = signal.fftconvolve(gather(source.pan, rows, cols), kernel, mode='valid')[::r, ::r]
    return gt, ms_lp, pan_lp

  def _accumulate(self, source, window):
    gt, ms_lp, pan_lp = self._fit_data(source, window)
    c = self.bands
    if self.name == 'bdsd-pc':  # [PAN_LR, MS_LR] g = GT_k - MS_LR_k (BDSD_PC.m:37-48)
      design = np.concatenate([pan_lp[..., None], ms_lp], -1)
      self._acc.setdefault('ls', _LeastSquares()).add(self._rows(design), self._rows(gt - ms_lp))
      return
    # BDSD.m:88-97: per block, Hd'Hd and Hd'(b - bd) with Hd = [MS_LP, PAN_LP].
    design = np.concatenate([ms_lp, pan_lp[..., None]], -1)
    target = gt - ms_lp
    sb = self.block // self.ratio
    c0 = window[2] // self.ratio
    blocks = (c0 + np.arange(design.shape[1])) // sb
    valid = self._valid_on(design.shape[:2])
    if valid is None:
      valid = np.ones(design.shape[:2], bool)
    for k in np.unique(blocks):
      x = design[:, blocks == k][valid[:, blocks == k]]
      t = target[:, blocks == k][valid[:, blocks == k]]
      gram, xty = self._acc.setdefault(int(k), [np.zeros((c + 1, c + 1)), np.zeros((c + 1, c))])
      gram += x.T @ x
      xty += x.T @ t

  def finalize(self, source=None):
    c = self.bands
    if self.name == 'bdsd-pc':
      r11, r12 = self._acc['ls'].reduced()
      sign = np.concatenate([[1.0], -np.ones(c)])  # g = sign * y, y >= 0 (BDSD_PC.m:48)
      self.gamma = np.stack(
        [sign * optimize.nnls(r11 * sign, r12[:, k], maxiter=50 * (c + 1))[0] for k in range(c)],
        axis=1,
      )
      return
    self.gammas = {k: np.linalg.solve(g, xty) for k, (g, xty) in self._acc.items()}

  def fuse(self, source, window):
    y0, y1, x0, x1 = window
    lms = self._lms(source, window)
    pan = source.pan(y0, y1, x0, x1)[..., None]
    if self.name == 'bdsd-pc':
      return lms + np.concatenate([pan, lms], -1) @ self.gamma  # BDSD_PC.m:49
    full = np.concatenate([lms, pan], -1)  # BDSD.m:118-124
    blocks = (x0 + np.arange(x1 - x0)) // self.block
    out = np.empty_like(lms)
    for k in np.unique(blocks):
      cols = blocks == k
      out[:, cols] = lms[:, cols] + full[:, cols] @ self.gammas[int(k)]
    return out


class PracsPlan(Plan):
  """PRACS (`PRACS.m`): pass 1 the PAN's and bands' means and deviations (the histogram
  matching), pass 2 the regressions of the low-passed PAN and of the low-passed matched bands
  on [1, HM] (one QR) and the covariances of HM, MS and PAN; every later regression and
  correlation of PRACS.m is a linear combination of these (imresize is linear)."""

  passes = 2
  halo = 4 * _INTERP_MARGIN + 40

  def _hm(self, lms):
    # PRACS.m:39-45: each band matched to the PAN, clipped at 0.
    mp, sp, mb, sb = self.mp, self.sp, self.mb, self.sb
    return np.maximum((lms - mb + mp / sp * sb) * sp / sb, 0)

  def _lms_at(self, source):
    r = self.ratio

    def at(p0, p1, q0, q1):
      a0, a1, b0, b1 = p0 // r * r, -(-p1 // r) * r, q0 // r * r, -(-q1 // r) * r
      lms = lms_window(source, (a0, a1, b0, b1), r)
      return lms[p0 - a0 : p1 - a0, q0 - b0 : q1 - b0]

    return at

  def _accumulate(self, source, window):
    y0, y1, x0, x1 = window
    pan, lms = source.pan(y0, y1, x0, x1), self._lms(source, window)
    if not hasattr(self, 'mp'):
      self._moments('a').add(self._rows(np.concatenate([pan[..., None], lms], -1)))
      return
    hm = self._hm(lms)
    at = self._lms_at(source)
    pan_l = down_up_window(source, window, self.ratio)
    hm_l = down_up_window(source, window, self.ratio, lambda *w: self._hm(at(*w)))
    design = np.concatenate([np.ones(hm.shape[:2] + (1,)), hm], -1)
    targets = np.concatenate([pan_l[..., None], hm_l], -1)
    self._acc.setdefault('ls', _LeastSquares()).add(self._rows(design), self._rows(targets))
    self._moments('b').add(self._rows(np.concatenate([hm, lms, pan[..., None]], -1)))

  def finalize(self, source=None):
    c = self.bands
    if not hasattr(self, 'mp'):
      m = self._acc['a']
      mean, std = m.mean(), m.std()
      self.mp, self.sp, self.mb, self.sb = mean[0], std[0], mean[1:], std[1:]
      return
    coef = self._acc['ls'].solve()  # (1 + C, 1 + C): [1, HM] \ [PAN_L, HM_L]
    a, b = coef[:, 0], coef[:, 1:]
    m = self._acc['b']
    mean, cov = m.mean(), m.cov()
    hm, ms, pan = slice(0, c), slice(c, 2 * c), 2 * c
    c_hm, c_hm_ms = cov[hm, hm], cov[hm, ms]
    var_ms = np.diag(cov[ms, ms])

    def corr(u, cov_uv, var_v):  # corr2([1, HM] u, v) from covariances
      return cov_uv / np.sqrt(np.maximum((u[1:] @ c_hm @ u[1:]) * var_v, 0))

    cc = corr(a, a[1:] @ c_hm, np.diag(c_hm))  # :67-72, I_L with each HM band
    beta = cc * a[:, None] + (1 - cc) * b  # :76-101, the regression of imresize(I_H)
    mean_ih = cc * mean[pan] + (1 - cc) * mean[hm]
    mean_il = np.concatenate([[1.0], mean[hm]]) @ beta
    wk = [0.95 * corr(beta[:, k], beta[1:, k] @ c_hm_ms[:, k], var_ms[k]) for k in range(c)]
    self.cc, self.beta, self.offset = cc, beta, mean_ih - mean_il
    self.wk = np.array(wk) * self.sb / np.mean(self.sb)  # :109-120 (beta 0.95)
    self.cl = corr(a, a[1:] @ c_hm_ms, var_ms)  # :122-128

  def fuse(self, source, window):
    y0, y1, x0, x1 = window
    pan, lms = source.pan(y0, y1, x0, x1)[..., None], self._lms(source, window)
    hm = self._hm(lms)
    i_h = self.cc * pan + (1 - self.cc) * hm
    i_l = self.beta[0] + hm @ self.beta[1:]
    delta = i_h - i_l - self.offset
    l_i = 1 - np.abs(1 - self.cl * lms / i_l)
    return lms + self.wk * l_i * delta


class WholeImagePlan(Plan):
  """Runs the whole-image function once on the scene read whole (at most `limit` pixels)."""

  kind, passes = 'whole-image', 1

  def _accumulate(self, source, window):
    pass

  def finalize(self, source=None):
    r = self.ratio
    ms_lr = source.ms(0, self.height // r, 0, self.width // r)
    pan = source.pan(0, self.height, 0, self.width)
    lms = toolbox.interp23tap(ms_lr, r)
    opts = dict(self.options)
    if self.sensor is not None:
      opts['sensor'] = self.sensor['name']
    self._out = METHODS[self.name](lms, pan, ms_lr, ratio=r, **opts)

  def fuse(self, source, window):
    y0, y1, x0, x1 = window
    return self._out[y0:y1, x0:x1]


_PLANS = {
  'exp': ExpPlan,
  'mtf-glp': GlpPlan,
  'mtf-glp-hpm': GlpPlan,
  'mtf-glp-fs': GlpRegressionPlan,
  'mtf-glp-hpm-r': GlpRegressionPlan,
  'mtf-glp-hpm-h': HazePlan,
  'bt-h': HazePlan,
  'awlp': AwlpPlan,
  'gs': GsPlan,
  'gsa': GsPlan,
  'bdsd': BdsdPlan,
  'bdsd-pc': BdsdPlan,
  'pracs': PracsPlan,
}


def kind(name: str, bands: int = 8) -> str:
  """'local', 'two-pass' or 'whole-image' for a method and band count."""
  return _plan_class(name, bands).kind


def _plan_class(name, bands):
  return _PLANS.get(name, WholeImagePlan)


def check_method(name: str) -> str:
  """The method's name in `METHODS`' spelling (case-insensitive), or an error naming them."""
  key = str(name).lower().replace('_', '-')
  if key not in METHODS:
    raise StreamingError(
      f'--method={name}: unknown method; valid names are {", ".join(sorted(METHODS))}'
    )
  return key


def make_plan(
  name: str,
  *,
  sensor: str | None,
  height: int,
  width: int,
  bands: int,
  ratio: int | None = None,
  whole_image_limit: int = DEFAULT_WHOLE_IMAGE_LIMIT,
  **options,
) -> Plan:
  """The plan that fuses a height x width (PAN) scene of `bands` bands with method `name`.

  Args:
    name: a key of `METHODS` (case-insensitive).
    sensor: the sensor (`toolbox.get_sensor`): MTF gains, and the ratio when `ratio` is None.
    height, width: the PAN's size (multiples of the ratio).
    bands: the MS band count (the sensor's).
    ratio: the resolution ratio (default: the sensor's).
    whole_image_limit: the largest scene (PAN pixels) a whole-image method reads at once.
    **options: the method's own keyword options (whole-image methods only).

  Raises:
    StreamingError: an unknown method, a sensor whose bands differ, or a whole-image method on a
      scene over the limit (naming the method, why, and the flag).
  """
  name = check_method(name)
  entry = toolbox.get_sensor(sensor) if sensor is not None else None
  if entry is not None and entry['task'] != 'pansharpening':
    raise StreamingError(f'--sensor={sensor}: not a pansharpening sensor (the methods need a PAN)')
  if entry is not None and entry['bands'] != bands:
    raise StreamingError(f'--sensor={entry["name"]} has {entry["bands"]} bands; the MS has {bands}')
  ratio = int(ratio or (entry['ratio'] if entry else 4))
  cls = _plan_class(name, bands)
  if cls is WholeImagePlan and height * width > whole_image_limit:
    why = WHOLE_IMAGE_REASONS[name]
    raise StreamingError(
      f'--method={name} cannot stream a scene by windows: {why}; it runs on the whole scene '
      f'read at once, up to --whole_image_limit={whole_image_limit} PAN pixels, and this scene '
      f'has {height}x{width} = {height * width} (raise the limit if the memory allows, about '
      f'{_whole_image_bytes(height, width, bands) / 2**30:.1f} GiB)'
    )
  if options and cls is not WholeImagePlan:
    raise StreamingError(f'--method={name}: options {sorted(options)} are not streamed')
  return cls(name, sensor, ratio, height, width, bands, options)


def _whole_image_bytes(height, width, bands):
  # The PAN, the interpolated MS, the output and ~4 temporaries of the MS's size, float64.
  return 8 * height * width * (1 + 6 * bands)


def windows(height: int, width: int, window: int, ratio: int = 4):
  """Row-major windows (y0, y1, x0, x1) of side `window` (a multiple of ratio) over the scene."""
  for y0 in range(0, height, window):
    for x0 in range(0, width, window):
      yield y0, min(height, y0 + window), x0, min(width, x0 + window)


def fuse_arrays(name, pan, ms_lr, *, sensor, window=256, **kwargs) -> np.ndarray:
  """The whole streamed fusion of arrays (tests, small scenes): both passes over `windows`.

  Returns:
    (H, W, C) float64, equal to `METHODS[name](interp23tap(ms_lr), pan, ms_lr, sensor=...)`.
  """
  source = ArraySource(pan, ms_lr)
  plan = make_plan(
    name, sensor=sensor, height=source.height, width=source.width, bands=source.bands, **kwargs
  )
  wins = list(windows(source.height, source.width, window, plan.ratio))
  for _ in range(plan.passes):
    for w in wins:
      plan.accumulate(source, w)
    plan.finalize(source)
  out = np.empty((source.height, source.width, source.bands))
  for w in wins:
    out[w[0] : w[1], w[2] : w[3]] = plan.fuse(source, w)
  return out
