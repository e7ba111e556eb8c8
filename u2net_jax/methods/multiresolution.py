"""Multiresolution-analysis (MRA) pansharpening: AWLP and the MTF-GLP family of the toolbox.

Each function reproduces one MATLAB file of the benchmark toolbox (Vivone et al., GRSM 2021)
line by line, in float64, called as the toolbox's demo calls it (see `u2net_jax.methods`):

| name | MATLAB call |
|---|---|
| `awlp` | `AWLP(I_MS, I_PAN, ratio)` |
| `mtf-glp` | `MTF_GLP(I_MS, I_PAN, sensor, ratio)` |
| `mtf-glp-fs` | `MTF_GLP_FS(I_MS, I_PAN, sensor, ratio)` |
| `mtf-glp-hpm` | `MTF_GLP_HPM(I_MS, I_PAN, sensor, ratio)` |
| `mtf-glp-hpm-h` | `MTF_GLP_HPM_Haze_min(I_MS, I_PAN, sensor, ratio, 1)` |
| `mtf-glp-hpm-r` | `MTF_GLP_HPM_R(I_MS, I_PAN, sensor, ratio)` |

The building blocks (the MTF-matched filters of `genMTF.m`, `LPfilterGauss.m`, `interp23tap.m`,
MATLAB's `imresize`) come from `u2net_jax.toolbox`. MATLAB's `std2` and `cov` normalise by
N - 1, `eps` is 2^-52.

Streaming: every method here is a few global statistics of the whole image (means, standard
deviations, covariances, one regression) followed by a local filter. `halo(name, ratio)` gives
the local part's support radius on the PAN grid: a window extended by the halo on each side (and
aligned to the ratio) reproduces the interior output given the global statistics (checked in
`tests/methods_mra_test.py`). Two caveats for a streamer: `interp23tap`'s borders are circular
(the top rows depend on the bottom ones), and the 41 x 41 filters use FFT convolution, whose
rounding depends on the array size (window vs whole image: ~5e-14 apart on values ~100, not
bit-identical; a direct convolution would be).
"""

from __future__ import annotations

import math

import numpy as np

from u2net_jax import toolbox
from u2net_jax.methods.common import EPS, check_inputs, decimate, equalize_pan, haze_minimum, std2

# ---------------------------------------------------------------------------------------------
# Helpers of this family (the ones shared with the others are in `u2net_jax.methods.common`).


def _cov(x: np.ndarray, y: np.ndarray) -> float:
  # MATLAB's cov(x, y)(1, 2): the cross-covariance, normalised by N - 1.
  x, y = x.ravel(), y.ravel()
  return float(np.dot(x - x.mean(), y - y.mean()) / (x.size - 1))


def glp_low_pass(images: np.ndarray, gains, ratio: int) -> np.ndarray:
  """The GLP's low-pass of each band: `interp23tap(imresize(imfilter(P, h_b), 1/r, 'nearest'), r)`.

  `MTF_GLP.m` lines 56-61 (the same loop in the other GLP files): the band's MTF-matched filter
  (`genMTF.m`, replicate borders), nearest decimation, then the 23-tap interpolator.

  Args:
    images: (H, W, C) float64, one image per band.
    gains: C MTF gains at Nyquist.
    ratio: the resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  return toolbox.interp23tap(decimate(toolbox.mtf_filter(images, gains, ratio), ratio), ratio)


def _equalized_pan(pan: np.ndarray, lms: np.ndarray, ratio: int) -> np.ndarray:
  """(P - mean P) std(MS_b) / std(LPfilterGauss(P)) + mean(MS_b) per band (`MTF_GLP.m` l. 51-53)."""
  std_lp = std2(toolbox.lp_filter_gauss(pan, ratio))
  return equalize_pan(pan[:, :, None], pan.mean(), std_lp, lms.mean(axis=(0, 1)), std2(lms, (0, 1)))


# ---------------------------------------------------------------------------------------------
# The MTF-GLP family.


def mtf_glp(lms, pan, ms_lr=None, *, sensor, ratio=4):
  """MTF-GLP (`MTF_GLP.m`): additive injection of the equalised PAN's MTF-GLP details.

  P_b = (P - mean P) std(MS_b) / std(LPfilterGauss(P)) + mean(MS_b); out_b = MS_b + P_b -
  interp23tap(decimate(MTF_b(P_b))).

  Args:
    lms: (H, W, C) MS on the PAN grid.
    pan: (H, W) PAN.
    ms_lr: unused (the toolbox's call does not take it).
    sensor: sensor name (its MTF gains).
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, entry, ratio = check_inputs(lms, pan, None, ratio, sensor, need_ms_lr=False)
  pan_eq = _equalized_pan(pan, lms, ratio)
  return lms + pan_eq - glp_low_pass(pan_eq, entry['ms_gnyq'], ratio)


def mtf_glp_hpm(lms, pan, ms_lr=None, *, sensor, ratio=4):
  """MTF-GLP-HPM (`MTF_GLP_HPM.m`): multiplicative injection, out = MS P_b / (P_b,LP + eps).

  The equalised PAN and its low-pass are MTF-GLP's. The divisor is not guarded beyond `eps`:
  where P_b,LP approaches 0 the output explodes, as the toolbox's does.

  Args:
    lms: (H, W, C) MS on the PAN grid.
    pan: (H, W) PAN.
    ms_lr: unused.
    sensor: sensor name.
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, entry, ratio = check_inputs(lms, pan, None, ratio, sensor, need_ms_lr=False)
  pan_eq = _equalized_pan(pan, lms, ratio)
  return lms * (pan_eq / (glp_low_pass(pan_eq, entry['ms_gnyq'], ratio) + EPS))


def mtf_glp_fs(lms, pan, ms_lr=None, *, sensor, ratio=4):
  """MTF-GLP-FS (`MTF_GLP_FS.m`): full-scale regression gains, no equalisation.

  Per band: P_LP = interp23tap(decimate(MTF_b(P))), g = cov(MS_b, P) / cov(P_LP, P),
  out_b = MS_b + g (P - P_LP).

  Args:
    lms: (H, W, C) MS on the PAN grid.
    pan: (H, W) PAN.
    ms_lr: unused.
    sensor: sensor name.
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, entry, ratio = check_inputs(lms, pan, None, ratio, sensor, need_ms_lr=False)
  c = lms.shape[2]
  pan_lp = glp_low_pass(np.repeat(pan[:, :, None], c, axis=2), entry['ms_gnyq'], ratio)
  out = np.empty_like(lms)
  for b in range(c):
    g = _cov(lms[:, :, b], pan) / _cov(pan_lp[:, :, b], pan)
    out[:, :, b] = lms[:, :, b] + g * (pan - pan_lp[:, :, b])
  return out


def mtf_glp_hpm_r(lms, pan, ms_lr=None, *, sensor, ratio=4):
  """MTF-GLP-HPM-R (`MTF_GLP_HPM_R.m`): HPM with a regression-based offset.

  Per band: P_LP as in FS, g = cov(MS_b, P_LP) / var(P_LP), cb = mean(MS_b) / g - mean(P),
  out_b = MS_b (P + cb) / (P_LP + cb + eps).

  Args:
    lms: (H, W, C) MS on the PAN grid.
    pan: (H, W) PAN.
    ms_lr: unused.
    sensor: sensor name.
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, entry, ratio = check_inputs(lms, pan, None, ratio, sensor, need_ms_lr=False)
  c = lms.shape[2]
  pan_lp = glp_low_pass(np.repeat(pan[:, :, None], c, axis=2), entry['ms_gnyq'], ratio)
  out = np.empty_like(lms)
  for b in range(c):
    ms_b, lp_b = lms[:, :, b], pan_lp[:, :, b]
    g = _cov(ms_b, lp_b) / _cov(lp_b, lp_b)
    cb = ms_b.mean() / g - pan.mean()
    out[:, :, b] = ms_b * (pan + cb) / (lp_b + cb + EPS)
  return out


def mtf_glp_hpm_h(lms, pan, ms_lr=None, *, sensor, ratio=4, decimation=True):
  """MTF-GLP-HPM-H (`MTF_GLP_HPM_Haze_min.m`, called with decimation = 1): haze-corrected HPM.

  L_b = `haze_minimum(MS)`; w = least squares of LPfilterGauss(P) on [1, MS_1..MS_C] (MATLAB's
  `\\`, `estimation_alpha(..., 'global')`); L_P = w . [1, L]; P_LP = MTF_b(P), decimated and
  re-interpolated when `decimation`; out_b = (MS_b - L_b) (P - L_P) / (P_LP - L_P + eps) + L_b.

  Args:
    lms: (H, W, C) MS on the PAN grid.
    pan: (H, W) PAN.
    ms_lr: unused.
    sensor: sensor name.
    ratio: resolution ratio.
    decimation: the toolbox's `decimation` argument (the demo passes 1); False skips the
      decimation and interpolation of the low-pass PAN.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, entry, ratio = check_inputs(lms, pan, None, ratio, sensor, need_ms_lr=False)
  h, w, c = lms.shape
  haze = haze_minimum(lms)
  pan_lr = toolbox.lp_filter_gauss(pan, ratio)
  design = np.concatenate([np.ones((h * w, 1)), lms.reshape(h * w, c, order='F')], axis=1)
  weights = np.linalg.lstsq(design, pan_lr.ravel(order='F'), rcond=None)[0]
  haze_pan = float(weights @ np.concatenate([[1.0], haze]))
  pans = np.repeat(pan[:, :, None], c, axis=2)
  pan_lp = toolbox.mtf_filter(pans, entry['ms_gnyq'], ratio)
  if decimation:
    pan_lp = toolbox.interp23tap(decimate(pan_lp, ratio), ratio)
  ratio_img = (pans - haze_pan) / (pan_lp - haze_pan + EPS)
  return (lms - haze) * ratio_img + haze


# ---------------------------------------------------------------------------------------------
# AWLP.

# `AWLP.m` l. 66-75: the B3-spline wavelet filters of its undecimated transform, times sqrt(2).
_B3 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
_AWLP_H = math.sqrt(2) * _B3


def _valid_filter(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
  # 'valid' correlation along one axis (the taps are symmetric, so also convn's 'valid' part).
  n = x.shape[axis] - taps.size + 1
  out = np.zeros(x.shape[:axis] + (n,) + x.shape[axis + 1 :])
  for k, t in enumerate(taps):
    out += t * np.take(x, np.arange(k, k + n), axis=axis)
  return out


def awlp_low_pass(images: np.ndarray, levels: int) -> np.ndarray:
  """The approximation that `AWLP.m` subtracts: `indwt2_working` of `ndwt2_working`'s LL only.

  `ndwt2_working` (mode 'sym'): per level, each axis is extended half-point symmetrically by 4
  and filtered with sqrt(2) B3 ('full' convolution, central part), so the image grows by 4 per
  axis per level (no decimation, no holes). `indwt2_working(WT, 'c')` with every detail zeroed:
  per level, a 'full' convolution with the same filter along rows then columns, / 4, cropped to
  the previous level's size; that is a 'valid' filter. The details add exact zeros.

  Args:
    images: (H, W, C) float64.
    levels: the number of levels (`ceil(log2(ratio))`).

  Returns:
    (H, W, C) float64.
  """
  x = images
  pad = _AWLP_H.size - 1
  for _ in range(levels):
    # wdec1D is applied along the columns first (perm []), then along the rows (perm [2 1 3]).
    x = _valid_filter(np.pad(x, ((0, 0), (pad, pad), (0, 0)), mode='symmetric'), _AWLP_H, 1)
    x = _valid_filter(np.pad(x, ((pad, pad), (0, 0), (0, 0)), mode='symmetric'), _AWLP_H, 0)
  for _ in range(levels):
    # recFUNC: rows (perm [2 1 3]) then columns, / 4, central crop.
    x = _valid_filter(_valid_filter(x, _AWLP_H, 0), _AWLP_H, 1) / 4
  return x


def awlp(lms, pan, ms_lr=None, *, sensor=None, ratio=4):
  """AWLP (`AWLP.m`): additive wavelet luminance proportional injection.

  P_b = (P - mean P) std(MS_b) / std(imresize(imresize(P, 1/r), r)) + mean(MS_b) (bicubic,
  antialiased); out_b = MS_b + (P_b - `awlp_low_pass`(P_b)) MS_b / (mean_c MS_c + eps).

  Args:
    lms: (H, W, C) MS on the PAN grid.
    pan: (H, W) PAN.
    ms_lr: unused.
    sensor: accepted for the common interface; AWLP uses no sensor fact (None allowed).
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, _, ratio = check_inputs(lms, pan, None, ratio, sensor, need_ms_lr=False)
  bands = lms.shape[2]
  intensity_ratio = lms / (lms.sum(axis=2, keepdims=True) / bands + EPS)
  pan_lr = toolbox.imresize(toolbox.imresize(pan, 1 / ratio), ratio)
  pans = equalize_pan(
    pan[:, :, None], pan.mean(), std2(pan_lr), lms.mean(axis=(0, 1)), std2(lms, (0, 1))
  )
  details = pans - awlp_low_pass(pans, math.ceil(math.log2(ratio)))
  return details * intensity_ratio + lms


# ---------------------------------------------------------------------------------------------
# Streaming support.


def halo(name: str, ratio: int = 4) -> int:
  """The support radius (PAN pixels, a multiple of `ratio`) of a method's local part.

  MTF-GLP family: the 41 x 41 MTF filter (radius 20), then, through the decimation,
  interp23tap's 23-tap passes (radius 11 (ratio - 1) on the PAN grid). AWLP: 4 per wavelet level
  (2 per axis at decomposition and at reconstruction). The global statistics (means, standard
  deviations, covariances, the haze regression) must come from the whole image.

  Args:
    name: a key of `METHODS`.
    ratio: resolution ratio.

  Returns:
    The halo in PAN pixels.
  """
  ratio = toolbox.check_ratio(ratio)
  if name == 'awlp':
    radius = 4 * math.ceil(math.log2(ratio))
  elif name in METHODS:
    radius = 20 + 11 * (ratio - 1)
  else:
    raise ValueError(f'name: expected one of {sorted(METHODS)}, got {name!r}')
  return -(-radius // ratio) * ratio


METHODS = {
  'awlp': awlp,
  'mtf-glp': mtf_glp,
  'mtf-glp-fs': mtf_glp_fs,
  'mtf-glp-hpm': mtf_glp_hpm,
  'mtf-glp-hpm-h': mtf_glp_hpm_h,
  'mtf-glp-hpm-r': mtf_glp_hpm_r,
}
