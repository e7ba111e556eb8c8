"""What the classical method families share: input checks and the toolbox's small building blocks.

The component-substitution, BDSD, multiresolution and variational modules were written side by
side and each needed the same pieces; they live here once so that every family checks its
arguments the same way and computes a step the toolbox repeats (MATLAB's ``std2``, nearest
decimation, the PAN equalisation, the haze minimum of BT-H and MTF-GLP-HPM-H) with the same
float64 operations:

- `check_inputs`: validates and converts ``(lms, pan, ms_lr)``, the ratio and the sensor;
- `EPS`: MATLAB's ``eps``, added to the divisors;
- `std2`: MATLAB's ``std2`` / ``std`` (N - 1);
- `decimate`: MATLAB's ``imresize(x, 1/ratio, 'nearest')``;
- `equalize_pan`: the PAN matched to a target mean and standard deviation;
- `haze_minimum`: the per-band haze of ``BroveyRegHazeMin.m`` / ``MTF_GLP_HPM_Haze_min.m``.
"""

from __future__ import annotations

import numpy as np

from u2net_jax import toolbox

# MATLAB's eps (2^-52), added to the divisors (BroveyRegHazeMin.m:69, MTF_GLP_HPM.m, AWLP.m).
EPS = toolbox.MATLAB_EPS

# `MTF_GLP_HPM_Haze_min.m` and `BroveyRegHazeMin.m` for 4 bands (B, G, R, NIR): the haze of each
# band is this fraction of its 1st percentile.
HAZE_FRACTIONS_4 = (0.95, 0.45, 0.40, 0.05)
HAZE_PERCENTILE = 1


def check_inputs(lms, pan, ms_lr, ratio, sensor=None, need_ms_lr=True):
  """Validates and converts the arguments of a method.

  Args:
    lms: (H, W, C) MS interpolated to the PAN grid (`I_MS`).
    pan: (H, W) or (H, W, 1) PAN (`I_PAN`).
    ms_lr: (H/ratio, W/ratio, C) MS (`I_MS_LR`), or None when the method does not read it.
    ratio: the resolution ratio (a power of two).
    sensor: a sensor name of `toolbox.SENSORS`; when given, it must be a pansharpening sensor
      whose band count equals C (the MTF gains are per band).
    need_ms_lr: whether `ms_lr` must be given.

  Returns:
    (lms, pan (H, W), ms_lr or None, the sensor's entry or None, ratio as int), arrays float64.
  """
  ratio = toolbox.check_ratio(ratio)
  lms = toolbox.as_image(lms, 'lms')
  pan = toolbox.as_image(pan, 'pan')
  if pan.shape[2] != 1:
    raise ValueError(f'pan: expected an H x W (or H x W x 1) image, got shape {pan.shape}')
  pan = pan[:, :, 0]
  if pan.shape != lms.shape[:2]:
    raise ValueError(f'pan: shape {pan.shape} differs from the grid of lms {lms.shape[:2]}')
  h, w, c = lms.shape
  if h % ratio or w % ratio:
    raise ValueError(f'lms: height and width must be multiples of ratio={ratio}, got {h} x {w}')
  if ms_lr is not None:
    ms_lr = toolbox.as_image(ms_lr, 'ms_lr')
    if ms_lr.shape != (h // ratio, w // ratio, c):
      raise ValueError(
        f'ms_lr: expected shape {(h // ratio, w // ratio, c)} (lms / ratio), got {ms_lr.shape}'
      )
  elif need_ms_lr:
    raise ValueError('ms_lr: this method needs the MS at its own resolution, got None')
  entry = None
  if sensor is not None:
    entry = toolbox.get_sensor(sensor)
    if entry['task'] != 'pansharpening':
      raise ValueError(f'sensor: {sensor!r} is not a pansharpening sensor (no MTF gains)')
    if entry['bands'] != c:
      name, bands = entry['name'], entry['bands']
      raise ValueError(
        f'sensor: {name} has {bands} bands, the images have {c} '
        f'(lms: sensor {name} has {bands} bands, one MTF gain each)'
      )
  return lms, pan, ms_lr, entry, ratio


def std2(x: np.ndarray, axis=None) -> np.ndarray:
  """MATLAB ``std2`` / ``std(x(:))`` (or ``std`` along `axis`): normalised by N - 1."""
  return np.std(x, axis=axis, ddof=1)


def decimate(image: np.ndarray, ratio: int) -> np.ndarray:
  """MATLAB ``imresize(x, 1/ratio, 'nearest')`` of an image whose sides are multiples of ratio.

  The nearest sample to the output position u = ratio x + (1 - ratio) / 2 (1-based) is the
  0-based ratio // 2 + ratio k: ``x[2::4, 2::4]`` for ratio 4 (as BDSD.m's ``3:ratio:end``).
  """
  return image[ratio // 2 :: ratio, ratio // 2 :: ratio]


def equalize_pan(pan, pan_mean, pan_std, target_mean, target_std):
  """``(P - pan_mean) * (target_std / pan_std) + target_mean``: the toolbox's PAN equalisation.

  GS.m:48, BroveyRegHazeMin.m:67, MTF_GLP.m:51-53 and AWLP.m take the PAN's statistics from the
  PAN itself or from a low-passed PAN, and the target's from the intensity or from each band
  (then `pan` is (H, W, 1) and the targets are (C,)).
  """
  return (pan - pan_mean) * (target_std / pan_std) + target_mean


def haze_minimum(lms: np.ndarray) -> np.ndarray:
  """The per-band haze of `MTF_GLP_HPM_Haze_min.m` l. 48-65 and `BroveyRegHazeMin.m`:35-52.

  4 bands (B, G, R, NIR): 0.95, 0.45, 0.40, 0.05 times each band's 1st percentile (MATLAB's
  `prctile`, numpy's 'hazen' method); any other band count: each band's minimum.

  Args:
    lms: (H, W, C) MS on the PAN grid.

  Returns:
    (C,) float64.
  """
  flat = lms.reshape(-1, lms.shape[2])
  if lms.shape[2] == 4:
    prc = np.percentile(flat, HAZE_PERCENTILE, axis=0, method='hazen')
    return np.asarray(HAZE_FRACTIONS_4) * prc
  return flat.min(axis=0)
