"""Component-substitution methods of the benchmark toolbox: EXP, BT-H, GS, GSA, C-GSA and PRACS.

Each function reproduces one MATLAB function of the toolbox (Vivone et al., GRSM 2021, as bundled
in DLPan-Toolbox) line by line, called as the toolbox's demos call it, in float64 numpy:

- ``exp``: ``interp23tap(I_MS_LR, ratio)`` (the plain interpolated MS);
- ``bt_h``: ``BroveyRegHazeMin(I_MS, I_PAN, ratio)`` (Brovey with haze correction);
- ``gs``: ``GS(I_MS, I_PAN)`` (Gram-Schmidt, intensity = band mean);
- ``gsa``: ``GSA(I_MS, I_PAN, I_MS_LR, ratio)`` (adaptive Gram-Schmidt);
- ``c_gsa``: ``GS_Segm(I_MS, I_PAN, gen_LP_image('GSA', ...), k_means_clustering(I_MS, 5))``;
- ``pracs``: ``PRACS(I_MS, I_PAN, ratio)`` (partial replacement adaptive CS).

The signature is the package's (`u2net_jax.methods`): ``fn(lms, pan, ms_lr, *, sensor, ratio=4,
**options)``. Comments cite the MATLAB file and line each step matches. MATLAB's statistics are
kept: ``std2``, ``var`` and ``cov`` divide by N - 1, and ``A \\ b`` on a tall matrix is the least
squares solution.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import linalg
from scipy.cluster import vq

from u2net_jax import toolbox
from u2net_jax.methods.common import EPS, check_inputs, decimate, equalize_pan, haze_minimum, std2

# ---------------------------------------------------------------------------------------------
# Helpers of this family (the ones shared with the others are in `u2net_jax.methods.common`).


def _lstsq(a, b):
  """MATLAB ``a \\ b`` for a tall full-rank `a`: least squares by Householder QR, as MATLAB's
  backslash and ``regress`` compute it (and faster than numpy's SVD-based ``lstsq``)."""
  q, r = np.linalg.qr(a)
  return linalg.solve_triangular(r, q.T @ b)


def _cov_ratios(x, y):
  """``c = cov(x, y(:, k)); c(1,2) / var(x)`` for each column k (the GS family; both N - 1).

  Args:
    x: (N,) vector.
    y: (N, K) matrix.
  """
  dx = x - x.mean()
  # A matrix-vector product and an elementwise sum: OpenBLAS's 1-D dot is very slow here.
  return ((y - y.mean(axis=0)).T @ dx) / np.sum(dx * dx)


def _corr2(a, b):
  """MATLAB ``corr2`` (the textbook formula)."""
  a = a - a.mean()
  b = b - b.mean()
  return np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))


@functools.lru_cache(maxsize=32)
def _down_up_matrix(n: int, ratio: int) -> np.ndarray:
  """(n, n) matrix of ``imresize(imresize(x, 1/ratio), ratio)`` along one axis.

  MATLAB's imresize is separable; an axis of length 1 keeps weight 1, so resizing an (n, 1, n)
  identity stack applies the row operator alone.
  """
  eye = np.eye(n)[:, None, :]
  m = toolbox.imresize(toolbox.imresize(eye, 1 / ratio), ratio)[:, 0, :]
  m.setflags(write=False)
  return m


def _imresize_down_up(image, ratio):
  """``imresize(imresize(x, 1/ratio), ratio)`` of an (H, W) or (H, W, C) image (bicubic,
  antialiased down, then up), as two matrix products."""
  h, w = image.shape[:2]
  rows = (_down_up_matrix(h, ratio) @ image.reshape(h, -1)).reshape(image.shape)
  if image.ndim == 2:
    return rows @ _down_up_matrix(w, ratio).T
  return np.matmul(_down_up_matrix(w, ratio)[None], rows)


# ---------------------------------------------------------------------------------------------
# EXP and BT-H.


def exp(lms, pan, ms_lr, *, sensor=None, ratio=4):
  """EXP: the toolbox's 23-tap interpolation of the MS, ``interp23tap(I_MS_LR, ratio)``.

  Args:
    lms: (H, W, C) interpolated MS (only checked: EXP recomputes it from `ms_lr`).
    pan: (H, W) PAN (only checked).
    ms_lr: (H/ratio, W/ratio, C) MS.
    sensor: unused (the interpolator does not depend on the sensor).
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  _, _, ms_lr, _, ratio = check_inputs(lms, pan, ms_lr, ratio)
  return toolbox.interp23tap(ms_lr, ratio)


def bt_h(lms, pan, ms_lr=None, *, sensor=None, ratio=4):
  """BT-H: ``BroveyRegHazeMin(I_MS, I_PAN, ratio)``, Brovey with haze correction [Lolli17].

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: unused (checked when given).
    sensor: unused (the low-pass is `LPfilterGauss`, 0.3 at Nyquist, for every sensor).
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, _, ratio = check_inputs(lms, pan, ms_lr, ratio, need_ms_lr=False)
  h, w, c = lms.shape
  haze = haze_minimum(lms)  # BroveyRegHazeMin.m:35-52
  pan_lp = toolbox.lp_filter_gauss(pan, ratio)  # BroveyRegHazeMin.m:59
  # Regression without a constant of the low-passed PAN on I_MS itself, not I_MS - haze (:61).
  alpha = _lstsq(lms.reshape(-1, c), pan_lp.reshape(-1))
  intensity = (lms - haze) @ alpha  # :65
  # The PAN matched to the intensity's mean and std (:67).
  pan_eq = equalize_pan(pan, pan_lp.mean(), std2(pan_lp), intensity.mean(), std2(intensity))
  ms_dehazed = np.maximum(lms - haze, 0)  # :69-70
  return ms_dehazed * (pan_eq / (intensity + EPS))[:, :, None] + haze  # :72


# ---------------------------------------------------------------------------------------------
# The Gram-Schmidt family.


def _gs_fusion(lms, pan0, intensity0):
  """The common tail of ``GS.m``:52-86 / ``GSA.m``:71-103: injection with g = cov / var, then
  each band's mean reset to the MS band's mean."""
  c = lms.shape[2]
  ms0 = lms - lms.mean(axis=(0, 1))
  gains = _cov_ratios(intensity0.reshape(-1), ms0.reshape(-1, c))
  fused = ms0 + (pan0 - intensity0)[:, :, None] * gains
  return fused - fused.mean(axis=(0, 1)) + lms.mean(axis=(0, 1))


def gs(lms, pan, ms_lr=None, *, sensor=None, ratio=4):
  """GS: ``GS(I_MS, I_PAN)``, Gram-Schmidt with the band mean as intensity [Laben00].

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: unused (checked when given).
    sensor: unused.
    ratio: resolution ratio (only checked).

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, _, _ = check_inputs(lms, pan, ms_lr, ratio, need_ms_lr=False)
  intensity = lms.mean(axis=2)  # GS.m:43
  i0 = intensity - intensity.mean()  # :46
  # PAN matched to the zero-mean intensity's mean and std (:48).
  pan0 = equalize_pan(pan, pan.mean(), std2(pan), i0.mean(), std2(i0))
  return _gs_fusion(lms, pan0, i0)


@functools.lru_cache(maxsize=32)
def _atrous_lowpass_matrix(n: int) -> np.ndarray:
  """(n, n) matrix of ``LPfilterPlusDec.m``'s low-pass along one axis (before decimation).

  ``ndwt2_working`` with the B3-spline pair h = htilde = [1 4 6 4 1]/16 (times sqrt 2), 2 levels,
  'sym' (half-sample symmetric) extension: each analysis level convolves the symmetric extension
  with sqrt2 h and keeps the full length (n + 4, growing by 4 per level, ndwt2_working.m:190-216);
  the filters are not dilated between levels. The details are zeroed, and each synthesis level
  (indwt2_working.m:121-148) convolves with sqrt2 htilde (full), halves (the /4 of the 2-D
  reconstruction, per axis), and keeps the centre of the previous size. Separable, so the 2-D
  operator is M_H X M_W^T.
  """
  h = np.sqrt(2) * np.array([1, 4, 6, 4, 1]) / 16
  x = np.eye(n)

  def analysis(a):
    ext = np.concatenate([a[3::-1], a, a[:-5:-1]], axis=0)
    full = np.apply_along_axis(np.convolve, 0, ext, h)
    return full[4:-4]

  def synthesis(a, size):
    full = np.apply_along_axis(np.convolve, 0, a, h) / 2
    cut = (full.shape[0] - size) // 2
    return full[cut : cut + size]

  a1 = analysis(x)
  a2 = analysis(a1)
  return synthesis(synthesis(a2, n + 4), n)


def lp_filter_plus_dec(image, ratio):
  """``LPfilterPlusDec.m``: the 2-level undecimated B3-spline low-pass, then nearest decimation.

  Args:
    image: (H, W) array.
    ratio: resolution ratio (``ceil(log2(ratio))`` levels; the toolbox uses 4, i.e. 2 levels).

  Returns:
    (H/ratio, W/ratio) float64.
  """
  if ratio != 4:
    raise ValueError(f'ratio: LPfilterPlusDec is implemented for ratio 4 (2 levels), got {ratio}')
  mh = _atrous_lowpass_matrix(image.shape[0])
  mw = _atrous_lowpass_matrix(image.shape[1])
  return decimate(mh @ image @ mw.T, ratio)


def gsa(lms, pan, ms_lr, *, sensor=None, ratio=4):
  """GSA: ``GSA(I_MS, I_PAN, I_MS_LR, ratio)``, adaptive Gram-Schmidt [Aiazzi07].

  The intensity's weights regress the mean-subtracted, low-passed and decimated PAN
  (`lp_filter_plus_dec`) on the mean-subtracted `ms_lr` plus a constant; PAN is only
  mean-subtracted (no std matching).

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: (H/ratio, W/ratio, C) MS.
    sensor: unused.
    ratio: resolution ratio (4).

  Returns:
    (H, W, C) float64.
  """
  lms, pan, ms_lr, _, ratio = check_inputs(lms, pan, ms_lr, ratio)
  ms0 = lms - lms.mean(axis=(0, 1))  # GSA.m:46
  ms_lr0 = ms_lr - ms_lr.mean(axis=(0, 1))  # :50
  pan_lp = lp_filter_plus_dec(pan - pan.mean(), ratio)  # :54-55
  ones = np.ones(ms_lr0.shape[:2] + (1,))
  design = np.concatenate([ms_lr0, ones], axis=2).reshape(-1, ms_lr.shape[2] + 1)
  alpha = _lstsq(design, pan_lp.reshape(-1))  # :56
  intensity = ms0 @ alpha[:-1] + alpha[-1]  # :57
  i0 = intensity - intensity.mean()  # :60
  return _gs_fusion(lms, pan - pan.mean(), i0)  # :70 onwards


def gen_lp_image_gsa(lms, pan, ms_lr, ratio=4):
  """``gen_LP_image('GSA', I_MS, I_PAN, I_MS_LR, ratio, sensor)``: the low-resolution PAN of C-GSA.

  The decimated `LPfilterGauss` PAN regressed on [I_MS_LR, 1] (no mean subtraction, unlike GSA),
  the weights applied to [I_MS, 1].

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: (H/ratio, W/ratio, C) MS.
    ratio: resolution ratio.

  Returns:
    (H, W) float64.
  """
  lms, pan, ms_lr, _, ratio = check_inputs(lms, pan, ms_lr, ratio)
  pan_lp = decimate(toolbox.lp_filter_gauss(pan, ratio), ratio)  # gen_LP_image.m:33-35
  c = ms_lr.shape[2]
  design = np.concatenate([ms_lr.reshape(-1, c), np.ones((pan_lp.size, 1))], axis=1)
  alpha = _lstsq(design, pan_lp.reshape(-1))  # :37
  return lms @ alpha[:-1] + alpha[-1]  # :38-42


def kmeans_segmentation(lms, n_segments=5, seed=0):
  """``k_means_clustering(I_MS, n_segm)`` with a seeded k-means of our own.

  The features are the bands each divided by its own maximum (k_means_clustering.m:23-28).
  MATLAB's and Octave's ``kmeans`` are random and differ from each other; this one is k-means++
  seeding then Lloyd iterations (scipy ``kmeans2``), reproducible given `seed`.

  Args:
    lms: (H, W, C) interpolated MS.
    n_segments: the number of clusters (5 in the demos).
    seed: the random seed.

  Returns:
    (H, W) int labels 1..n_segments.
  """
  lms = toolbox.as_image(lms, 'lms')
  feats = lms.reshape(-1, lms.shape[2]) / lms.reshape(-1, lms.shape[2]).max(axis=0)
  _, labels = vq.kmeans2(feats, n_segments, iter=100, minit='++', seed=np.random.default_rng(seed))
  return labels.reshape(lms.shape[:2]) + 1


def gs_segm(lms, pan, lp, segmentation):
  """``GS_Segm(I_MS, I_PAN, I_LR_input, S)``: per segment, g = cov(LP, MS_b) / var(LP).

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    lp: (H, W) low-resolution PAN (one for all bands, as C-GSA passes it).
    segmentation: (H, W) labels.

  Returns:
    (H, W, C) float64: lms + g * (pan - lp).
  """
  _, inverse = np.unique(segmentation, return_inverse=True)
  inverse = inverse.reshape(-1)
  k = int(inverse.max()) + 1
  c = lms.shape[2]
  ms = lms.reshape(-1, c)
  lp_flat = lp.reshape(-1)
  counts = np.bincount(inverse, minlength=k)
  # Per-segment centred sums (GS_Segm.m:51-55): c(1,2) / var with the same N - 1 cancels.
  lp_c = lp_flat - (np.bincount(inverse, lp_flat, k) / counts)[inverse]
  ms_sum = np.stack([np.bincount(inverse, ms[:, b], k) for b in range(c)], axis=1)
  ms_mean = ms_sum / counts[:, None]
  ms_c = ms - ms_mean[inverse]
  num = np.stack([np.bincount(inverse, lp_c * ms_c[:, b], k) for b in range(c)], axis=1)
  den = np.bincount(inverse, lp_c * lp_c, k)
  with np.errstate(invalid='ignore', divide='ignore'):
    gains = num / den[:, None]
  details = (pan - lp).reshape(-1, 1)
  return (gains[inverse] * details + ms).reshape(lms.shape)  # :58


def c_gsa(lms, pan, ms_lr, *, sensor=None, ratio=4, segmentation=None, seed=0, n_segments=5):
  """C-GSA: GSA with segment-wise injection gains [Restaino17].

  ``GS_Segm(I_MS, I_PAN, gen_LP_image('GSA', I_MS, I_PAN, I_MS_LR, ratio, sensor),
  k_means_clustering(I_MS, 5))``. The k-means is random in the toolbox (and MATLAB's differs
  from Octave's), so the segmentation can be given; otherwise `kmeans_segmentation` computes it
  with `seed`. Given the toolbox's segmentation, the output equals the toolbox's.

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: (H/ratio, W/ratio, C) MS.
    sensor: unused (gen_LP_image's 'GSA' case ignores it).
    ratio: resolution ratio.
    segmentation: optional (H, W) labels (any integers), e.g. the toolbox's map.
    seed: the seed of our k-means when `segmentation` is None.
    n_segments: the number of k-means clusters (5 in the demos).

  Returns:
    (H, W, C) float64. A segment of one pixel gives NaN gains there (0/0), as in MATLAB.
  """
  lms, pan, ms_lr, _, ratio = check_inputs(lms, pan, ms_lr, ratio)
  if segmentation is None:
    segmentation = kmeans_segmentation(lms, n_segments, seed)
  segmentation = np.asarray(segmentation)
  if segmentation.shape != lms.shape[:2]:
    raise ValueError(
      f'segmentation: expected labels of shape {lms.shape[:2]} (the PAN grid), '
      f'got {segmentation.shape}'
    )
  lp = gen_lp_image_gsa(lms, pan, ms_lr, ratio)
  return gs_segm(lms, pan, lp, segmentation)


# ---------------------------------------------------------------------------------------------
# PRACS.


def pracs(lms, pan, ms_lr=None, *, sensor=None, ratio=4, beta=0.95):
  """PRACS: ``PRACS(I_MS, I_PAN, ratio)``, partial replacement adaptive CS (Choi et al. 2011).

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: unused (checked when given).
    sensor: unused.
    ratio: resolution ratio.
    beta: the detail weight's factor; the toolbox fixes 0.95 ("for 11-bit data", PRACS.m:33)
      for every sensor, which is the default.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, _, ratio = check_inputs(lms, pan, ms_lr, ratio, need_ms_lr=False)
  h, w, c = lms.shape
  ms = lms.reshape(-1, c)
  pan_flat = pan.reshape(-1)
  # Histogram matching of each band to PAN, clipped at 0 (PRACS.m:39-45).
  mp, sp = pan.mean(), std2(pan)
  mb, sb = ms.mean(axis=0), std2(ms, axis=0)
  hm = np.maximum((ms - mb + mp / sp * sb) * sp / sb, 0)
  pan_l = _imresize_down_up(pan, ratio).reshape(-1)  # :47-48
  design = np.concatenate([np.ones((h * w, 1)), hm], axis=1)  # :51-55
  i_l = design @ _lstsq(design, pan_l)  # :56-59
  cc = np.array([_corr2(i_l, hm[:, k]) for k in range(c)])  # :67-72
  i_h = cc * pan_flat[:, None] + (1 - cc) * hm
  i_h_low = _imresize_down_up(i_h.reshape(h, w, c), ratio).reshape(-1, c)  # :76-80
  i_l_prime = design @ _lstsq(design, i_h_low)  # :84-101
  delta = i_h - i_l_prime - (i_h.mean(axis=0) - i_l_prime.mean(axis=0))  # :104-107
  aux3 = np.mean(sb)  # :109-113
  # :115-120 (std(b(:)) is std2).
  wk = np.array([beta * _corr2(i_l_prime[:, k], ms[:, k]) for k in range(c)]) * sb / aux3
  cl = np.array([_corr2(i_l, ms[:, k]) for k in range(c)])
  l_i = 1 - np.abs(1 - cl * ms / i_l_prime)  # :122-128
  return (ms + wk * l_i * delta).reshape(h, w, c)  # :130-135


METHODS = {
  'exp': exp,
  'bt-h': bt_h,
  'gs': gs,
  'gsa': gsa,
  'c-gsa': c_gsa,
  'pracs': pracs,
}
