"""Variational and sparse-representation pansharpening of the toolbox: TV and SR-D.

| name | MATLAB call |
|---|---|
| `tv` | `TV_pansharpen(I_MS_LR, I_PAN, alpha, lambda, c, maxiter, w)` (1) |

| `sr-d` | `CS(I_MS, I_PAN, I_MS_LR, ratio, sensor, 7, 4, 10)` (TS = 7, ol = 4, n_atoms = 10) |

(1) with the parameters of the demo's `switch sensor`: the sensor table's `'tv'` entry.

Plain numpy: TV's 50 iterations take about 2 s on a 256 x 256 x 8 image (2 CPU cores); a jitted
JAX version (float64, `lax.fori_loop`, dense resize matrices) took 0.85 s after compilation, a
gain that would not survive large images without a banded resize, so it was not kept.

Both are global methods (TV iterates over the whole image; SR-D learns its dictionary from every
patch), so they have no halo: `halo` returns None for them and a streamer must run them on the
whole scene.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from u2net_jax import toolbox
from u2net_jax.methods.common import check_inputs, decimate, std2

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
  lms, pan, ms_lr, entry, ratio = check_inputs(lms, pan, ms_lr, ratio, sensor)
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
  shrink = _Resizer((h, wd), 0.25, 'bilinear')
  enlarge = _Resizer((h // 4, wd // 4), 4, 'bilinear')
  x = np.zeros((h, wd, bands))
  z = np.zeros((h, wd, 2 * bands))
  for _ in range(maxiter):
    # computeb: b = alpha x + H^T (y - H x); the PAN sum accumulates band by band.
    hx_pan = np.zeros((h, wd))
    for i in range(bands):
      hx_pan = hx_pan + weights[i] * x[:, :, i]
    r_pan = pan - hx_pan
    b = a * x + (enlarge(ms_lr - shrink(x)) + weights * r_pan[:, :, None])
    # znext: W from the previous x; z1 = (D b + cIDDTz(z0)) ./ W.
    grad = 2 * a / lam_ * np.sqrt(_dx(x) ** 2 + _dy(x) ** 2) + cc
    weight = np.concatenate([grad, grad], axis=2)
    ddtz = _db(_dtz(z, bands, offset))
    z = (_db(b) + (cc * z - ddtz if fix_majorizer else ddtz)) / weight
    # xnext.
    x = (b - _dtz(z, bands, offset)) / a
  return x


# ---------------------------------------------------------------------------------------------
# SR-D (`CS.m`, Vicinanza et al. 2015): sparse representation of the details.


def _tiles(n_lr: int, ts: int, ol: int):
  """0-based starts (MS grid) of the tiles along one axis (`Dict_Learn.m` l. 40-55).

  ceil((n - ol) / (ts - ol)) tiles at multiples of ts - ol; the last one is shifted back by
  ts - ol - mod(n - ol, ts - ol) when that mod is not 0, so that it ends inside the image.
  """
  count = -(-(n_lr - ol) // (ts - ol))
  starts = [k * (ts - ol) for k in range(count)]
  rem = (n_lr - ol) % (ts - ol)
  if rem:
    starts[-1] -= ts - ol - rem
  return starts


def _omp(dictionary, y, bands, first, n_atoms):
  """`OMP.m`: band-wise least squares on a common, greedily grown support.

  The first atom is the patch's own (`first`); each later one maximises |D^T res| (the first
  maximum); a band's coefficients are solved only when det(D_i^T D_i) > 0.1 (else 0); at most
  `n_atoms` atoms, fewer if the residual reaches exactly 0.

  Returns:
    (coefficients (j, bands), atom indices (j,)).
  """
  n = dictionary.shape[0] // bands
  d_bands = dictionary.reshape(bands, n, -1)
  y_bands = y.reshape(bands, n)
  res = y
  indices = []
  j = 0
  coef = np.zeros((0, bands))
  while np.sum(res**2) > 0 and j < n_atoms:
    j += 1
    if j == 1:
      indices.append(first)
    else:
      indices.append(int(np.argmax(np.abs(dictionary.T @ res))))
    di = d_bands[:, :, indices]  # (bands, n, j)
    dtd = np.swapaxes(di, 1, 2) @ di
    ok = np.linalg.det(dtd) > 1e-1
    coef = np.zeros((j, bands))
    approx = np.zeros((bands, n))
    for b in np.flatnonzero(ok):
      # (DitDi \ Di') * yi, in that order (OMP.m l. 58).
      coef[:, b] = np.linalg.solve(dtd[b], di[b].T) @ y_bands[b]
      approx[b] = di[b] @ coef[:, b]
    res = y - approx.ravel()
  return coef, np.asarray(indices)


def sr_d(lms, pan, ms_lr=None, *, sensor, ratio=4, ts=7, ol=4, n_atoms=10):
  """SR-D (`CS.m`): the MS details as sparse combinations of PAN-detail patches.

  P_b = (P - mean P) / std(P) std(MS_b) + mean(MS_b); the MS details MS - MTF(MS) are decimated
  to the MS grid (`I_MS_LR`'s content is never used: the toolbox overwrites it); the PAN details
  P_b - imresize(decimate(MTF(P_b)), r) (bicubic) form the high-resolution dictionary, their
  MTF-filtered, decimated version (`resize_images`) the low-resolution one, one atom per tile of
  ts x ts MS pixels with overlap ol. Each tile's MS details are coded by `_omp` on the
  low-resolution dictionary, the high-resolution atoms are combined with those coefficients, and
  overlapping tiles are averaged; out = MS + details.

  The toolbox's `CS.m` ignores its n_atoms argument (`if nargin < 9, n_atoms = 10` always
  fires); here `n_atoms` is honoured, and its default 10 is the toolbox's.

  Args:
    lms: (H, W, C) MS on the PAN grid.
    pan: (H, W) PAN.
    ms_lr: optional (H/ratio, W/ratio, C) MS: only its shape is checked (see above).
    sensor: sensor name (its MTF gains).
    ratio: resolution ratio.
    ts: tile side on the MS grid (the demo's TS = 7).
    ol: tile overlap on the MS grid (the demo's ol = 4).
    n_atoms: the most atoms per tile.

  Returns:
    (H, W, C) float64.
  """
  lms, pan, ms_lr, entry, ratio = check_inputs(lms, pan, ms_lr, ratio, sensor, need_ms_lr=False)
  if not (isinstance(ts, int) and isinstance(ol, int) and 0 <= ol < ts):
    raise ValueError(f'ts, ol: expected integers with 0 <= ol < ts, got ts={ts}, ol={ol}')
  h, w, bands = lms.shape
  hl, wl = h // ratio, w // ratio
  if min(hl, wl) < ts:
    raise ValueError(f'lms: SR-D needs an MS grid of at least ts={ts} pixels a side, got {hl}x{wl}')
  gains = entry['ms_gnyq']
  # CS.m l. 57-60: (P - mean2(P)) / std2(P) * std2(MS_b) + mean2(MS_b).
  pans = (pan[:, :, None] - pan.mean()) / std2(pan) * std2(lms, (0, 1))
  pans = pans + lms.mean(axis=(0, 1))
  ms_details = decimate(lms - toolbox.mtf_filter(lms, gains, ratio), ratio)
  pan_lp = toolbox.imresize(decimate(toolbox.mtf_filter(pans, gains, ratio), ratio), ratio)
  pan_details = pans - pan_lp
  pan_details_lr = decimate(toolbox.mtf_filter(pan_details, gains, ratio), ratio)

  rows, cols = _tiles(hl, ts, ol), _tiles(wl, ts, ol)
  big = ts * ratio

  # Dict_Learn.m: one column per tile (row-major tile order), each band's patch in MATLAB's
  # column-major order, band after band.
  def columns(image, starts_r, starts_c, side):
    patches = [
      image[r : r + side, c : c + side].transpose(2, 1, 0).reshape(-1)
      for r in starts_r
      for c in starts_c
    ]
    return np.stack(patches, axis=1)

  d_high = columns(pan_details, [r * ratio for r in rows], [c * ratio for c in cols], big)
  d_low = columns(pan_details_lr, rows, cols, ts)
  targets = columns(ms_details, rows, cols, ts)

  fused = np.zeros((h, w, bands))
  count = np.zeros((h, w, bands))
  d_high_bands = d_high.reshape(bands, big * big, -1)
  atom = 0
  for r in rows:
    for c in cols:
      coef, idx = _omp(d_low, targets[:, atom], bands, atom, n_atoms)
      patch = np.einsum('bpj,jb->bp', d_high_bands[:, :, idx], coef)
      # reshape(reconstr_patch, Lr, Lc): column-major.
      patch = patch.reshape(bands, big, big).transpose(2, 1, 0)
      fused[r * ratio : r * ratio + big, c * ratio : c * ratio + big] += patch
      count[r * ratio : r * ratio + big, c * ratio : c * ratio + big] += 1
      atom += 1
  return lms + fused / count


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
  'sr-d': sr_d,
}
