"""Band-dependent spatial detail methods of the benchmark toolbox: BDSD and BDSD-PC.

- ``bdsd``: ``BDSD(I_MS, I_PAN, ratio, size(I_MS,1), sensor)`` (Garzelli et al. 2008): per block,
  the detail coefficients are fitted at reduced resolution by least squares and applied at full
  resolution; with the demos' block size (the image height) one set for the whole image.
- ``bdsd_pc``: ``BDSD_PC(I_MS, I_PAN, ratio, sensor)`` (Vivone 2019): one set per band, fitted
  under the physical constraints gamma_PAN >= 0, gamma_MS <= 0.

The signature is the package's (`u2net_jax.methods`). Float64 numpy; comments cite BDSD.m /
BDSD_PC.m lines.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

from u2net_jax import toolbox
from u2net_jax.methods.common import check_inputs, decimate


def _reduced_resolution(lms, pan, sensor, ratio):
  """The fitting data of BDSD.m:70-76 / BDSD_PC.m:37-39.

  Returns (ms_orig, ms_lp, pan_lp_d): the bicubic ``imresize(I_MS, 1/ratio)`` (the reduced
  "ground truth"), its MTF-filtered version (``MTF.m``, filtered, not decimated again), and the
  MTF_PAN-filtered PAN decimated by ``(3:ratio:end)``.
  """
  s = toolbox.get_sensor(sensor)
  ms_orig = toolbox.imresize(lms, 1 / ratio)
  ms_lp = toolbox.mtf_filter(ms_orig, s['ms_gnyq'], ratio)
  pan_lp_d = decimate(toolbox.mtf_filter(pan, s['pan_gnyq'], ratio), ratio)
  return ms_orig, ms_lp, pan_lp_d


def _check_block_size(block_size, shape, ratio, bands):
  """BDSD.m:38-55's checks on the block size S, with the problem named."""
  h, w = shape
  if block_size != int(block_size) or block_size < 2:
    raise ValueError(f'block_size: expected an integer >= 2, got {block_size}')
  block_size = int(block_size)
  if block_size % 2:
    raise ValueError(f'block_size: must be even (BDSD.m), got {block_size}')
  if block_size % ratio:
    raise ValueError(f'block_size: must be a multiple of ratio={ratio}, got {block_size}')
  if h % block_size or w % block_size:
    raise ValueError(
      f'block_size: the PAN height and width ({h} x {w}) must be multiples of the block size '
      f"{block_size}; the toolbox's default block size is the height, so the width must be a "
      'multiple of the height (e.g. a square image)'
    )
  if block_size < bands + 1:
    # padarray(gamma, [S-Nb-1 S-Nb]) in BDSD.m:100 fails for S < Nb + 1.
    raise ValueError(f'block_size: must be at least bands + 1 = {bands + 1}, got {block_size}')
  return block_size


def bdsd(lms, pan, ms_lr=None, *, sensor, ratio=4, block_size=None):
  """BDSD: ``BDSD(I_MS, I_PAN, ratio, S, sensor)`` with the demos' S = ``size(I_MS, 1)``.

  Per block of S x S PAN pixels (S/ratio x S/ratio at reduced resolution), the coefficients
  gamma ((C + 1) x C) minimise ||[MS_LP, PAN_LP] gamma_k - (MS_k - MS_LP_k)|| over the block
  (normal equations, BDSD.m:88-97), and out_k = MS_k + [MS, PAN] gamma_k (:106-124).

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: unused (checked when given).
    sensor: the sensor name (its MTF gains).
    ratio: resolution ratio.
    block_size: S; None is the demos' ``size(I_MS, 1)``, one block row (a global estimate on a
      square image). The toolbox refuses (and so does this function, with a ValueError naming
      `block_size`) an odd S, an S that is not a multiple of ratio, sides that are not multiples
      of S (with the default: a width that is not a multiple of the height), and S < C + 1.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, _, ratio = check_inputs(lms, pan, ms_lr, ratio, sensor=sensor, need_ms_lr=False)
  h, w, c = lms.shape
  s = _check_block_size(h if block_size is None else block_size, (h, w), ratio, c)
  ms_orig, ms_lp, pan_lp_d = _reduced_resolution(lms, pan, sensor, ratio)
  sb = s // ratio
  nby, nbx = h // s, w // s

  def blocks(x, size):
    # (rows, cols, ch) -> (nby * nbx, size * size, ch), pixels of a block in any fixed order.
    x = x.reshape(nby, size, nbx, size, x.shape[2]).transpose(0, 2, 1, 3, 4)
    return x.reshape(nby * nbx, size * size, x.shape[-1])

  design = blocks(np.concatenate([ms_lp, pan_lp_d[:, :, None]], axis=2), sb)
  target = blocks(ms_orig - ms_lp, sb)
  # B = (Hd'Hd) \ Hd'; gamma(:, k) = B (b - bd) (BDSD.m:88-97).
  gram = np.einsum('bpi,bpj->bij', design, design)
  proj = np.linalg.solve(gram, design.transpose(0, 2, 1))
  gamma = proj @ target  # (blocks, C + 1, C)
  full = blocks(np.concatenate([lms, pan[:, :, None]], axis=2), s)
  fused = full[:, :, :c] + full @ gamma  # BDSD.m:118-124
  fused = fused.reshape(nby, nbx, s, s, c).transpose(0, 2, 1, 3, 4)
  return fused.reshape(h, w, c)


def bdsd_pc(lms, pan, ms_lr=None, *, sensor, ratio=4):
  """BDSD-PC: ``BDSD_PC(I_MS, I_PAN, ratio, sensor)``, BDSD with physical constraints.

  For each band k: gamma_k = argmin ||[PAN_LR, MS_LR] g - (GT_k - MS_LR_k)|| subject to
  g_PAN >= 0 and g_MS <= 0 (``lsqlin`` with A = diag(-1, 1, ..., 1), b = 0; BDSD_PC.m:48),
  where GT = bicubic ``imresize(I_MS, 1/ratio)``, MS_LR = MTF(GT) and PAN_LR = MTF_PAN(PAN)
  decimated; then out_k = MS_k + [PAN, MS] gamma_k. The constrained optimum is found exactly
  (a sign flip, then non-negative least squares, scipy's `nnls`); MATLAB's interior-point
  `lsqlin` stops near it (tolerance about 1e-8), Octave's driver with the exact shim matches.

  Args:
    lms: (H, W, C) interpolated MS.
    pan: (H, W) PAN.
    ms_lr: unused (checked when given).
    sensor: the sensor name (its MTF gains).
    ratio: resolution ratio.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, _, _, ratio = check_inputs(lms, pan, ms_lr, ratio, sensor=sensor, need_ms_lr=False)
  h, w, c = lms.shape
  gt, ms_lr_f, pan_lr = _reduced_resolution(lms, pan, sensor, ratio)
  design = np.concatenate([pan_lr.reshape(-1, 1), ms_lr_f.reshape(-1, c)], axis=1)
  sign = np.concatenate([[1.0], -np.ones(c)])  # g = sign * y with y >= 0
  target = (gt - ms_lr_f).reshape(-1, c)
  gamma = np.stack(
    [sign * optimize.nnls(design * sign, target[:, k], maxiter=50 * (c + 1))[0] for k in range(c)],
    axis=1,
  )
  full = np.concatenate([pan.reshape(-1, 1), lms.reshape(-1, c)], axis=1)
  return (lms.reshape(-1, c) + full @ gamma).reshape(h, w, c)  # BDSD_PC.m:49


METHODS = {
  'bdsd': bdsd,
  'bdsd-pc': bdsd_pc,
}
