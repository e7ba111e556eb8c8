"""SYNTHETIC demo data for both tasks, generated in-process (no download).

THESE DATA ARE SYNTHETIC. They exist so that the whole project (training, evaluation, TFDS,
multi-device runs) can be exercised anywhere in seconds; no number measured on them says anything
about real imagery.

How a scene is made (deterministic from the seed):
1. Spatial structure on a large canvas: a land-cover map from the arg-max of multi-scale random
   fields (irregular fields, parcels), straight roads, rectangular buildings with cast shadows,
   then a smooth illumination field and per-class fine texture (multiplicative, shared by all
   bands, as shading is in real scenes).
2. Spectra: each class gets a smooth reflectance curve drawn around one of six archetypes
   (vegetation with its red edge, soil, water, concrete, asphalt, red roof), so every pixel is
   a mixture of a few smooth endmember spectra (the class borders are anti-aliased).
3. The guide from a spectral response: the PAN as a weighted sum of the bands (pansharpening),
   or RGB with three Gaussian camera responses at 460/540/610 nm (HISR).
4. Wald's protocol on the whole canvas: Gaussian blur (pansharpening: the Gaussian whose gain at
   the low-resolution Nyquist frequency is 0.3, as the MTF gains of real MS sensors; HISR: the
   3 x 3, sigma 0.5 kernel of `prepare_cave`), decimation by 4 (`wald.decimate`), then the canvas
   is cut into non-overlapping patches and `lms` = `toolbox.interp23tap(ms)` per patch.

The guide carries the high-frequency content of every band (same edges and shading, band gains
set by the local spectra), so a fusion network can learn to beat the `lms` baseline quickly.

The sensor (`toolbox.SENSORS`, `config.data.sensor`) sets what the data stand for: its task
(PAN or RGB guide, the blur above), its band count and its maximum value, so any sensor of the
table has demo data (e.g. `--config.data.sensor=GF2` on configs/demo.py). The task names
'pansharpening' and 'hisr' stand for `DEMO_SENSORS`' WV3 and CAVE. `make_split` returns the data
in [0, 1], i.e. already divided by the sensor's maximum (`metadata(sensor)['max_value']`).

`DemoSource` is the 'demo' reader of the data layer (`sources`, `--config.data.source=demo`).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import scipy.ndimage

from u2net_jax import toolbox
from u2net_jax.data import sources, wald

RATIO = toolbox.get_sensor('WV3')['ratio']  # Every sensor of the table has the same ratio.
# The sensor a task name stands for (the TFDS demo builder's configs are named by task).
DEMO_SENSORS = {'pansharpening': 'WV3', 'hisr': 'CAVE'}
# Band centres (nm): WorldView-3's eight MS bands, the four of QuickBird/GF-2, CAVE's 400..700.
_WV3_CENTRES = [425, 480, 545, 605, 660, 725, 832, 950]
_FOUR_CENTRES = [485, 560, 660, 830]
_CANVAS = 256  # Side of a generated canvas (high resolution).
_MS_GNYQ = 0.3


def wavelengths(task: str, bands: int) -> np.ndarray:
  """Band centres in nm for a task and band count."""
  if task == 'hisr':
    return np.linspace(400.0, 700.0, bands)
  if bands == 8:
    return np.array(_WV3_CENTRES, np.float64)
  if bands == 4:
    return np.array(_FOUR_CENTRES, np.float64)
  return np.linspace(430.0, 950.0, bands)


def _archetype(kind: int, lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A smooth reflectance curve (values ~0.02..0.7) around one of six archetypes."""
  j = rng.uniform(0.8, 1.2)
  x = (lam - 400.0) / 550.0  # 0 at 400 nm, 1 at 950 nm.
  if kind == 0:  # Vegetation: green bump, chlorophyll trough, red edge near 715 nm.
    edge = 1 / (1 + np.exp(-(lam - rng.uniform(700, 730)) / 12.0))
    green = 0.05 * np.exp(-(((lam - 550) / 35.0) ** 2))
    r = 0.04 + green + rng.uniform(0.35, 0.55) * edge
  elif kind == 1:  # Soil: rising, slightly convex.
    r = 0.08 + rng.uniform(0.2, 0.35) * x**0.7
  elif kind == 2:  # Water: dark, falling into the NIR.
    r = 0.08 * np.exp(-(((lam - 480) / 90.0) ** 2)) + 0.01
  elif kind == 3:  # Concrete / bright roof: high and nearly flat.
    r = rng.uniform(0.35, 0.5) + 0.08 * x
  elif kind == 4:  # Asphalt: dark and flat.
    r = rng.uniform(0.06, 0.1) + 0.03 * x
  else:  # Red roof tiles: low blue, steep rise in the red.
    r = 0.06 + rng.uniform(0.25, 0.4) / (1 + np.exp(-(lam - 590) / 20.0))
  return np.clip(j * r, 0.01, 0.9)


def _field(rng: np.random.Generator, side: int, beta: float = 3.0, cutoff: float = 4.0):
  """A smooth random field (side, side), zero-mean, unit-std: 1/f^beta noise by FFT synthesis.

  Larger `beta` gives smoother fields; `cutoff` (cycles per canvas) sets the largest structures.
  """
  f = np.fft.fftfreq(side) * side
  radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
  amplitude = (np.maximum(radius, cutoff)) ** (-beta / 2)
  spectrum = amplitude * np.fft.fft2(rng.standard_normal((side, side)))
  out = np.fft.ifft2(spectrum).real
  return (out - out.mean()) / (out.std() + 1e-12)


def _scene(rng: np.random.Generator, lam: np.ndarray, side: int) -> np.ndarray:
  """One SYNTHETIC high-resolution scene (side, side, bands) in [0, 1]."""
  n_classes = 6
  spectra = np.stack([_archetype(k, lam, rng) for k in range(n_classes)])  # (K, C)
  # Land cover: arg-max of multi-scale fields gives irregular parcels (classes 0, 1, 2).
  fields = np.stack([_field(rng, side) for _ in range(3)])
  labels = np.argmax(fields, axis=0)
  shade = np.ones((side, side))
  # Roads (asphalt, class 4) as straight lines of random orientation and width.
  yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
  for _ in range(rng.integers(1, 4)):
    theta = rng.uniform(0, np.pi)
    c = rng.uniform(0, side)
    dist = np.abs((xx - side / 2) * np.cos(theta) + (yy - side / 2) * np.sin(theta) - c + side / 2)
    labels[dist < rng.uniform(1.5, 4.0)] = 4
  # Buildings (classes 3 and 5) with a shadow cast to the lower right.
  for _ in range(rng.integers(side // 32, side // 8)):
    h, w = rng.integers(5, 24, size=2)
    y, x = rng.integers(0, side - 4, size=2)
    d = rng.integers(2, 5)
    shade[y + d : y + h + d, x + d : x + w + d] *= 0.55
    labels[y : y + h, x : x + w] = rng.choice([3, 5])
    shade[y : y + h, x : x + w] = 1.0
  onehot = (labels[..., None] == np.arange(n_classes)).astype(np.float64)
  abundance = scipy.ndimage.gaussian_filter(onehot, sigma=(0.6, 0.6, 0))  # Anti-aliased borders.
  # Per-class spectral variability (smooth in space) and fine texture shared by all bands.
  variability = 1 + 0.15 * np.tanh(_field(rng, side, beta=2.5, cutoff=8.0))
  texture = 1 + 0.08 * rng.standard_normal((side, side)) * (labels[..., None] != 2)[..., 0]
  texture = scipy.ndimage.gaussian_filter(texture, 0.7)
  light = 1.2 + 0.2 * np.tanh(_field(rng, side, beta=4.0, cutoff=2.0))
  gain = (shade * texture * light * variability)[..., None]
  return np.clip(gain * (abundance @ spectra), 0.0, 1.0)


def spectral_response(task: str, lam: np.ndarray) -> np.ndarray:
  """(C, c) SYNTHETIC spectral response: PAN weights (c = 1) or an RGB camera (c = 3).

  Every column sums to 1, so the guide stays on the scale of the bands.
  """
  if task == 'hisr':
    cols = [np.exp(-0.5 * ((lam - mu) / 30.0) ** 2) for mu in (610.0, 540.0, 460.0)]  # R, G, B.
    srf = np.stack(cols, axis=1)
  else:  # A PAN covering ~450..800 nm (as WorldView's), tapering off in the NIR.
    srf = (1 / (1 + np.exp(-(lam - 440) / 15.0)) / (1 + np.exp((lam - 820) / 30.0)))[:, None]
  return srf / srf.sum(axis=0, keepdims=True)


def _gaussian_sigma(gnyq: float, ratio: int = RATIO) -> float:
  """Spatial sigma of the Gaussian whose gain at the LR Nyquist frequency 1/(2 ratio) is gnyq."""
  return ratio * np.sqrt(-2.0 * np.log(gnyq)) / np.pi


def _degrade(task: str, gt: np.ndarray) -> np.ndarray:
  """Blur + decimation of a canvas (H, W, C) -> (H/4, W/4, C)."""
  if task == 'hisr':
    return wald.gaussian_reduce(gt, RATIO, kernel_size=3, sigma=0.5)
  blur = scipy.ndimage.gaussian_filter(gt, (_gaussian_sigma(_MS_GNYQ),) * 2 + (0,), mode='nearest')
  return wald.decimate(blur, RATIO)


def get_demo_sensor(sensor: str) -> dict:
  """The `toolbox.SENSORS` entry demo data stand for.

  Args:
    sensor: a sensor name (`toolbox.get_sensor`), or 'pansharpening' / 'hisr' for WV3 / CAVE.

  Returns:
    The sensor's table entry.
  """
  return toolbox.get_sensor(DEMO_SENSORS.get(sensor, sensor))


def make_split(
  sensor: str,
  split: str,
  num: int,
  size: int,
  seed: int,
) -> dict[str, np.ndarray]:
  """Makes one SYNTHETIC split for a sensor.

  Args:
    sensor: the sensor the data stand for (its task, bands and guide), e.g. `config.data.sensor`;
      'pansharpening' and 'hisr' stand for WV3 and CAVE.
    split: a name mixed into the seed ('train', 'valid', 'test', ...).
    num: the number of examples.
    size: the high-resolution side (a multiple of 4).
    seed: the seed; (sensor, split, num, size, seed) fully determine the result.

  Returns:
    Role -> (num, size, size, C) float32 in [0, 1] (divided by the sensor's maximum):
    'gt', 'lms' (C bands), 'ms' (num, size/4, size/4, C), 'guide' (the sensor's guide bands:
    1 for a PAN, 3 for RGB).
  """
  info = get_demo_sensor(sensor)
  task = info['task']
  if size % RATIO:
    raise ValueError(f'size {size} is not a multiple of {RATIO}')
  bands = info['bands']
  lam = wavelengths(task, bands)
  srf = spectral_response(task, lam)
  rng = np.random.default_rng([seed, zlib.crc32(f'{task}/{split}'.encode())])
  side = max(_CANVAS, size)
  per_side = side // size
  small = size // RATIO
  out = {
    'gt': np.empty((num, size, size, bands), np.float32),
    'lms': np.empty((num, size, size, bands), np.float32),
    'ms': np.empty((num, small, small, bands), np.float32),
    'guide': np.empty((num, size, size, srf.shape[1]), np.float32),
  }
  done = 0
  while done < num:
    gt = _scene(rng, lam, side)
    ms = _degrade(task, gt)
    guide = gt @ srf
    take = min(per_side**2, num - done)
    for t in range(take):
      r, c = divmod(t, per_side)
      y, x = r * size, c * size
      out['gt'][done + t] = gt[y : y + size, x : x + size]
      out['guide'][done + t] = guide[y : y + size, x : x + size]
      out['ms'][done + t] = ms[y // RATIO : y // RATIO + small, x // RATIO : x // RATIO + small]
    # interp23tap filters every channel independently, so the patches of a canvas are
    # interpolated in one call with their bands side by side (the same result, much faster).
    patches = out['ms'][done : done + take].astype(np.float64)
    side_by_side = patches.transpose(1, 2, 0, 3).reshape(small, small, take * bands)
    up = np.asarray(toolbox.interp23tap(side_by_side, ratio=RATIO))
    out['lms'][done : done + take] = up.reshape(size, size, take, bands).transpose(2, 0, 1, 3)
    done += take
  return out


def metadata(sensor: str) -> dict:
  """Provenance recorded with exported demo data (TFDS, HDF5).

  Args:
    sensor: as for `make_split`.

  Returns:
    {'synthetic': True, 'description', 'task', 'max_value'} of the sensor.
  """
  info = get_demo_sensor(sensor)
  return {
    'synthetic': True,
    'description': 'SYNTHETIC u2net-jax demo data (not real imagery)',
    'task': info['task'],
    'max_value': float(info['max_value']),
  }


@functools.lru_cache(maxsize=8)
def _cached_split(sensor: str, split: str, num: int, size: int, seed: int) -> dict:
  return make_split(sensor, split, num, size, seed)


@sources.register('demo')
class DemoSource(sources.ArraySource):
  """The SYNTHETIC demo split of `spec.sensor`, generated in-process (cached per arguments).

  The sensor fixes bands, guide and scale (`config_utils.finalize` made the config agree with
  it); `spec.options` holds the split's 'split_kind', 'num', 'size' and 'seed'
  (`sources.spec_from_config`).
  """

  @classmethod
  def from_spec(cls, spec: sources.Spec) -> DemoSource:
    o = spec.options
    arrays = _cached_split(spec.sensor, o['split_kind'], o['num'], o['size'], o['seed'])
    return cls(arrays, max_value=spec.max_value, file='demo')
