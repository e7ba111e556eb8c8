"""The benchmark toolbox's building blocks: the sensor table and the resampling primitives.

Everything here reproduces a function of the pansharpening benchmark's MATLAB toolbox (Vivone et
al.), which both the metrics (`u2net_jax.metrics`) and the data (Wald's protocol in
`u2net_jax.data.wald`, the demo data) use, so that data and metrics share one implementation:

- `SENSORS` / `get_sensor`: THE sensor table of the project. Each sensor fixes its band count, its
  maximum value (the scale every image is divided by), the MTF gains of the toolbox, the guide
  (PAN or RGB), the natural-colour bands of previews and its task. Configs name a sensor
  (`config.data.sensor`) and everything else is derived from or checked against this table
  (`config_utils.finalize`).
- `interp23tap`: the 23-tap polynomial interpolator (zero insertion phase and circular borders of
  `interp23tap.m`);
- `imresize`: MATLAB's antialiased bicubic `imresize`;
- `mtf_kernel` / `mtf_filter`: the MTF-matched low-pass filters of `genMTF.m` / `MTF.m`.

All images are H x W x C float arrays (H x W is one band); results are float64 numpy.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage, signal

# MATLAB's `eps` (2^-52): the toolbox uses it as a relative threshold (fspecial) and in Q2n.
MATLAB_EPS = float(np.finfo(np.float64).eps)

TASKS = ('pansharpening', 'hisr')

# The sensors. MTF gains at Nyquist from the toolbox's `genMTF.m` (MS) and `MTF_PAN.m` (PAN).
# GF-2 has no case in either file: `genMTF.m` falls through to its default 0.3 per band, and
# `MTF_PAN.m` has no default for an unknown sensor, so we take its 'none' value 0.15. The HISR
# datasets (CAVE, Harvard: 31 bands 400-700 nm in [0, 1], RGB guide) have no MTF in the toolbox.
# 'rgb_bands' are the natural-colour bands (red, green, blue) of previews: red 4, green 2, blue 1
# of WorldView's coastal/blue/green/yellow/red/red-edge/NIR1/NIR2; 2, 1, 0 of the blue/green/
# red/NIR four-band sensors; 650, 550 and 450 nm of the 31 HISR bands.
_EIGHT_BAND_RGB = (4, 2, 1)
_FOUR_BAND_RGB = (2, 1, 0)
_HISR_RGB = (25, 15, 5)
# The resolution ratio of every dataset here: PAN (RGB) to MS (HS) pixel size.
_RATIO = 4


def _pansharpening(name, ms_gnyq, pan_gnyq, max_value, rgb_bands, tv=None):
  return {
    'name': name,
    'task': 'pansharpening',
    'bands': len(ms_gnyq),
    'guide_bands': 1,
    'ratio': _RATIO,
    'max_value': max_value,
    'ms_gnyq': tuple(ms_gnyq),
    'pan_gnyq': pan_gnyq,
    'rgb_bands': rgb_bands,
    'tv': tv,
  }


def _hisr(name):
  return {
    'name': name,
    'task': 'hisr',
    'bands': 31,
    'guide_bands': 3,
    'ratio': _RATIO,
    'max_value': 1.0,
    'ms_gnyq': None,
    'pan_gnyq': None,
    'rgb_bands': _HISR_RGB,
    'tv': None,
  }


# 'tv': the parameters of TV pansharpening (`TV_pansharpen.m`) from the `switch sensor` of the
# toolbox's demos (Demo_Reduced_Resolution.m): PAN weights w per band, c, alpha, maxiter, lambda.
# The demo has cases 'IKONOS', {'GeoEye1', 'WV4'} and 'WV3' only; WV2 takes the WV3 set (the
# demo itself would stop on an undefined w; the shared references were made so); QB, GF-2 and
# the HISR sensors have none.
_TV_WV3 = {
  'w': (0.0657, 0.1012, 0.1537, 0.1473, 0.1245, 0.1545, 0.1338, 0.1192),
  'c': 8.0,
  'alpha': 0.75,
  'maxiter': 50,
  'lambda': 1.0e-3,
}
_TV_IKONOS = {
  'w': (0.1091, 0.2127, 0.2928, 0.3854),
  'c': 8.0,
  'alpha': 1.064,
  'maxiter': 10,
  'lambda': 0.47106,
}
_TV_GEOEYE1 = {
  'w': (0.1552, 0.3959, 0.2902, 0.1587),
  'c': 8.0,
  'alpha': 0.75,
  'maxiter': 50,
  'lambda': 157.8954,
}

SENSORS: dict[str, dict] = {
  'WV3': _pansharpening(
    'WV3',
    [0.325, 0.355, 0.360, 0.350, 0.365, 0.360, 0.335, 0.315],
    0.14,
    2047,
    _EIGHT_BAND_RGB,
    tv=_TV_WV3,
  ),
  'WV2': _pansharpening('WV2', [0.35] * 7 + [0.27], 0.11, 2047, _EIGHT_BAND_RGB, tv=_TV_WV3),
  'QB': _pansharpening('QB', [0.34, 0.32, 0.30, 0.22], 0.15, 2047, _FOUR_BAND_RGB),
  'GF2': _pansharpening('GF2', [0.3] * 4, 0.15, 1023, _FOUR_BAND_RGB),
  'IKONOS': _pansharpening(
    'IKONOS', [0.26, 0.28, 0.29, 0.28], 0.17, 2047, _FOUR_BAND_RGB, tv=_TV_IKONOS
  ),
  'GeoEye1': _pansharpening('GeoEye1', [0.23] * 4, 0.16, 2047, _FOUR_BAND_RGB, tv=_TV_GEOEYE1),
  'CAVE': _hisr('CAVE'),
  'Harvard': _hisr('Harvard'),
}

# Spellings accepted by `get_sensor`, after upper-casing and dropping '-', '_' and spaces.
_SENSOR_ALIASES = {
  'WV3': 'WV3',
  'WORLDVIEW3': 'WV3',
  'WV2': 'WV2',
  'WORLDVIEW2': 'WV2',
  'QB': 'QB',
  'QUICKBIRD': 'QB',
  'GF2': 'GF2',
  'GAOFEN2': 'GF2',
  'IKONOS': 'IKONOS',
  'GE1': 'GeoEye1',
  'GEOEYE1': 'GeoEye1',
  'GEOEYE': 'GeoEye1',
  'CAVE': 'CAVE',
  'HARVARD': 'Harvard',
}


def get_sensor(name: str) -> dict:
  """Returns the `SENSORS` entry of a sensor, accepting case and spelling variants.

  Args:
    name: 'WV3', 'WV2', 'QB', 'GF2', 'IKONOS', 'GeoEye1', 'CAVE', 'Harvard' or a variant ('wv3',
      'GF-2', 'GE1', 'GeoEye-1', 'QuickBird', 'cave', ...).

  Returns:
    The dict with 'name' (canonical), 'task' ('pansharpening' or 'hisr'), 'bands', 'guide_bands'
    (1 PAN, 3 RGB), 'ratio' (PAN to MS pixel size), 'max_value', 'ms_gnyq' (per-band MTF gains
    at Nyquist, None for HISR),
    'pan_gnyq' (None for HISR), 'rgb_bands' (red, green, blue band indices of previews) and
    'tv' (the toolbox demo's TV pansharpening parameters, or None).
  """
  key = str(name).upper().replace('-', '').replace('_', '').replace(' ', '')
  if key not in _SENSOR_ALIASES:
    raise ValueError(f'sensor: unknown sensor {name!r}; valid names are {sorted(SENSORS)}')
  return SENSORS[_SENSOR_ALIASES[key]]


# ---------------------------------------------------------------------------------------------
# Input checks shared with the metrics.


def as_image(x, name: str) -> np.ndarray:
  """`x` as a float64 H x W x C array (H x W becomes one band); rejects NaN/Inf and empty input.

  Args:
    x: an H x W x C or H x W array-like.
    name: the argument's name, for the error messages.

  Returns:
    The float64 H x W x C array.
  """
  a = np.asarray(x, dtype=np.float64)
  if a.ndim == 2:
    a = a[:, :, None]
  if a.ndim != 3:
    raise ValueError(f'{name}: expected an H x W x C (or H x W) image, got shape {a.shape}')
  if a.size == 0:
    raise ValueError(f'{name}: empty image of shape {a.shape}')
  bad = ~np.isfinite(a)
  if bad.any():
    raise ValueError(f'{name}: contains {int(bad.sum())} NaN/Inf values')
  return a


def check_ratio(ratio) -> int:
  """`ratio` as an int, checked to be a power of two (what the 23-tap interpolator handles).

  Args:
    ratio: the resolution ratio.

  Returns:
    The ratio as an int.
  """
  r = int(ratio)
  if r != ratio or r < 1 or r & (r - 1):
    raise ValueError(f'ratio: must be a power of two (the toolbox interpolator), got {ratio}')
  return r


# ---------------------------------------------------------------------------------------------
# Interpolation and resizing.

# Half of the toolbox's 23-tap polynomial interpolator (`interp23tap.m`, CDF23), centre first.
_CDF23_HALF = 2.0 * np.array(
  [
    0.5,
    0.305334091185,
    0.0,
    -0.072698593239,
    0.0,
    0.021809577942,
    0.0,
    -0.005192756653,
    0.0,
    0.000807762146,
    0.0,
    -0.000060081482,
  ]
)
_CDF23 = np.concatenate([_CDF23_HALF[:0:-1], _CDF23_HALF])


def interp23tap(image, ratio: int = 4) -> np.ndarray:
  """The toolbox's 23-tap polynomial interpolator (`interp23tap.m`).

  log2(ratio) steps of x2: zero insertion (the first step puts the samples at odd positions, as
  MATLAB's `I(2:2:end, 2:2:end)`; later steps at even ones), then the symmetric 23-tap CDF filter
  along rows and columns with circular borders (`imfilter(..., 'circular')`). MATLAB's loop runs
  `ratio/2` times, which equals log2(ratio) for the ratios 2 and 4 it is used with; for 8 it would
  give x16, so this function does log2(ratio) steps.

  Args:
    image: H x W x C or H x W array.
    ratio: power-of-two scale factor.

  Returns:
    (ratio H) x (ratio W) x C (or x W) float64 array.
  """
  ratio = check_ratio(ratio)
  a = np.asarray(image, dtype=np.float64)
  if a.ndim not in (2, 3):
    raise ValueError(f'image: expected H x W x C or H x W, got shape {a.shape}')
  first = True
  for _ in range(ratio.bit_length() - 1):
    up = np.zeros((2 * a.shape[0], 2 * a.shape[1]) + a.shape[2:])
    if first:
      up[1::2, 1::2] = a
      first = False
    else:
      up[0::2, 0::2] = a
    up = ndimage.correlate1d(up, _CDF23, axis=0, mode='wrap')
    a = ndimage.correlate1d(up, _CDF23, axis=1, mode='wrap')
  return a


def _cubic(x: np.ndarray) -> np.ndarray:
  """MATLAB's bicubic kernel (a = -0.5)."""
  ax = np.abs(x)
  ax2, ax3 = ax * ax, ax * ax * ax
  return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
    (ax > 1) & (ax <= 2)
  )


def _triangle(x: np.ndarray) -> np.ndarray:
  """MATLAB's bilinear (triangle) kernel."""
  return (x + 1) * ((-1 <= x) & (x < 0)) + (1 - x) * ((0 <= x) & (x <= 1))


def _box(x: np.ndarray) -> np.ndarray:
  """MATLAB's nearest-neighbour (box) kernel: 1 on [-0.5, 0.5)."""
  return ((-0.5 <= x) & (x < 0.5)).astype(np.float64)


# imresize's methods: (kernel, width, antialiased when shrinking), as in MATLAB's imresize.m.
_RESIZE_KERNELS = {
  'bicubic': (_cubic, 4.0, True),
  'bilinear': (_triangle, 2.0, True),
  'nearest': (_box, 1.0, False),
}


def _resize_matrix(in_len: int, scale: float, method: str = 'bicubic') -> np.ndarray:
  """(out_len, in_len) matrix of MATLAB `imresize` weights along one axis.

  The `contributions` function of MATLAB's imresize: antialiasing (all methods but 'nearest')
  widens the kernel by 1/scale when shrinking, weights are normalised per output sample, and
  out-of-range taps are mirrored (symmetric, edge sample repeated).
  """
  out_len, rows, cols, weights = resize_contributions(in_len, scale, method)
  m = np.zeros((out_len, in_len))
  np.add.at(m, (rows, cols), weights)
  return m


def resize_contributions(in_len: int, scale: float, method: str = 'bicubic'):
  """imresize's weights along one axis as (out_len, rows, cols, weights), flat (`_resize_matrix`).

  A tap of output row `rows[i]` on input sample `cols[i]` weighs `weights[i]`; taps landing on the
  same sample add up (mirrored borders).
  """
  base, width, antialias = _RESIZE_KERNELS[method]
  out_len = int(math.ceil(in_len * scale))
  kernel = base
  if scale < 1 and antialias:
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
  return out_len, np.repeat(np.arange(out_len), taps), idx.ravel(), weights.ravel()


def resize_matrix(in_len: int, scale: float, method: str = 'bicubic') -> np.ndarray:
  """The (ceil(scale in_len), in_len) matrix that `imresize` applies along one axis.

  For callers that resize many images of one size (e.g. as a sparse matrix: a row has at most
  4 / scale nonzero weights when shrinking with bicubic, 4 when enlarging).

  Args:
    in_len: the input length along the axis.
    scale: the resize factor.
    method: 'bicubic', 'bilinear' or 'nearest' (see `imresize`).

  Returns:
    float64 matrix (a fresh copy).
  """
  if method not in _RESIZE_KERNELS:
    raise ValueError(f'method: expected one of {sorted(_RESIZE_KERNELS)}, got {method!r}')
  return _resize_matrix(int(in_len), float(scale), method)


def imresize(image, scale: float, method: str = 'bicubic') -> np.ndarray:
  """MATLAB `imresize(image, scale[, method])`, antialiased when shrinking, as MATLAB does.

  Args:
    image: H x W x C or H x W array.
    scale: resize factor for both axes (e.g. 1/4); the output is ceil(scale H) x ceil(scale W).
    method: 'bicubic' (MATLAB's default), 'bilinear' (both antialiased when shrinking) or
      'nearest' (never antialiased: `imresize(x, 1/4, 'nearest')` keeps `x[2::4, 2::4]`).

  Returns:
    The resized float64 array (no rounding or clipping, as MATLAB does for double input).
  """
  a = np.asarray(image, dtype=np.float64)
  if a.ndim not in (2, 3):
    raise ValueError(f'image: expected H x W x C or H x W, got shape {a.shape}')
  if not scale > 0:
    raise ValueError(f'scale: must be positive, got {scale}')
  if method not in _RESIZE_KERNELS:
    raise ValueError(f'method: expected one of {sorted(_RESIZE_KERNELS)}, got {method!r}')
  # MATLAB resizes the dimension with the smaller scale first; with equal scales, rows first.
  a = np.tensordot(_resize_matrix(a.shape[0], scale, method), a, axes=(1, 0))
  a = np.moveaxis(np.tensordot(_resize_matrix(a.shape[1], scale, method), a, axes=(1, 1)), 0, 1)
  return a


# ---------------------------------------------------------------------------------------------
# MTF-matched filters.


@functools.lru_cache(maxsize=64)
def _gaussian_fwind1(alpha: float, size: int) -> np.ndarray:
  # fspecial('gaussian', N, alpha): sampled Gaussian, entries below eps * max zeroed, unit sum.
  r = np.arange(size) - (size - 1) / 2
  gauss = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * alpha * alpha))
  gauss[gauss < MATLAB_EPS * gauss.max()] = 0
  gauss /= gauss.sum()
  hd = gauss / gauss.max()
  # fwind1(Hd, kaiser(N)) with one 1-D window = Huang's method: fsamp2(Hd) (the inverse DFT of
  # the frequency samples, centred) times the rotated 1-D Kaiser window (MATLAB's default
  # beta 0.5), linearly interpolated at radius sqrt(t1^2 + t2^2) on t = linspace(-1, 1, N), 0
  # outside the unit circle.
  h = np.real(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(hd))))[::-1, ::-1]
  t = np.linspace(-1.0, 1.0, size)
  radius = np.hypot(t[:, None], t[None, :])
  window = np.interp(radius, t, np.kaiser(size, 0.5))
  window[radius > 1] = 0
  h = h * window
  h.setflags(write=False)
  return h


def _mtf_kernel_cached(gnyq: float, ratio: int, size: int) -> np.ndarray:
  # Read as a frequency response on fsamp2's grid, the Gaussian's value at the MS Nyquist
  # frequency (N - 1) / (2 ratio) samples from the centre is gnyq (`genMTF.m`'s alpha).
  alpha = math.sqrt(((size - 1) * (1 / ratio) / 2) ** 2 / (-2 * math.log(gnyq)))
  return _gaussian_fwind1(alpha, size)


def mtf_kernel(gnyq: float, ratio: int = 4, size: int = 41, normalize: bool = False) -> np.ndarray:
  """The toolbox's MTF-matched low-pass kernel for one band (`genMTF.m` / `MTF_PAN.m`).

  Construction, step by step:
    1. alpha = sqrt(((size - 1) / (2 ratio))^2 / (-2 ln gnyq)) (`genMTF.m`; the older `MTF.m`
       had `size` instead of `size - 1`);
    2. H = fspecial('gaussian', size, alpha): exp(-(x^2 + y^2) / (2 alpha^2)) on the integer grid
       centred at 0, entries < eps * max set to 0, normalised to unit sum; Hd = H / max(H) is read
       as the desired frequency response, so Hd = gnyq at (size - 1) / (2 ratio) grid steps from
       the centre, i.e. at (size - 1) / size of the MS Nyquist frequency on fsamp2's grid of
       step 2 / size;
    3. fwind1(Hd, kaiser(size)) (Huang's method, as in MATLAB's fwind1.m): h = fsamp2(Hd) =
       rot180(fftshift(ifft2(ifftshift(Hd)))), real part, times the circular window
       w(t1, t2) = interp1(t, kaiser(size, 0.5), sqrt(t1^2 + t2^2)), t = linspace(-1, 1, size),
       w = 0 outside radius 1.
  fwind1 does not renormalise, and neither does the toolbox, so the kernel sums to ~0.9988 for
  the sensors' gains (the window, below 1 away from the centre, scales the spatial tails down);
  `normalize=True` divides by the sum. The resulting response at the MS Nyquist frequency is a
  little under `gnyq` (0.282 for 0.3): that is the toolbox's filter, kept as is. This
  construction reproduces the shared test vectors' `d_lambda_k` to ~1e-14, but has not been run
  against MATLAB's own `fwind1` (Octave has none).

  Args:
    gnyq: MTF gain at the Nyquist frequency, in (0, 1).
    ratio: resolution ratio.
    size: kernel side (41 in the toolbox).
    normalize: rescale to unit sum (departs from the toolbox by ~1e-3).

  Returns:
    size x size float64 kernel, symmetric.
  """
  if not 0 < gnyq < 1:
    raise ValueError(f'gnyq: must lie in (0, 1), got {gnyq}')
  if int(size) != size or size < 3 or size % 2 == 0:
    raise ValueError(f'size: must be an odd integer >= 3, got {size}')
  h = _mtf_kernel_cached(float(gnyq), int(ratio), int(size))
  return h / h.sum() if normalize else h.copy()


def mtf_filter(image, gnyq, ratio: int = 4) -> np.ndarray:
  """Low-passes each band with its MTF-matched kernel (`MTF.m`), same size, replicate borders.

  The kernels are the toolbox's (`mtf_kernel`, not renormalised), so a flat image comes back
  scaled by ~0.9988, exactly as MATLAB's `MTF.m` does.

  Args:
    image: H x W x C array with a sequence of C gains, or H x W with a scalar gain.
    gnyq: the Nyquist gain(s) (e.g. `get_sensor('WV3')['ms_gnyq']`).
    ratio: resolution ratio.

  Returns:
    Filtered float64 array of the input's shape (not decimated).
  """
  a = as_image(image, 'image')
  squeeze = np.ndim(image) == 2
  gains = np.atleast_1d(np.asarray(gnyq, dtype=np.float64))
  if gains.ndim != 1 or gains.size not in (1, a.shape[2]):
    raise ValueError(f'gnyq: {gains.size} gains for an image with {a.shape[2]} bands')
  gains = np.broadcast_to(gains, (a.shape[2],))
  kernels = np.stack([_mtf_kernel_cached(float(g), int(ratio), 41) for g in gains], axis=-1)
  filtered = _filter_replicate(a, kernels)
  return filtered[:, :, 0] if squeeze else filtered


def _filter_replicate(a: np.ndarray, kernels: np.ndarray) -> np.ndarray:
  """`imfilter(a(:, :, k), kernels(:, :, k), 'replicate')` per band k, for symmetric kernels."""
  half = kernels.shape[0] // 2
  # imfilter(..., 'replicate') is a correlation; the kernels are symmetric, so an FFT convolution
  # of the edge-padded image ('valid' part) is the same filter (41 x 41 is not separable).
  padded = np.pad(a, ((half, half), (half, half), (0, 0)), mode='edge')
  return signal.fftconvolve(padded, kernels, mode='valid', axes=(0, 1))


# `LPfilterGauss.m`'s fixed Nyquist gain and kernel side.
LP_GAUSS_GNYQ = 0.3
LP_GAUSS_SIZE = 41


def lp_filter_gauss_kernel(ratio: int = 4) -> np.ndarray:
  """The kernel of the toolbox's `LPfilterGauss.m` (GNyq 0.3, 41 x 41).

  It is `mtf_kernel(0.3)`'s construction except for one line: `LPfilterGauss.m` computes the
  Gaussian's width as alpha = sqrt((N fcut / 2)^2 / (-2 ln 0.3)) with N = 41, where `genMTF.m`
  has N - 1 = 40, so this kernel is a little wider than `mtf_kernel(0.3, ratio)`.

  Args:
    ratio: resolution ratio (fcut = 1 / ratio).

  Returns:
    41 x 41 float64 kernel (not renormalised, like the toolbox's).
  """
  n = LP_GAUSS_SIZE
  alpha = math.sqrt((n * (1 / int(ratio) / 2)) ** 2 / (-2 * math.log(LP_GAUSS_GNYQ)))
  return _gaussian_fwind1(alpha, n).copy()


def lp_filter_gauss(image, ratio: int = 4) -> np.ndarray:
  """The toolbox's `LPfilterGauss(image, ratio)`: `lp_filter_gauss_kernel` with replicate borders.

  Args:
    image: H x W x C or H x W array (every band gets the same kernel).
    ratio: resolution ratio.

  Returns:
    Filtered float64 array of the input's shape.
  """
  a = as_image(image, 'image')
  kernel = lp_filter_gauss_kernel(ratio)[:, :, None]
  filtered = _filter_replicate(a, np.broadcast_to(kernel, kernel.shape[:2] + (a.shape[2],)))
  return filtered[:, :, 0] if np.ndim(image) == 2 else filtered
