"""Full-resolution (no-reference) metrics: the QNR family (`D_lambda.m`, `D_s.m`, `QNR.m`, HQNR).

The inputs are the fused image, the MS image interpolated to the PAN size (`lms`) and the PAN,
all at full resolution; QNR = (1 - D_lambda)(1 - D_s) and the hybrid HQNR = (1 - D_lambda^K)
(1 - D_s), the "QNR" column of the U2Net paper's Table 1.
"""

from __future__ import annotations

import numpy as np

from u2net_jax import toolbox
from u2net_jax.metrics.reference import (
  as_pair,
  check_blocks,
  check_sensor_scale,
  q2n,
  uiqi_from_moments,
)


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
  return np.mean(uiqi_from_moments(mx, my, vx, vy, cxy), axis=0)


def _band_pair_q(a: np.ndarray, block: int) -> np.ndarray:
  """(C, C) matrix of mean-over-blocks UIQI between every pair of bands of `a`."""
  m, c, f = _block_moments(a, block)
  cov = np.einsum('npi,npj->nij', c, c) / (c.shape[1] - 1.0)
  var = np.where(f, 0.0, np.diagonal(cov, axis1=1, axis2=2))
  cov = np.where(f[:, :, None] | f[:, None, :], 0.0, cov)
  q = uiqi_from_moments(m[:, :, None], m[:, None, :], var[:, :, None], var[:, None, :], cov)
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
  fused, lms = as_pair(fused, lms, ('fused', 'lms'))
  check_blocks(fused.shape, block, 'fused')
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
  fused, lms = as_pair(fused, lms, ('fused', 'lms'))
  p = _as_pan(pan, fused.shape)
  check_blocks(fused.shape, block, 'fused')
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

  The fused image is low-passed at full size by the sensor's MTF-matched filters
  (`toolbox.mtf_filter`, not decimated) and compared with `lms` by Q2n on block x block blocks
  every `block` pixels.

  Args:
    fused: H x W x C pansharpened image on the sensor scale (H, W multiples of `block`).
    lms: H x W x C MS image interpolated to the PAN size, sensor scale.
    sensor: sensor name (see `toolbox.get_sensor`); its gains must match C.
    ratio: resolution ratio.
    block: block side (32).

  Returns:
    D_lambda^K (0 is ideal).
  """
  fused, lms = as_pair(fused, lms, ('fused', 'lms'))
  check_blocks(fused.shape, block, 'fused')
  info = toolbox.get_sensor(sensor)
  gains = info['ms_gnyq']
  if gains is None:
    raise ValueError(f'sensor: {info["name"]} is a {info["task"]} dataset without MTF gains')
  if len(gains) != fused.shape[2]:
    raise ValueError(
      f'fused: {fused.shape[2]} bands but sensor {sensor!r} has {len(gains)} MTF gains'
    )
  check_sensor_scale(fused, 'fused', 'd_lambda_k (Q2n)')
  check_sensor_scale(lms, 'lms', 'd_lambda_k (Q2n)')
  return 1 - q2n(lms, toolbox.mtf_filter(fused, gains, ratio), block, block)


def hqnr(fused, lms, pan, sensor: str, ratio: int = 4, block: int = 32) -> float:
  """Hybrid QNR = (1 - D_lambda^K)(1 - D_s): the "QNR" column of the U2Net paper's Table 1.

  Args:
    fused: H x W x C pansharpened image on the sensor scale.
    lms: H x W x C MS image interpolated to the PAN size.
    pan: H x W panchromatic image.
    sensor: sensor name (see `toolbox.get_sensor`).
    ratio: resolution ratio.
    block: block side (32).

  Returns:
    HQNR (1 is ideal).
  """
  dl = d_lambda_k(fused, lms, sensor, ratio, block)
  return (1 - dl) * (1 - d_s(fused, lms, pan, ratio, block))
