r"""Wald's protocol for your own scenes: full-resolution PAN/MS pairs -> PanCollection files.

  python -m u2net_jax.data.prepare_pansharpening --pan P.mat --ms M.mat --sensor WV3 --out DIR

Inputs (one or more pairs, `--pan` and `--ms` in the same order): `.mat` (MATLAB v5 or v7.3),
`.h5`, `.npy`, or GeoTIFF when `rasterio` is installed; arrays as the MATLAB toolbox stores them,
PAN H x W and MS h x w x C (GeoTIFF bands first), on the sensor scale (0..2047 for 11-bit
sensors). A `.mat`/`.h5` holding several arrays is searched for `--pan-key`/`--ms-key`, else the
one 2-D (PAN) or 3-D (MS) array. A pair whose PAN is not exactly 4x the MS is refused, and
nothing is written.

Outputs in DIR (N x C x H x W float64 on the sensor scale, PanCollection keys gt/lms/ms/pan):
  train_NAME.h5, valid_NAME.h5      reduced-resolution patches (`--patch` gt side, `--stride`),
                                    split by a fixed shuffle (`--valid-fraction`)
  test_NAME_multiExm1.h5            reduced-resolution whole scenes (gt, lms, ms, pan)
  test_NAME_OrigScale_multiExm1.h5  full-resolution scenes (lms, ms, pan), no gt
NAME defaults to the lower-case sensor. Scenes of different sizes are cropped (top-left) to the
smallest common size for the two test files.

Reduction (`wald.reduce_pansharpening`): MTF-matched Gaussian per MS band and for the PAN
(`metrics.get_sensor(sensor)` gains), decimation by 4, and `lms` = `metrics.interp23tap(ms)`
computed per stored example, so every file's `lms` is exactly the interpolation of its `ms`.
Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from u2net_jax import metrics
from u2net_jax.data import DataError, pancollection, wald

RATIO = 4
_PAN_NAMES = ('I_PAN', 'PAN', 'pan', 'I_pan', 'P')
_MS_NAMES = ('I_MS_LR', 'I_MS', 'MS', 'ms', 'MS_LR', 'M')


def _mat_arrays(path: Path) -> dict[str, np.ndarray]:
  try:
    data = scipy.io.loadmat(path)
    return {k: v for k, v in data.items() if not k.startswith('__') and isinstance(v, np.ndarray)}
  except (NotImplementedError, ValueError):  # v7.3 is HDF5, column-major: reverse the axes.
    with h5py.File(path, 'r') as f:
      return {k: np.asarray(v).T for k, v in f.items() if isinstance(v, h5py.Dataset)}


def _tiff_array(path: Path) -> np.ndarray:
  try:
    import rasterio
  except ImportError as e:
    raise DataError(f'{path}: reading GeoTIFF needs `pip install rasterio`') from e
  with rasterio.open(path) as src:
    a = src.read()  # (bands, H, W)
  return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def load_array(path: str | Path, key: str | None, ndim: int) -> np.ndarray:
  """Loads the PAN (ndim 2) or MS (ndim 3) array of a file.

  Args:
    path: `.mat`, `.h5`/`.hdf5`, `.npy` or `.tif`/`.tiff`.
    key: the variable/dataset name; None to pick a known name or the only array of that rank.
    ndim: 2 for a PAN (H x W), 3 for an MS (h x w x C).

  Returns:
    The array, float64.

  Raises:
    DataError: the file or the array is missing or ambiguous.
  """
  path = Path(path)
  if not path.exists():
    raise DataError(f'{path}: file not found')
  suffix = path.suffix.lower()
  if suffix == '.npy':
    arrays = {'': np.load(path)}
  elif suffix == '.mat':
    arrays = _mat_arrays(path)
  elif suffix in ('.h5', '.hdf5'):
    with pancollection.open_h5(path) as f:
      arrays = {k: np.asarray(v) for k, v in f.items() if isinstance(v, h5py.Dataset)}
  elif suffix in ('.tif', '.tiff'):
    arrays = {'': _tiff_array(path)}
  else:
    raise DataError(f'{path}: unsupported format {suffix!r} (use .mat, .h5, .npy or .tif)')
  what = 'PAN' if ndim == 2 else 'MS'
  if key is not None:
    if key not in arrays:
      raise DataError(f'{path}: key {key!r} missing; found keys {sorted(arrays)}')
    a = arrays[key]
  else:
    a = _pick(path, arrays, ndim, _PAN_NAMES if ndim == 2 else _MS_NAMES)
  a = np.squeeze(a) if ndim == 2 and a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]) else a
  if a.ndim != ndim:
    raise DataError(f'{path}: the {what} has shape {a.shape}; expected {ndim} dimensions')
  return np.asarray(a, np.float64)


def _pick(path, arrays, ndim, names):
  if len(arrays) == 1:
    return next(iter(arrays.values()))
  for name in names:
    if name in arrays and arrays[name].ndim == ndim:
      return arrays[name]
  fits = [k for k, v in arrays.items() if v.ndim == ndim and min(v.shape[:2]) > 1]
  if len(fits) != 1:
    raise DataError(
      f'{path}: cannot tell which array is the {"PAN" if ndim == 2 else "MS"} among '
      f'{ {k: v.shape for k, v in arrays.items()} }; pass --{"pan" if ndim == 2 else "ms"}-key'
    )
  return arrays[fits[0]]


def check_pair(pan: np.ndarray, ms: np.ndarray, sensor: dict, name: str) -> None:
  """Refuses a pair that is not exactly RATIO x apart, not finite, or off the sensor scale."""
  why = wald.check_ratio(pan.shape, ms.shape, RATIO)
  if why:
    raise DataError(f'{name}: {why}')
  if ms.shape[0] % RATIO or ms.shape[1] % RATIO:
    raise DataError(
      f'{name}: the MS is {ms.shape[:2]}; its sides must divide by {RATIO} for Wald reduction'
    )
  if len(sensor['ms_gnyq']) != ms.shape[2]:
    raise DataError(
      f'{name}: the MS has {ms.shape[2]} bands; sensor {sensor["name"]} has '
      f'{len(sensor["ms_gnyq"])}'
    )
  for what, a in (('PAN', pan), ('MS', ms)):
    if not np.all(np.isfinite(a)):
      raise DataError(f'{name}: the {what} holds non-finite values')
    if a.max() > sensor['max_value'] or a.min() < 0:
      raise DataError(
        f'{name}: the {what} ranges {a.min():g}..{a.max():g}; expected 0..{sensor["max_value"]:g}'
        f' for {sensor["name"]} (wrong sensor, or not on the sensor scale?)'
      )
    if a.max() <= 1.0:
      raise DataError(
        f'{name}: the {what} is within [0, 1]; expected the sensor scale 0..'
        f'{sensor["max_value"]:g} (multiply it back by the sensor maximum)'
      )


def _patches(example: dict, patch: int, stride: int) -> list[dict]:
  """Cuts aligned patches (gt side `patch`, ms side patch/4) and interpolates `lms` per patch."""
  h, w = example['gt'].shape[:2]
  out = []
  for y in range(0, h - patch + 1, stride):
    for x in range(0, w - patch + 1, stride):
      ms = example['ms'][y // RATIO : (y + patch) // RATIO, x // RATIO : (x + patch) // RATIO]
      out.append(
        {
          'gt': example['gt'][y : y + patch, x : x + patch],
          'ms': ms,
          'lms': wald.interp23tap(ms, RATIO),
          'guide': example['guide'][y : y + patch, x : x + patch],
        }
      )
  return out


def _to_file(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  """Role dicts of H x W x C -> PanCollection datasets N x C x H x W (float64)."""
  names = {'gt': 'gt', 'lms': 'lms', 'ms': 'ms', 'guide': 'pan'}
  roles = [r for r in names if r in examples[0]]
  return {
    names[r]: np.stack([e[r] for e in examples]).transpose(0, 3, 1, 2).astype(np.float64)
    for r in roles
  }


def _crop(example: dict, side_h: int, side_w: int, ratio_of: dict) -> dict:
  """Top-left crop of every role to (side_h, side_w) on the gt/PAN grid."""
  return {k: v[: side_h // ratio_of[k], : side_w // ratio_of[k]] for k, v in example.items()}


def prepare(
  pans: Sequence[str],
  mss: Sequence[str],
  sensor: str,
  out: str,
  *,
  name: str | None = None,
  pan_key: str | None = None,
  ms_key: str | None = None,
  patch: int = 64,
  stride: int = 32,
  valid_fraction: float = 0.1,
  seed: int = 0,
  outputs: Sequence[str] = ('train', 'valid', 'test', 'full'),
) -> dict[str, Path]:
  """Makes PanCollection-layout files from full-resolution pairs.

  Args:
    pans, mss: the PAN and MS files, paired in order.
    sensor: a `metrics.get_sensor` name (its MTF gains and maximum are used).
    out: the output folder.
    name: file-name tag (default: the sensor in lower case).
    pan_key, ms_key: array names inside `.mat`/`.h5` inputs.
    patch: gt/PAN side of the training patches (multiple of 4).
    stride: their stride on the gt grid (multiple of 4, so the MS patches stay aligned).
    valid_fraction: share of the patches put in the validation file (fixed shuffle, `seed`).
    seed: the seed of that shuffle.
    outputs: which of 'train', 'valid', 'test' (reduced), 'full' to write.

  Returns:
    Output kind -> written path.

  Raises:
    DataError: a pair is refused (nothing is written).
  """
  if len(pans) != len(mss):
    raise DataError(f'{len(pans)} PAN files but {len(mss)} MS files; give them in pairs')
  if patch % RATIO or stride % RATIO:
    raise DataError(f'--patch {patch} and --stride {stride} must be multiples of {RATIO}')
  info = metrics.get_sensor(sensor)
  name = name or info['name'].lower()
  pairs = []
  for p, m in zip(pans, mss, strict=True):
    pan, ms = load_array(p, pan_key, 2), load_array(m, ms_key, 3)
    check_pair(pan, ms, info, f'{p} + {m}')
    pairs.append((pan, ms))
  # Everything is computed before anything is written, so a refusal leaves no file behind.
  reduced = [wald.reduce_pansharpening(pan, ms, sensor, RATIO) for pan, ms in pairs]
  files = {}
  if {'train', 'valid'} & set(outputs):
    patches = [q for r in reduced for q in _patches(r, patch, stride)]
    if len(patches) < 2:
      raise DataError(
        f'{len(patches)} patch(es) of {patch}x{patch} at stride {stride} from reduced scenes of '
        f'{[r["gt"].shape[:2] for r in reduced]}; use a smaller --patch/--stride'
      )
    order = np.random.default_rng(seed).permutation(len(patches))
    n_valid = max(1, int(round(valid_fraction * len(patches))))
    files['train'] = _to_file([patches[i] for i in order[:-n_valid]])
    files['valid'] = _to_file([patches[i] for i in order[-n_valid:]])
  if 'test' in outputs:
    h = min(r['gt'].shape[0] for r in reduced) // RATIO * RATIO
    w = min(r['gt'].shape[1] for r in reduced) // RATIO * RATIO
    crops = [_crop(r, h, w, {'gt': 1, 'lms': 1, 'guide': 1, 'ms': RATIO}) for r in reduced]
    for c in crops:
      c['lms'] = wald.interp23tap(c['ms'], RATIO)
    files['test'] = _to_file(crops)
  if 'full' in outputs:
    h = min(pan.shape[0] for pan, _ in pairs)
    w = min(pan.shape[1] for pan, _ in pairs)
    full = [wald.full_resolution(pan, ms, RATIO) for pan, ms in pairs]
    full = [_crop(f, h, w, {'lms': 1, 'guide': 1, 'ms': RATIO}) for f in full]
    for f in full:
      f['lms'] = wald.interp23tap(f['ms'], RATIO)
    files['full'] = _to_file(full)
  paths = {
    'train': f'train_{name}.h5',
    'valid': f'valid_{name}.h5',
    'test': f'test_{name}_multiExm1.h5',
    'full': f'test_{name}_OrigScale_multiExm1.h5',
  }
  attrs = {
    'sensor': info['name'],
    'max_value': float(info['max_value']),
    'protocol': "Wald's protocol: MTF-matched Gaussian, decimation by 4 (offset 2), interp23tap",
    'sources': ';'.join(f'{p}+{m}' for p, m in zip(pans, mss, strict=True)),
  }
  written = {}
  for kind in ('train', 'valid', 'test', 'full'):
    if kind in files and kind in outputs:
      path = Path(out) / paths[kind]
      pancollection.write_h5(path, files[kind], attrs=attrs)
      written[kind] = path
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pan', nargs='+', required=True, help='full-resolution PAN file(s)')
  parser.add_argument('--ms', nargs='+', required=True, help='MS file(s), paired with --pan')
  parser.add_argument('--sensor', required=True, help='WV3 | WV2 | QB | GF2 | IKONOS | GeoEye1')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--name', default=None, help='file-name tag (default: the sensor)')
  parser.add_argument('--pan-key', default=None)
  parser.add_argument('--ms-key', default=None)
  parser.add_argument('--patch', type=int, default=64, help='training patch side (PAN grid)')
  parser.add_argument('--stride', type=int, default=32, help='patch stride (PAN grid)')
  parser.add_argument('--valid-fraction', type=float, default=0.1)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--outputs', default='train,valid,test,full', help='comma list of train,valid,test,full'
  )
  args = parser.parse_args(argv)
  try:
    written = prepare(
      args.pan,
      args.ms,
      args.sensor,
      args.out,
      name=args.name,
      pan_key=args.pan_key,
      ms_key=args.ms_key,
      patch=args.patch,
      stride=args.stride,
      valid_fraction=args.valid_fraction,
      seed=args.seed,
      outputs=args.outputs.split(','),
    )
  except DataError as e:
    print(f'error: {e} (nothing written)', file=sys.stderr)
    return 2
  for kind, path in written.items():
    with h5py.File(path, 'r') as f:
      shapes = {k: f[k].shape for k in f}
    print(f'{kind}: {path} {shapes}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
