"""Wald's protocol: simulate reduced-resolution training data from full-resolution images.

Pansharpening (the benchmark toolbox's `resize_images`, Vivone et al. 2015): every MS band and
the PAN are low-passed by a Gaussian matched to the sensor's MTF (gain at Nyquist per band,
`toolbox.mtf_filter`), then decimated by the ratio keeping one pixel in `ratio`, starting at
`ratio // 2` (what MATLAB's `imresize(x, 1/ratio, 'nearest')` keeps); the original MS becomes
the reference `gt`, and `lms` is the decimated MS re-interpolated by the 23-tap polynomial
interpolator (`toolbox.interp23tap`, the benchmark toolbox's `interp23tap`).

HISR (CAVE, Harvard): a Gaussian blur (kernel size and sigma configurable; default 3 x 3,
sigma 0.5 after HSRnet, Hu et al. 2021, whose CAVE files the paper uses -- the original kernel
could not be checked here), decimation by 4 as above, and the RGB guide simulated from the
high-resolution cube with a 31 x 3 camera spectral response: RGB = HSI @ SRF.

The filters and the interpolator are `u2net_jax.toolbox`'s, which the metrics use too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage

from u2net_jax import toolbox


def decimate(image: np.ndarray, ratio: int = 4) -> np.ndarray:
  """Keeps one pixel in `ratio` per axis, starting at `ratio // 2`.

  Args:
    image: (H, W) or (H, W, C).
    ratio: the decimation factor.

  Returns:
    (ceil((H - ratio//2) / ratio), ..., [C]); (H/ratio, W/ratio[, C]) when H, W divide by it.
  """
  o = ratio // 2
  return image[o::ratio, o::ratio]


def mtf_reduce(image: np.ndarray, gnyq, ratio: int = 4) -> np.ndarray:
  """MTF-matched low-pass filter (replicate borders) then decimation.

  Args:
    image: (H, W, C) with `gnyq` a sequence of C gains, or (H, W) with a float gain.
    gnyq: the MTF gains at Nyquist.
    ratio: the resolution ratio.

  Returns:
    (H/ratio, W/ratio[, C]) float64.
  """
  low = np.asarray(toolbox.mtf_filter(np.asarray(image, np.float64), gnyq, ratio=ratio))
  return decimate(low, ratio)


def reduce_pansharpening(
  pan: np.ndarray, ms: np.ndarray, sensor: str, ratio: int = 4
) -> dict[str, np.ndarray]:
  """A reduced-resolution example from a full-resolution PAN/MS pair.

  Args:
    pan: (H, W) PAN on the sensor scale.
    ms: (H/ratio, W/ratio, C) MS on the sensor scale.
    sensor: a pansharpening sensor `toolbox.get_sensor` knows (its MTF gains are used).
    ratio: the resolution ratio.

  Returns:
    Role -> float64 array: 'gt' (h, w, C) = the original MS, 'ms' (h/ratio, w/ratio, C),
    'lms' (h, w, C), 'guide' (h, w, 1) = the reduced PAN.
  """
  info = toolbox.get_sensor(sensor)
  if info['task'] != 'pansharpening':
    raise ValueError(f'sensor {info["name"]} is a {info["task"]} dataset, not a pansharpening one')
  gains = list(info['ms_gnyq'])
  if len(gains) != ms.shape[-1]:
    raise ValueError(f'sensor {sensor} has {len(gains)} MS gains; the MS has {ms.shape[-1]} bands')
  ms_lr = mtf_reduce(ms, gains, ratio)
  pan_lr = mtf_reduce(pan, float(info['pan_gnyq']), ratio)
  return {
    'gt': np.asarray(ms, np.float64),
    'ms': ms_lr,
    'lms': toolbox.interp23tap(ms_lr, ratio),
    'guide': pan_lr[..., None],
  }


def full_resolution(pan: np.ndarray, ms: np.ndarray, ratio: int = 4) -> dict[str, np.ndarray]:
  """A full-resolution (no reference) example: the pair itself plus `lms`.

  Args:
    pan: (H, W); ms: (H/ratio, W/ratio, C); both on the sensor scale.
    ratio: the resolution ratio.

  Returns:
    'ms' (H/ratio, W/ratio, C), 'lms' (H, W, C), 'guide' (H, W, 1), float64.
  """
  ms = np.asarray(ms, np.float64)
  return {
    'ms': ms,
    'lms': toolbox.interp23tap(ms, ratio),
    'guide': np.asarray(pan, np.float64)[..., None],
  }


def gaussian_reduce(
  image: np.ndarray, ratio: int = 4, kernel_size: int = 3, sigma: float = 0.5
) -> np.ndarray:
  """Gaussian blur of every band (replicate borders) then decimation by `ratio`.

  Args:
    image: (H, W, C).
    ratio: the decimation factor.
    kernel_size: the side of the Gaussian kernel.
    sigma: its standard deviation in pixels.

  Returns:
    (H/ratio, W/ratio, C) float64.
  """
  # fspecial's Gaussian is the outer product of two normalised 1-D Gaussians: filter separably.
  r = (np.arange(kernel_size) - (kernel_size - 1) / 2.0) ** 2
  k = np.exp(-r / (2.0 * sigma**2))
  k /= k.sum()
  low = scipy.ndimage.correlate1d(np.asarray(image, np.float64), k, axis=0, mode='nearest')
  low = scipy.ndimage.correlate1d(low, k, axis=1, mode='nearest')
  return decimate(low, ratio)


def reduce_hisr(
  hsi: np.ndarray,
  srf: np.ndarray,
  ratio: int = 4,
  kernel_size: int = 3,
  sigma: float = 0.5,
) -> dict[str, np.ndarray]:
  """A HISR example from a high-resolution cube: LR-HSI by blur + decimation, RGB by the SRF.

  Args:
    hsi: (H, W, C) in [0, 1].
    srf: (C, c) camera spectral response (c = 3 for RGB).
    ratio, kernel_size, sigma: the degradation (see `gaussian_reduce`).

  Returns:
    'gt' (H, W, C), 'ms' (H/ratio, W/ratio, C), 'lms' (H, W, C) by the 23-tap interpolator,
    'guide' (H, W, c) = hsi @ srf; float64.
  """
  hsi = np.asarray(hsi, np.float64)
  srf = np.asarray(srf, np.float64)
  if srf.shape[0] != hsi.shape[-1]:
    raise ValueError(f'SRF has shape {srf.shape}; expected ({hsi.shape[-1]}, c)')
  ms = gaussian_reduce(hsi, ratio, kernel_size, sigma)
  return {'gt': hsi, 'ms': ms, 'lms': toolbox.interp23tap(ms, ratio), 'guide': hsi @ srf}


def check_ratio(pan_shape: Sequence[int], ms_shape: Sequence[int], ratio: int = 4) -> str | None:
  """Returns why a PAN/MS pair is not exactly `ratio`x apart, or None when it is."""
  h, w = ms_shape[:2]
  if tuple(pan_shape[:2]) != (ratio * h, ratio * w):
    return (
      f'PAN is {tuple(pan_shape[:2])}; expected ({ratio * h},{ratio * w}) = {ratio}x the MS '
      f'size ({h},{w})'
    )
  return None
