r"""Wald's protocol for your own scenes: full-resolution PAN/MS pairs -> PanCollection files.

  python -m u2net_jax.data.prepare_pansharpening --pan P.mat --ms M.mat --sensor WV3 --out DIR

Inputs (one or more pairs: repeat `--pan` and `--ms`, in the same order): `.mat` (MATLAB v5 or
v7.3), `.h5`, `.npy`, or GeoTIFF (through rasterio); arrays as the MATLAB toolbox
stores them, PAN H x W and MS h x w x C (GeoTIFF bands first), on the sensor scale (0..2047 for
11-bit sensors). A `.mat`/`.h5` holding several arrays is searched for `--pan-key`/`--ms-key`,
else the one 2-D (PAN) or 3-D (MS) array. A pair whose PAN is not exactly 4x the MS is refused,
and nothing is written.

Outputs in DIR (N x C x H x W float64 on the sensor scale, PanCollection keys gt/lms/ms/pan):
  train_NAME.h5, valid_NAME.h5      reduced-resolution patches (`--patch` gt side, `--stride`),
                                    split by a fixed shuffle (`--valid-fraction`)
  test_NAME_multiExm1.h5            reduced-resolution whole scenes (gt, lms, ms, pan)
  test_NAME_OrigScale_multiExm1.h5  full-resolution scenes (lms, ms, pan), no gt
NAME defaults to the lower-case sensor. Scenes of different sizes are cropped (top-left) to the
smallest common size for the two test files.

Reduction (`wald.reduce_pansharpening`): MTF-matched Gaussian per MS band and for the PAN
(`toolbox.get_sensor(sensor)` gains), decimation by 4, and `lms` = `toolbox.interp23tap(ms)`
computed per stored example, so every file's `lms` is exactly the interpolation of its `ms`.

Memory is one scene: the pairs are checked first, then loaded again one at a time and their
patches streamed through `pancollection.H5Writer` into temporary files, renamed together when all
are complete (removed on any failure). Flags are absl flags (`--pan-key`, `--ms-key` and
`--valid-fraction` are aliases of the underscored names).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
from absl import flags

from u2net_jax import toolbox
from u2net_jax.data import (
  H5_KEYS,
  DataError,
  check_arguments,
  load_npy,
  matfile,
  pancollection,
  run_command,
  wald,
)

RATIO = toolbox.get_sensor('WV3')['ratio']  # Every pansharpening sensor of the table: 4.
_PAN_NAMES = ('I_PAN', 'PAN', 'pan', 'I_pan', 'P')
_MS_NAMES = ('I_MS_LR', 'I_MS', 'MS', 'ms', 'MS_LR', 'M')


def _tiff_array(path: Path) -> np.ndarray:
  try:
    import rasterio
  except ImportError as e:
    raise DataError(f'{path}: reading GeoTIFF needs `pip install rasterio`') from e
  try:
    with rasterio.open(path) as src:
      a = src.read()  # (bands, H, W)
  except rasterio.errors.RasterioError as e:  # Not a TIFF, truncated, a corrupt block.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f'{path}: not a readable GeoTIFF ({first})') from e
  return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def _single(a: np.ndarray) -> np.ndarray:
  """A PanCollection one-image dataset (1, C, H, W) -> (H, W, C), or (H, W) when C is 1."""
  if a.ndim == 4 and a.shape[0] == 1:
    a = a[0].transpose(1, 2, 0)
    return a[..., 0] if a.shape[2] == 1 else a
  return a


def load_array(path: str | Path, key: str | None, ndim: int, dtype=np.float64) -> np.ndarray:
  """Loads the PAN (ndim 2) or MS (ndim 3) array of a file.

  Args:
    path: `.mat`, `.h5`/`.hdf5` (also a PanCollection file of one image), `.npy` or
      `.tif`/`.tiff`.
    key: the variable/dataset name; None to pick a known name or the only array of that rank.
    ndim: 2 for a PAN (H x W), 3 for an MS (h x w x C).
    dtype: the returned dtype; None keeps the file's.

  Returns:
    The array.

  Raises:
    DataError: the file or the array is missing or ambiguous.
  """
  path = Path(path)
  if not path.exists():
    raise DataError(f'{path}: file not found')
  if path.is_dir():
    raise DataError(f'{path}: is a folder; expected a .mat, .h5, .npy or .tif file')
  suffix = path.suffix.lower()
  if suffix == '.npy':
    arrays = {'': load_npy(path)}
  elif suffix == '.mat':
    arrays = matfile.mat_arrays(path)
  elif suffix in ('.h5', '.hdf5'):
    with pancollection.open_h5(path) as f:
      arrays = {k: _single(np.asarray(v)) for k, v in f.items() if isinstance(v, h5py.Dataset)}
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
  if a.size == 0 or np.asarray(a).dtype.kind not in 'biuf':
    raise DataError(f'{path}: the {what} is empty or not numeric ({a.shape}, {a.dtype})')
  return np.asarray(a, dtype)


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
      f'{ {k: v.shape for k, v in arrays.items()} }; pass --{"pan" if ndim == 2 else "ms"}_key'
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


KEYS = H5_KEYS['pancollection']
OUTPUTS = ('train', 'valid', 'test', 'full')


def _file_names(name: str) -> dict[str, str]:
  return {
    'train': f'train_{name}.h5',
    'valid': f'valid_{name}.h5',
    'test': f'test_{name}_multiExm1.h5',
    'full': f'test_{name}_OrigScale_multiExm1.h5',
  }


def _corners(side: int, patch: int, stride: int) -> range:
  """Patch starts along one side of a reduced scene (gt grid)."""
  return range(0, side - patch + 1, stride)


def _patches(example: dict, patch: int, stride: int) -> Iterator[dict]:
  """Aligned patches (gt side `patch`, ms side patch/4), `lms` interpolated per patch, in order."""
  h, w = example['gt'].shape[:2]
  for y in _corners(h, patch, stride):
    for x in _corners(w, patch, stride):
      ms = example['ms'][y // RATIO : (y + patch) // RATIO, x // RATIO : (x + patch) // RATIO]
      yield {
        'gt': example['gt'][y : y + patch, x : x + patch],
        'ms': ms,
        'lms': toolbox.interp23tap(ms, RATIO),
        'guide': example['guide'][y : y + patch, x : x + patch],
      }


def _crop(example: dict, side_h: int, side_w: int) -> dict:
  """Top-left crop of every role to (side_h, side_w) on the gt/PAN grid; `lms` recomputed."""
  out = {}
  for k, v in example.items():
    ratio = RATIO if k == 'ms' else 1
    out[k] = v[: side_h // ratio, : side_w // ratio]
  out['lms'] = toolbox.interp23tap(out['ms'], RATIO)
  return out


def _shapes(n: int, h: int, w: int, bands: int, gt: bool = True) -> dict[str, tuple[int, ...]]:
  """PanCollection dataset name -> (N, C, H, W) for `n` examples of gt/PAN size h x w."""
  shapes = {
    'gt': (n, bands, h, w),
    'lms': (n, bands, h, w),
    'ms': (n, bands, h // RATIO, w // RATIO),
    'pan': (n, 1, h, w),
  }
  if not gt:
    del shapes['gt']
  return shapes


def _sensor(sensor: str) -> dict:
  try:
    info = toolbox.get_sensor(sensor)
  except ValueError as e:
    raise DataError(str(e)) from e
  if info['task'] != 'pansharpening':
    raise DataError(
      f'sensor {info["name"]} is a hyperspectral dataset; use `python -m '
      'u2net_jax.data.prepare_cave` for it'
    )
  return info


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
  outputs: Sequence[str] = OUTPUTS,
) -> dict[str, Path]:
  """Makes PanCollection-layout files from full-resolution pairs, one scene in memory at a time.

  Every pair is loaded and checked first (a refusal writes nothing); then each pair is loaded
  again, reduced, and its patches and test examples are streamed into the files
  (`pancollection.H5Writer`), which appear together when all are complete.

  Args:
    pans, mss: the PAN and MS files, paired in order.
    sensor: a `toolbox.get_sensor` pansharpening sensor (its MTF gains and maximum are used).
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
  check_arguments([
    ('patch', patch, patch > 0 and patch % RATIO == 0, f'a positive multiple of {RATIO}'),
    ('stride', stride, stride > 0 and stride % RATIO == 0, f'a positive multiple of {RATIO}'),
    ('valid_fraction', valid_fraction, 0 < valid_fraction < 1, 'strictly between 0 and 1'),
    ('outputs', list(outputs), bool(outputs), f'some of {list(OUTPUTS)}'),
  ])  # fmt: skip
  unknown = sorted(set(outputs) - set(OUTPUTS))
  if unknown:
    raise DataError(f'unknown outputs {unknown}; expected some of {list(OUTPUTS)}')
  info = _sensor(sensor)
  name = name or info['name'].lower()
  pairs = list(zip(pans, mss, strict=True))

  def load(p, m):
    return load_array(p, pan_key, 2), load_array(m, ms_key, 3)

  # Pass 1: check every pair, keeping only the shapes.
  shapes = []
  for p, m in pairs:
    pan, ms = load(p, m)
    check_pair(pan, ms, info, f'{p} + {m}')
    shapes.append((pan.shape, ms.shape))
    del pan, ms
  bands = shapes[0][1][2]
  # The reduced scenes are the size of the MS: patch k (scene by scene, row-major) goes to the
  # training or the validation file through a fixed shuffle.
  counts = [
    len(_corners(s[0], patch, stride)) * len(_corners(s[1], patch, stride)) for _, s in shapes
  ]
  total = sum(counts)
  sizes = {}
  where = np.zeros((0, 2), np.int64)  # Patch -> (0 train / 1 valid, row).
  if {'train', 'valid'} & set(outputs):
    if total < 2:
      raise DataError(
        f'{total} patch(es) of {patch}x{patch} at stride {stride} from reduced scenes of '
        f'{[s[:2] for _, s in shapes]}; use a smaller --patch/--stride'
      )
    order = np.random.default_rng(seed).permutation(total)
    n_valid = max(1, int(round(valid_fraction * total)))
    n_train = total - n_valid
    rank = np.empty(total, np.int64)
    rank[order] = np.arange(total)
    where = np.stack([rank >= n_train, np.where(rank < n_train, rank, rank - n_train)], axis=1)
    sizes['train'] = _shapes(n_train, patch, patch, bands)
    sizes['valid'] = _shapes(n_valid, patch, patch, bands)
  test_h = min(s[0] for _, s in shapes) // RATIO * RATIO
  test_w = min(s[1] for _, s in shapes) // RATIO * RATIO
  sizes['test'] = _shapes(len(pairs), test_h, test_w, bands)
  full_h = min(s[0] for s, _ in shapes)
  full_w = min(s[1] for s, _ in shapes)
  sizes['full'] = _shapes(len(pairs), full_h, full_w, bands, gt=False)
  kinds = [k for k in OUTPUTS if k in outputs]
  attrs = {
    'sensor': info['name'],
    'max_value': float(info['max_value']),
    'protocol': "Wald's protocol: MTF-matched Gaussian, decimation by 4 (offset 2), interp23tap",
    'sources': ';'.join(f'{p}+{m}' for p, m in pairs),
  }
  out_dir = Path(out)
  paths = {k: out_dir / _file_names(name)[k] for k in kinds}
  made_dir = not out_dir.exists()
  # Pass 2: one pair at a time, streamed into every file.
  try:
    with contextlib.ExitStack() as stack:
      writers = {
        k: stack.enter_context(
          pancollection.H5Writer(paths[k], sizes[k], np.float64, attrs=attrs, check_values=True)
        )
        for k in kinds
      }
      k = 0
      for i, (p, m) in enumerate(pairs):
        pan, ms = load(p, m)
        if {'train', 'valid', 'test'} & set(kinds):
          reduced = wald.reduce_pansharpening(pan, ms, sensor, RATIO)
          for example in _patches(reduced, patch, stride) if len(where) else ():
            kind = ('train', 'valid')[where[k, 0]]
            if kind in writers:
              writers[kind].put(int(where[k, 1]), pancollection.to_file_layout(example, KEYS))
            k += 1
          if 'test' in writers:
            crop = _crop(reduced, test_h, test_w)
            writers['test'].put(i, pancollection.to_file_layout(crop, KEYS))
        if 'full' in writers:
          crop = _crop(wald.full_resolution(pan, ms, RATIO), full_h, full_w)
          writers['full'].put(i, pancollection.to_file_layout(crop, KEYS))
      for w in writers.values():  # Every file complete before any is renamed.
        w.close()
  except BaseException:
    if made_dir and out_dir.exists() and not any(out_dir.iterdir()):
      out_dir.rmdir()
    raise
  return paths


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags (on `flag_values`); `main` and `__main__` use them."""
  fv = {'flag_values': flag_values}
  flags.DEFINE_multi_string('pan', None, 'full-resolution PAN file (repeat for several)', **fv)
  flags.DEFINE_multi_string('ms', None, 'MS file, paired in order with --pan (repeat)', **fv)
  flags.DEFINE_string('sensor', None, 'WV3 | WV2 | QB | GF2 | IKONOS | GeoEye1', **fv)
  flags.DEFINE_string('out', None, 'output folder', **fv)
  flags.DEFINE_string('name', None, 'file-name tag (default: the sensor)', **fv)
  flags.DEFINE_string('pan_key', None, 'PAN array name inside .mat/.h5 inputs', **fv)
  flags.DEFINE_string('ms_key', None, 'MS array name inside .mat/.h5 inputs', **fv)
  flags.DEFINE_integer('patch', 64, 'training patch side (PAN grid)', **fv)
  flags.DEFINE_integer('stride', 32, 'patch stride (PAN grid)', **fv)
  flags.DEFINE_float('valid_fraction', 0.1, 'share of the patches for validation', **fv)
  flags.DEFINE_integer('seed', 0, 'patch shuffle seed', **fv)
  flags.DEFINE_list('outputs', list(OUTPUTS), 'comma list of train,valid,test,full', **fv)
  for name in ('pan_key', 'ms_key', 'valid_fraction'):  # The dashed spellings too.
    flags.DEFINE_alias(name.replace('_', '-'), name, **fv)
  for name in ('pan', 'ms', 'sensor', 'out'):
    flags.mark_flag_as_required(name, **fv)


def run(fv: flags.FlagValues) -> int:
  """Prepares the files from parsed flags; prints the written files.

  Returns:
    0, or 2 when a pair is refused (nothing is written).
  """
  try:
    written = prepare(
      fv.pan,
      fv.ms,
      fv.sensor,
      fv.out,
      name=fv.name,
      pan_key=fv.pan_key,
      ms_key=fv.ms_key,
      patch=fv.patch,
      stride=fv.stride,
      valid_fraction=fv.valid_fraction,
      seed=fv.seed,
      outputs=fv.outputs,
    )
  except DataError as e:
    print(f'error: {e} (nothing written)', file=sys.stderr)
    return 2
  for kind, path in written.items():
    with h5py.File(path, 'r') as f:
      shapes = {k: f[k].shape for k in f}
    print(f'{kind}: {path} {shapes}')
  return 0


def main(argv: Sequence[str]) -> int:
  """Runs the command line `argv` (flags only, no program name), e.g. from a notebook or a test.

  Returns:
    0, or 2 when a pair is refused.
  """
  return run_command('prepare_pansharpening', define_flags, run, argv)


if __name__ == '__main__':
  run_command('prepare_pansharpening', define_flags, run)
