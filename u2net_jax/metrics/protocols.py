"""The tables' protocols (reduced resolution, full resolution, HISR) and their mean±std rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from u2net_jax.metrics.no_reference import d_lambda, d_lambda_k, d_s
from u2net_jax.metrics.reference import as_pair, ergas, psnr, q2n, q_index, sam, scc, ssim


def reduced_resolution_metrics(
  ref, out, max_value: float, ratio: int = 4, crop: int = 21, block: int = 32
) -> dict[str, float]:
  """The reduced-resolution protocol of the pansharpening tables (`indexes_evaluation.m`).

  PSNR on the uncropped images divided by `max_value`; SAM, ERGAS, Q2n, Q_avg and SCC on the
  images cropped like `I(crop:end-crop, crop:end-crop, :)` (numpy [crop-1 : -crop]; 256 -> 215
  for crop 21), no clipping.

  Args:
    ref: H x W x C ground truth on the sensor scale.
    out: H x W x C fused image on the sensor scale (the network output clamped to [0, 1] and
      multiplied by `max_value` beforehand, as for the published tables).
    max_value: sensor maximum (2047, or 1023 for GF-2).
    ratio: resolution ratio (ERGAS).
    crop: the toolbox's `dim_cut` (21); 0 for none.
    block: Q2n and Q_avg block size (32).

  Returns:
    {'PSNR', 'Q2n', 'Q_avg', 'SAM', 'ERGAS', 'SCC'} -> float.
  """
  ref, out = as_pair(ref, out)
  if not max_value > 0:
    raise ValueError(f'max_value: must be positive, got {max_value}')
  result = {'PSNR': psnr(ref / max_value, out / max_value, data_range=1.0)}
  if crop:
    h, w = ref.shape[:2]
    if h - crop <= crop - 1 or w - crop <= crop - 1:
      raise ValueError(f'ref: size {h}x{w} is too small for a crop of {crop}')
    ref = ref[crop - 1 : h - crop, crop - 1 : w - crop]
    out = out[crop - 1 : h - crop, crop - 1 : w - crop]
  result['Q2n'] = q2n(ref, out, block, block)
  result['Q_avg'] = q_index(ref, out, block)
  result['SAM'] = sam(ref, out)
  result['ERGAS'] = ergas(ref, out, ratio)
  result['SCC'] = scc(ref, out)
  return result


def full_resolution_metrics(
  fused, lms, pan, sensor: str, ratio: int = 4, block: int = 32
) -> dict[str, float]:
  """The full-resolution protocol (`indexes_evaluation_FS.m`): QNR and HQNR branches.

  No crop, no clipping. The paper's Table 1 "QNR" column is 'HQNR'.

  Args:
    fused: H x W x C fused image on the sensor scale (H, W multiples of `block`).
    lms: H x W x C MS image interpolated to the PAN size (`toolbox.interp23tap`), sensor scale.
    pan: H x W panchromatic image.
    sensor: sensor name (see `toolbox.get_sensor`).
    ratio: resolution ratio.
    block: block side (32).

  Returns:
    {'D_lambda', 'D_s', 'QNR', 'D_lambda_K', 'HQNR'} -> float.
  """
  dl = d_lambda(fused, lms, block)
  ds = d_s(fused, lms, pan, ratio, block)
  dlk = d_lambda_k(fused, lms, sensor, ratio, block)
  return {
    'D_lambda': dl,
    'D_s': ds,
    'QNR': (1 - dl) * (1 - ds),
    'D_lambda_K': dlk,
    'HQNR': (1 - dlk) * (1 - ds),
  }


def hisr_metrics(ref, out, ratio: int = 4, clip: bool = True) -> dict[str, float]:
  """The HISR protocol (Table 4, CAVE/Harvard): PSNR, SSIM, SAM, ERGAS on data in [0, 1], no crop.

  Args:
    ref: H x W x C ground truth in [0, 1].
    out: H x W x C estimate; clamped to [0, 1] first when `clip` (as the evaluation does).
    ratio: resolution ratio (ERGAS).
    clip: clamp `out` to [0, 1].

  Returns:
    {'PSNR', 'SSIM', 'SAM', 'ERGAS'} -> float.
  """
  ref, out = as_pair(ref, out)
  if ref.max() > 1.0 + 1e-6 or ref.min() < -1e-6:
    raise ValueError(
      f'ref: values span [{ref.min():g}, {ref.max():g}]; hisr_metrics expects data in [0, 1]'
    )
  if clip:
    out = np.clip(out, 0.0, 1.0)
  return {
    'PSNR': psnr(ref, out, data_range=1.0),
    'SSIM': ssim(ref, out, data_range=1.0),
    'SAM': sam(ref, out),
    'ERGAS': ergas(ref, out, ratio),
  }


def aggregate(results: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
  """Mean and standard deviation over images, as the tables print them.

  Args:
    results: one metrics dict per image, all with the same keys.

  Returns:
    name -> (mean, std), std with N - 1 like MATLAB's `std` (0 for a single image).
  """
  results = list(results)
  if not results:
    raise ValueError('results: no images to aggregate')
  keys = list(results[0])
  for i, r in enumerate(results):
    if list(r) != keys:
      raise ValueError(f'results[{i}]: keys {list(r)} differ from results[0] keys {keys}')
  out = {}
  for k in keys:
    v = np.array([r[k] for r in results], dtype=np.float64)
    out[k] = (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)
  return out


def format_table(rows: Mapping[str, Mapping[str, tuple[float, float]]], digits: int = 4) -> str:
  """A plain-text table of 'mean±std' per metric, one row per method or dataset.

  Args:
    rows: row name -> `aggregate` output.
    digits: decimals printed.

  Returns:
    The table as a string (columns are the union of the metrics, in first-seen order).
  """
  cols: list[str] = []
  for agg in rows.values():
    cols += [k for k in agg if k not in cols]
  cells = [['', *cols]]
  for name, agg in rows.items():
    cells.append(
      [name] + [f'{agg[k][0]:.{digits}f}±{agg[k][1]:.{digits}f}' if k in agg else '-' for k in cols]
    )
  widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)
