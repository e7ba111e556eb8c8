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
  statistics (means, standard deviations, covariances, regressions, the haze's band minimum or 1st
  percentile). A statistics pass accumulates them window by window (in `window_ops`: `Moments`,
  shifted sums and cross products; `LeastSquares`: the R of a QR of the rows seen so far, so a
  regression is as accurate as the whole-image QR, and BDSD-PC's constrained fit is solved on R;
  `Percentile`: the smallest 1% of the values, so the percentile is exact); `finalize` reduces them
  to the coefficients the whole-image function computes; the fusion pass applies them. PRACS needs
  two statistics passes (its regressions are on bands matched with the first pass's statistics);
  BDSD accumulates one fit per H x H block (the toolbox's block size is the height). The sums are
  taken in another order, and the 41 x 41 MTF filters are FFT convolutions whose rounding depends on
  the array's size, so the result equals the whole-image one to rounding (tested at <= 1e-9 of the
  sensor maximum; 1e-12 to 6e-10 observed), not bit for bit. Where the method is ill-conditioned the
  whole-image result itself moves more under rounding: MTF-GLP-HPM divides by a low-pass that nears
  0 on real scenes (../shared/toolbox/README.md).
- **whole-image** (`c-gsa`: a k-means over all pixels; `tv`: 50 iterations coupling every
  pixel; `sr-d`: a dictionary learnt from every patch): no exact window decomposition exists, so
  `WholeImagePlan` reads the scene whole and runs the function once, when the scene has at most
  `whole_image_limit` PAN pixels (`fuse.py --whole_image_limit`), and refuses larger scenes
  with one line naming the method and why.

A source may say which pixels are valid (`source.valid(y0, y1, x0, x1)`, e.g. not nodata): the
statistics are then taken over those only.

Size: ~720 lines: one small plan per method family (ten), the whole-image fallback and the plan
factory, each plan's statistics and coefficients beside its window formula; the window
operations and the accumulators they share are `methods.window_ops`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize, signal

from u2net_jax import toolbox
from u2net_jax.methods import METHODS, common
from u2net_jax.methods.window_ops import (
  INTERP_MARGIN,
  MTF_HALF,
  ArraySource,
  LeastSquares,
  Moments,
  Percentile,
  atrous_lowpass_window,
  awlp_lowpass_window,
  b3_region,
  down_up_window,
  gather,
  glp_window,
  lms_window,
  lp_gauss_window,
  mtf_kernels,
  resize_sparse,
)

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
    return self._acc.setdefault(key, Moments())

  def _lms(self, source, window):
    return lms_window(source, window, self.ratio)

  def _pan_at(self, source):
    return lambda rows, cols: gather(source.pan, rows, cols)


class ExpPlan(Plan):
  kind, passes = 'local', 0
  halo = 4 * INTERP_MARGIN

  def fuse(self, source, window):
    return self._lms(source, window)


class GlpPlan(Plan):
  """MTF-GLP and MTF-GLP-HPM: the PAN equalised per band with image-wide statistics."""

  halo = MTF_HALF + 4 * INTERP_MARGIN

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

    low = glp_window(  # The low-pass of eq(PAN) = (PAN - pan_mean) scale + ms_mean, per band.
      lambda r, c: gather(source.pan, r, c) - self.pan_mean,
      self.sensor['ms_gnyq'],
      source,
      window,
      self.ratio,
      scale=self.ms_std / self.lp_std,
      offset=self.ms_mean,
    )
    pan_eq = eq(source.pan(y0, y1, x0, x1))
    if self.name == 'mtf-glp':
      return lms + pan_eq - low
    return lms * (pan_eq / (low + common.EPS))


class GlpRegressionPlan(Plan):
  """MTF-GLP-FS and MTF-GLP-HPM-R: per-band gains from covariances with the GLP low-pass PAN."""

  halo = MTF_HALF + 4 * INTERP_MARGIN

  def _pan_lp(self, source, window):
    return glp_window(self._pan_at(source), self.sensor['ms_gnyq'], source, window, self.ratio)

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


class HazePlan(Plan):
  """MTF-GLP-HPM-H and BT-H: the haze is each band's minimum, or on 4 bands a fraction of its
  1st percentile (`common.haze_minimum`), found exactly by `Percentile`."""

  halo = MTF_HALF + 4 * INTERP_MARGIN

  def _accumulate(self, source, window):
    lms = self._lms(source, window)
    lp = lp_gauss_window(source, window, self.ratio)
    flat, lp = self._rows(lms), self._rows(lp)
    if self.bands == 4:
      n = self.height * self.width
      self._acc.setdefault('prc', Percentile(n, common.HAZE_PERCENTILE)).add(flat)
    elif flat.shape[0]:
      mins = flat.min(axis=0)
      self._acc['min'] = np.minimum(self._acc.get('min', mins), mins)
    ls = self._acc.setdefault('ls', LeastSquares())
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
      lp = glp_window(self._pan_at(source), self.sensor['ms_gnyq'], source, window, self.ratio)
      ratio_img = (pan[..., None] - self.haze_pan) / (lp - self.haze_pan + common.EPS)
      return (lms - haze) * ratio_img + haze
    intensity = (lms - haze) @ self.alpha
    pan_eq = common.equalize_pan(pan, self.lp_mean, self.lp_std, self.i_mean, self.i_std)
    return np.maximum(lms - haze, 0) * (pan_eq / (intensity + common.EPS))[..., None] + haze


class AwlpPlan(Plan):
  levels = 2
  halo = 4 * INTERP_MARGIN

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
    (r0, r1, c0, c1), edges = b3_region(self.height, self.width, window, 4 * levels)
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

  halo = 4 * INTERP_MARGIN

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
    (r0, r1, c0, c1), edges = b3_region(self.height, self.width, window, 8)
    low = atrous_lowpass_window(source.pan(r0, r1, c0, c1), edges)
    oy, ox = (0 if edges[0] else 8), (0 if edges[2] else 8)
    low = low[y0 - r0 - oy : y1 - r0 - oy, x0 - c0 - ox : x1 - c0 - ox]
    low = common.decimate(low, r)
    ms_lr = source.ms(y0 // r, y1 // r, x0 // r, x1 // r)
    design = np.concatenate([ms_lr, np.ones(ms_lr.shape[:2] + (1,))], -1)
    self._acc.setdefault('ls', LeastSquares()).add(self._rows(design), self._rows(low))

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

  halo = 4 * (MTF_HALF + 4) + 4 * INTERP_MARGIN

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
      m = resize_sparse(n, 1 / r)[u[0] : u[-1] + 1].tocsc()
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
    kr = np.clip(np.arange(a - MTF_HALF, b + MTF_HALF), 0, hl - 1)
    kc = np.clip(np.arange(c - MTF_HALF, d + MTF_HALF), 0, wl - 1)
    gt_ext = self._gt(source, kr, kc)
    kernels = mtf_kernels(tuple(float(g) for g in s['ms_gnyq']), r)
    ms_lp = signal.fftconvolve(gt_ext, kernels, mode='valid', axes=(0, 1))
    gt = gt_ext[MTF_HALF : MTF_HALF + b - a, MTF_HALF : MTF_HALF + d - c]
    off = r // 2
    rows = np.clip(np.arange(a * r + off - MTF_HALF, (b - 1) * r + off + 21), 0, self.height - 1)
    cols = np.clip(np.arange(c * r + off - MTF_HALF, (d - 1) * r + off + 21), 0, self.width - 1)
    kernel = toolbox.mtf_kernel(s['pan_gnyq'], r)
    pan_lp = signal.fftconvolve(gather(source.pan, rows, cols), kernel, mode='valid')[::r, ::r]
    return gt, ms_lp, pan_lp

  def _accumulate(self, source, window):
    gt, ms_lp, pan_lp = self._fit_data(source, window)
    c = self.bands
    if self.name == 'bdsd-pc':  # [PAN_LR, MS_LR] g = GT_k - MS_LR_k (BDSD_PC.m:37-48)
      design = np.concatenate([pan_lp[..., None], ms_lp], -1)
      self._acc.setdefault('ls', LeastSquares()).add(self._rows(design), self._rows(gt - ms_lp))
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
  halo = 4 * INTERP_MARGIN + 40

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
    self._acc.setdefault('ls', LeastSquares()).add(self._rows(design), self._rows(targets))
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
