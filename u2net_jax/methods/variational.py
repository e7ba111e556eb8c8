"""Variational and sparse-representation pansharpening of the toolbox: TV and SR-D.

| name | MATLAB call |
|---|---|
| `tv` | `TV_pansharpen(I_MS_LR, I_PAN, alpha, lambda, c, maxiter, w)` (1) |

(1) with the parameters of the demo's `switch sensor`: the sensor table's `'tv'` entry.

Both are global methods (TV iterates over the whole image; SR-D learns its dictionary from every
patch), so they have no halo: `halo` returns None for them and a streamer must run them on the
whole scene.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from u2net_jax import toolbox
from u2net_jax.methods import multiresolution as _mra

# ---------------------------------------------------------------------------------------------
# TV (`TV_pansharpen.m`, Palsson et al. 2014).


def _dx(v):
  # Dx: [diff(v, 1, 2) zeros(size(v, 1), 1)] (TV_pansharpen.m:Dx), every plane at once.
  out = np.zeros_like(v)
  out[:, :-1] = v[:, 1:] - v[:, :-1]
  return out


def _dy(v):
  # Dy: [diff(v); zeros(1, size(v, 2))].
  out = np.zeros_like(v)
  out[:-1] = v[1:] - v[:-1]
  return out


def _dyt(v):
  # DyT: [-v(1, :); -diff(v)(1:end-1, :); v(end-1, :)], the adjoint of Dy.
  out = np.empty_like(v)
  out[0] = -v[0]
  out[1:-1] = v[:-2] - v[1:-1]
  out[-1] = v[-2]
  return out


def _dxt(v):
  # DxT(v) = DyT(v')', written along the columns directly.
  out = np.empty_like(v)
  out[:, 0] = -v[:, 0]
  out[:, 1:-1] = v[:, :-2] - v[:, 1:-1]
  out[:, -1] = v[:, -2]
  return out


def _dtz(z, bands, offset):
  # DTz / cIDDTz: dtz(:, :, i) = DxT(z(:, :, i)) + DyT(z(:, :, i + 4)), i = 1..size(z, 3)/2.
  # The toolbox's offset is the literal 4: right for 4 bands; with 8 it pairs band i's
  # x-component with band i + 4's and never reads the last 4 planes.
  return _dxt(z[:, :, :bands]) + _dyt(z[:, :, offset : offset + bands])


def _db(b):
  # computeDb: the x-differences of every band, then the y-differences.
  return np.concatenate([_dx(b), _dy(b)], axis=2)


class _Resizer:
  """`imresize(x, scale, method)` of every band of (H, W, C) images of one size, sparse."""

  def __init__(self, shape, scale, method):
    self.rows = sparse.csr_matrix(toolbox.resize_matrix(shape[0], scale, method))
    self.cols = sparse.csr_matrix(toolbox.resize_matrix(shape[1], scale, method))

  def __call__(self, x):
    # MATLAB resizes rows first (equal scales), then columns.
    h, w, c = x.shape
    y = (self.rows @ x.reshape(h, w * c)).reshape(-1, w, c)
    y = self.cols @ y.transpose(1, 0, 2).reshape(w, -1)
    return y.reshape(-1, self.rows.shape[0], c).transpose(1, 0, 2)


def tv(
  lms,
  pan,
  ms_lr,
  *,
  sensor,
  ratio=4,
  w=None,
  c=None,
  alpha=None,
  maxiter=None,
  lam=None,
  fix_pairing=False,
  fix_majorizer=False,
):
  """TV pansharpening (`TV_pansharpen.m`) with the demo's parameters for the sensor.

  Minimises ||y_ms - M x||^2 + ||y_pan - sum_i w_i x_i||^2 + lambda TV(x) by majorisation-
  minimisation from x_0 = 0, `maxiter` iterations; M is `imresize(x, 1/4, 'bilinear')`
  (antialiased) and its adjoint is taken as `imresize(y, 4, 'bilinear')`, as in the toolbox.
  Per iteration: b = alpha x + H^T(y - H x); W = 2 alpha / lambda |grad x_i| + c (both
  components); z = (D b + D D^T z) / W; x = (b - D^T z) / alpha.

  The toolbox's quirks are kept by default:
  - D^T z pairs z(:, :, i) with z(:, :, i + 4), right for 4 bands only; `fix_pairing=True`
    pairs band i's x- and y-components (z(:, :, i + C)).
  - `cIDDTz` computes c z - D D^T z and returns D D^T z, so z = (D b + D D^T z) / W;
    `fix_majorizer=True` uses the computed c z - D D^T z (the published algorithm).

  Args:
    lms: (H, W, C) MS on the PAN grid: only its shape is checked (TV starts from 0).
    pan: (H, W) PAN.
    ms_lr: (H/ratio, W/ratio, C) MS: the data term.
    sensor: sensor name; its table entry's 'tv' gives the defaults of the parameters below
      (QB and GF-2 have none: pass all five).
    ratio: must be 4 (the toolbox's decimate/interpolate are fixed at 0.25 and 4).
    w: (C,) PAN weights of the bands.
    c: the majoriser's constant.
    alpha: the step parameter.
    maxiter: the number of iterations.
    lam: the TV weight (`lambda`).
    fix_pairing: pair the gradient components of the same band (see above).
    fix_majorizer: use c z - D D^T z in the z update (see above).

  Returns:
    (H, W, C) float64.
  """
  lms, pan, ms_lr, entry, ratio = _mra.check_inputs(lms, pan, ms_lr, sensor, ratio)
  if ratio != 4:
    raise ValueError(f'ratio: TV_pansharpen.m resizes by 0.25 and 4 only, got {ratio}')
  given = {'w': w, 'c': c, 'alpha': alpha, 'maxiter': maxiter, 'lambda': lam}
  defaults = entry['tv']
  if defaults is None and any(v is None for v in given.values()):
    missing = sorted(k if k != 'lambda' else 'lam' for k, v in given.items() if v is None)
    raise ValueError(
      f'sensor: the toolbox demo has no TV parameters for {entry["name"]}; pass {missing}'
    )
  p = {k: (defaults[k] if v is None else v) for k, v in given.items()}
  bands = ms_lr.shape[2]
  weights = np.asarray(p['w'], np.float64)
  if weights.shape != (bands,):
    raise ValueError(f'w: expected {bands} PAN weights, got shape {weights.shape}')
  if bands < 4 and not fix_pairing:
    raise ValueError(f'ms_lr: the toolbox pairs z(:, :, i) with z(:, :, i + 4); {bands} bands')
  maxiter = int(p['maxiter'])
  a, lam_, cc = float(p['alpha']), float(p['lambda']), float(p['c'])
  offset = bands if fix_pairing else 4
  h, wd = pan.shape
  decimate = _Resizer((h, wd), 0.25, 'bilinear')
  interpolate = _Resizer((h // 4, wd // 4), 4, 'bilinear')
  x = np.zeros((h, wd, bands))
  z = np.zeros((h, wd, 2 * bands))
  for _ in range(maxiter):
    # computeb: b = alpha x + H^T (y - H x); the PAN sum accumulates band by band.
    hx_pan = np.zeros((h, wd))
    for i in range(bands):
      hx_pan = hx_pan + weights[i] * x[:, :, i]
    r_pan = pan - hx_pan
    b = a * x + (interpolate(ms_lr - decimate(x)) + weights * r_pan[:, :, None])
    # znext: W from the previous x; z1 = (D b + cIDDTz(z0)) ./ W.
    grad = 2 * a / lam_ * np.sqrt(_dx(x) ** 2 + _dy(x) ** 2) + cc
    weight = np.concatenate([grad, grad], axis=2)
    ddtz = _db(_dtz(z, bands, offset))
    z = (_db(b) + (cc * z - ddtz if fix_majorizer else ddtz)) / weight
    # xnext.
    x = (b - _dtz(z, bands, offset)) / a
  return x


def halo(name: str, ratio: int = 4):
  """None for every method here: they are global (see the module docstring).

  Args:
    name: a key of `METHODS`.
    ratio: resolution ratio.

  Returns:
    None.
  """
  if name not in METHODS:
    raise ValueError(f'name: expected one of {sorted(METHODS)}, got {name!r}')
  return None


METHODS = {
  'tv': tv,
}
