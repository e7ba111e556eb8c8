r"""CAVE (and Harvard) scenes -> HISR files in the Deng-lab layout (GT, HSI_up, LRHSI, RGB).

  python -m u2net_jax.data.prepare_cave --src CAVE_DIR --srf SRF --out DIR

CAVE input: one folder per scene (e.g. `balloons_ms/`, possibly nested as CAVE ships it) holding
31 16-bit PNG bands, 400..700 nm in 10 nm steps (sorted by file name); values are divided by
65535 (8-bit PNGs by 255) to [0, 1]. Harvard input (`--format harvard`): one `.mat` per scene
with the cube in `ref` (H x W x 31, 420..720 nm), divided by its own maximum and cropped
top-left to `--crop` (default 1000) pixels.

SRF: the 31 x 3 camera spectral response (the Nikon D700 response the literature uses, e.g.
MHF-net's `response coefficient.mat` key `R`), as `.mat` (key `R`, or the only 31 x 3 array),
`.npy` or `.csv` (31 rows, 3 columns; a 3 x 31 array is transposed).

Split (fixed and documented): CAVE's 32 scenes minus `watercolors` (the paper uses 31) give 20
training and 11 test scenes; the test scenes are `CAVE_TEST_SCENES` (the last 11 in alphabetical
order; the paper does not list its split). Harvard: the last `HARVARD_NUM_TEST` scenes by name.
`--test-scenes a,b,...` overrides either (names without the `_ms` suffix).

Simulation (Wald's protocol, `wald.reduce_hisr`): LR-HSI = Gaussian blur (`--kernel-size` 3,
`--sigma` 0.5, replicate borders) then decimation by 4 keeping pixels 2, 6, 10, ...; HSI_up =
`toolbox.interp23tap(LR-HSI)`; RGB = HSI @ SRF at full resolution.

Training patches (the paper: 3,920 overlapping 64 x 64 patches from the 20 training scenes, 80%
training and 20% validation): a `--grid` 14 x 14 grid of `--patch` 64 patches at `--stride` 32
centred in each 512 x 512 scene (offset 16: rows 16, 48, ..., 432), i.e. 196 patches per scene and
20 x 196 = 3,920. A stride of 32 (not the 34 that would spread 14 patches over the whole scene)
keeps every patch aligned with the decimation grid (32 / 4 = 8 LR pixels), so LR patches are cut
from the LR scene rather than simulated per patch. The patches are shuffled with a fixed seed
(`--seed` 0) and the first 80% (3,136) go to `train_NAME.h5`, the rest (784) to
`valid_NAME.h5`. The 11 test scenes are stored whole (512 x 512) in `test_NAME.h5`. Each
patch's HSI_up is interpolated from its own LR patch.

Files are N x C x H x W float32 in [0, 1], streamed scene by scene through
`pancollection.H5Writer` (temporary files, renamed when all three are complete; removed on any
failure); nothing is written when the input is refused. Flags are absl flags; the dashed
spellings `--test-scenes`, `--valid-fraction` and `--kernel-size` are aliases of the underscored
ones.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from absl import flags
from PIL import Image
from scipy.io.matlab import MatReadError

from u2net_jax import toolbox
from u2net_jax.data import (
  H5_KEYS,
  DataError,
  check_arguments,
  load_npy,
  pancollection,
  run_command,
  wald,
)

RATIO = toolbox.get_sensor('CAVE')['ratio']
BANDS = 31
KEYS = H5_KEYS['hisr']
CAVE_EXCLUDED = ('watercolors',)
CAVE_TEST_SCENES = (
  'jelly_beans',
  'oil_painting',
  'paints',
  'photo_and_face',
  'pompoms',
  'real_and_fake_apples',
  'real_and_fake_peppers',
  'sponges',
  'stuffed_toys',
  'superballs',
  'thread_spools',
)
HARVARD_NUM_TEST = 10


def scene_name(path: Path) -> str:
  """'balloons_ms' -> 'balloons' (CAVE folders carry an `_ms` suffix)."""
  name = path.stem if path.is_file() else path.name
  return name[:-3] if name.endswith('_ms') else name


def load_srf(path: str | Path, bands: int = BANDS) -> np.ndarray:
  """Loads a (bands, c) spectral response from `.mat`, `.npy` or `.csv`.

  Args:
    path: the file.
    bands: the number of spectral bands (rows).

  Returns:
    (bands, c) float64.

  Raises:
    DataError: missing file, unknown format, or no array of the right shape.
  """
  path = Path(path)
  if not path.exists():
    raise DataError(f'{path}: SRF file not found')
  if path.is_dir():
    raise DataError(f'{path}: SRF is a folder; expected a .mat, .npy or .csv file')
  suffix = path.suffix.lower()
  if suffix == '.mat':
    data = {k: v for k, v in _loadmat(path).items() if not k.startswith('__')}
    if 'R' in data:
      srf = data['R']
    else:
      fits = [v for v in data.values() if np.ndim(v) == 2 and bands in np.shape(v)]
      if len(fits) != 1:
        raise DataError(
          f'{path}: no key R and not exactly one {bands} x c array; keys {list(data)}'
        )
      srf = fits[0]
  elif suffix == '.npy':
    srf = load_npy(path)
  elif suffix == '.csv':
    try:
      srf = np.loadtxt(path, delimiter=',', ndmin=2)
    except ValueError:
      try:
        srf = np.loadtxt(path, delimiter=',', skiprows=1, ndmin=2)  # A header line.
      except ValueError as e:
        raise DataError(f'{path}: not a CSV of numbers ({e})') from e
  else:
    raise DataError(f'{path}: unsupported SRF format {suffix!r} (use .mat, .npy or .csv)')
  try:
    srf = np.asarray(srf, np.float64)
  except (TypeError, ValueError) as e:
    raise DataError(f'{path}: the SRF is not numeric ({e})') from e
  if srf.ndim == 2 and srf.shape[0] != bands and srf.shape[1] == bands:
    srf = srf.T
  if srf.ndim != 2 or srf.shape[0] != bands:
    raise DataError(f'{path}: SRF has shape {srf.shape}; expected ({bands}, c)')
  if not np.all(np.isfinite(srf)):
    raise DataError(f'{path}: SRF holds non-finite values')
  if not np.all(np.abs(srf).sum(axis=0) > 0):
    raise DataError(f'{path}: an SRF column is all zeros (a channel would be black)')
  return srf


def _loadmat(path: Path) -> dict:
  try:
    return scipy.io.loadmat(path)
  except (ValueError, OSError, TypeError, NotImplementedError, EOFError, MatReadError) as e:
    raise DataError(f'{path}: not a readable MATLAB file ({type(e).__name__}: {e})') from e


def _read_png(path: Path) -> np.ndarray:
  try:
    with Image.open(path) as im:
      a = np.asarray(im)
  except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated or not an image.
    raise DataError(f'{path}: unreadable PNG band ({e})') from e
  if a.ndim not in (2, 3) or a.dtype.kind not in 'iu':
    raise DataError(f'{path}: PNG band of shape {a.shape} and type {a.dtype}; expected integers')
  if a.ndim == 3:  # A few CAVE bands are stored as RGB(A) PNGs with equal channels.
    a = a[..., 0]
  full = 65535.0 if a.dtype == np.uint16 or a.max() > 255 else 255.0
  return a.astype(np.float64) / full


def load_cave_scene(folder: Path, bands: int = BANDS) -> np.ndarray:
  """Reads one CAVE scene folder -> (H, W, bands) float64 in [0, 1]."""
  pngs = sorted(folder.rglob('*.png'), key=lambda p: p.name)
  if len(pngs) != bands:
    raise DataError(f'{folder}: found {len(pngs)} PNG bands; expected {bands}')
  cube = np.stack([_read_png(p) for p in pngs], axis=-1)
  return cube


def load_harvard_scene(path: Path, crop: int) -> np.ndarray:
  """Reads one Harvard `.mat` (`ref`) -> (crop, crop, 31) divided by its maximum."""
  data = _loadmat(path)
  if 'ref' not in data:
    raise DataError(f'{path}: key ref missing; found keys {[k for k in data if k[0] != "_"]}')
  cube = np.asarray(data['ref'], np.float64)[:crop, :crop]
  if cube.shape[:2] != (crop, crop):
    raise DataError(f'{path}: ref has shape {data["ref"].shape}; expected at least {crop}x{crop}')
  return cube / max(float(cube.max()), 1e-12)


def list_scenes(src: Path, fmt: str) -> list[Path]:
  """Scene folders (CAVE) or files (Harvard) under `src`, sorted by name."""
  if not src.is_dir():
    raise DataError(f'{src}: source folder not found')
  if fmt == 'cave':
    scenes = [p for p in src.iterdir() if p.is_dir() and scene_name(p) not in CAVE_EXCLUDED]
  else:
    scenes = [p for p in src.iterdir() if p.suffix.lower() == '.mat']
  if not scenes:
    raise DataError(f'{src}: no scenes found (format {fmt})')
  return sorted(scenes, key=scene_name)


def grid_positions(side_h: int, side_w: int, patch: int, stride: int, grid: int | None):
  """Top-left corners of the patch grid, centred, on multiples of RATIO.

  Args:
    side_h, side_w: the scene size.
    patch, stride: patch side and stride (multiples of RATIO).
    grid: positions per axis; None for as many as fit.

  Returns:
    A list of (y, x).
  """
  out = []
  axes = []
  for side in (side_h, side_w):
    fit = (side - patch) // stride + 1
    n = fit if grid is None else grid
    if n < 1 or n > fit:
      raise DataError(
        f'a {n}-position grid of {patch}-pixel patches at stride {stride} needs '
        f'{(n - 1) * stride + patch} pixels; the scene has {side} (change --grid/--stride/--patch)'
      )
    offset = (side - ((n - 1) * stride + patch)) // 2 // RATIO * RATIO
    axes.append([offset + i * stride for i in range(n)])
  for y in axes[0]:
    for x in axes[1]:
      out.append((y, x))
  return out


def _shapes(n: int, size: int, bands: int, guide_bands: int) -> dict[str, tuple[int, ...]]:
  """Dataset name -> (N, C, H, W) of a file of `n` examples whose gt side is `size`."""
  small = size // RATIO
  return {
    KEYS['gt']: (n, bands, size, size),
    KEYS['lms']: (n, bands, size, size),
    KEYS['ms']: (n, bands, small, small),
    KEYS['guide']: (n, guide_bands, size, size),
  }


def prepare(
  src: str,
  srf: str,
  out: str,
  *,
  fmt: str = 'cave',
  name: str | None = None,
  test_scenes: Sequence[str] | None = None,
  patch: int = 64,
  stride: int = 32,
  grid: int | None = 14,
  valid_fraction: float = 0.2,
  kernel_size: int = 3,
  sigma: float = 0.5,
  crop: int = 1000,
  seed: int = 0,
) -> dict[str, Path]:
  """Makes the training, validation and test files from raw scenes.

  Args:
    src: the scene folder.
    srf: the spectral response file.
    out: the output folder.
    fmt: 'cave' (PNG folders) or 'harvard' (`.mat` files).
    name: file-name tag (default: `fmt`).
    test_scenes: test scene names; default `CAVE_TEST_SCENES` / the last `HARVARD_NUM_TEST`.
    patch, stride, grid: the training patch grid (see `grid_positions`).
    valid_fraction: share of the patches for validation (fixed shuffle with `seed`).
    kernel_size, sigma: the Gaussian blur of Wald's protocol.
    crop: Harvard crop side.
    seed: the patch shuffle seed.

  Returns:
    'train' / 'valid' / 'test' -> written path.

  Raises:
    DataError: missing or malformed input (nothing is written).
  """
  check_arguments([
    ('format', fmt, fmt in ('cave', 'harvard'), "'cave' or 'harvard'"),
    ('patch', patch, patch > 0 and patch % RATIO == 0, f'a positive multiple of {RATIO}'),
    ('stride', stride, stride > 0 and stride % RATIO == 0, f'a positive multiple of {RATIO}'),
    ('grid', grid, grid is None or grid > 0, 'positive (0: as many as fit)'),
    ('valid_fraction', valid_fraction, 0 < valid_fraction < 1, 'strictly between 0 and 1'),
    ('kernel_size', kernel_size, kernel_size > 0 and kernel_size % 2 == 1, 'a positive odd size'),
    ('sigma', sigma, math.isfinite(sigma) and sigma > 0, 'a positive number'),
    ('crop', crop, crop > 0 and crop % RATIO == 0, f'a positive multiple of {RATIO}'),
  ])  # fmt: skip
  name = name or fmt
  response = load_srf(srf)
  scenes = list_scenes(Path(src), fmt)
  names = [scene_name(s) for s in scenes]
  if test_scenes is None:
    test_scenes = CAVE_TEST_SCENES if fmt == 'cave' else names[-HARVARD_NUM_TEST:]
  missing = sorted(set(test_scenes) - set(names))
  if missing:
    raise DataError(f'{src}: test scenes {missing} not found among {names}')
  train = [s for s, n in zip(scenes, names, strict=True) if n not in test_scenes]
  test = [s for s, n in zip(scenes, names, strict=True) if n in test_scenes]
  if not train or not test:
    raise DataError(f'{src}: {len(train)} training and {len(test)} test scenes; need both')

  def load(s):
    cube = load_cave_scene(s) if fmt == 'cave' else load_harvard_scene(s, crop)
    if cube.shape[0] % RATIO or cube.shape[1] % RATIO:
      raise DataError(f'{s}: scene is {cube.shape[:2]}; sides must divide by {RATIO}')
    return cube

  def reduce(cube):
    return wald.reduce_hisr(cube, response, RATIO, kernel_size, sigma)

  # Cheap checks of every scene before anything is written (a late failure still removes the
  # temporary files). Scenes are then loaded one at a time: memory is one scene and its patches.
  if fmt == 'cave':
    for s in scenes:
      count = len(list(s.rglob('*.png')))
      if count != BANDS:
        raise DataError(f'{s}: found {count} PNG bands; expected {BANDS}')
  first = load(train[0]).shape
  positions = grid_positions(first[0], first[1], patch, stride, grid)
  slots = [(si, p) for si in range(len(train)) for p in positions]
  order = np.random.default_rng(seed).permutation(len(slots))
  n_valid = int(round(valid_fraction * len(slots)))
  if not 0 < n_valid < len(slots):
    raise DataError(
      f'--valid_fraction={valid_fraction} of {len(slots)} patches leaves '
      f'{len(slots) - n_valid} for training and {n_valid} for validation; both need some'
    )
  where = {}  # Slot -> (file, row).
  for rank, k in enumerate(order):
    where[int(k)] = (
      ('train', rank) if rank < len(slots) - n_valid else ('valid', rank - (len(slots) - n_valid))
    )
  test_shapes = [load(s).shape for s in test]
  if len(set(test_shapes)) != 1:
    sizes = {scene_name(s): c[:2] for s, c in zip(test, test_shapes, strict=True)}
    raise DataError(f'test scenes differ in size: {sizes}')
  if test_shapes[0][0] != test_shapes[0][1]:
    raise DataError(f'test scenes are {test_shapes[0][:2]}; expected square scenes')
  out_dir = Path(out)
  made_dir = not out_dir.exists()
  out_dir.mkdir(parents=True, exist_ok=True)
  attrs = {
    'format': fmt,
    'protocol': f'gaussian blur {kernel_size}x{kernel_size} sigma {sigma}, decimation by {RATIO} '
    '(offset 2), HSI_up = interp23tap, RGB = GT @ SRF',
    'srf': str(srf),
    'train_scenes': ','.join(scene_name(s) for s in train),
    'test_scenes': ','.join(scene_name(s) for s in test),
  }
  c = response.shape[1]
  paths = {k: out_dir / f'{k}_{name}.h5' for k in ('train', 'valid', 'test')}
  sizes = {
    'train': (len(slots) - n_valid, patch),
    'valid': (n_valid, patch),
    'test': (len(test), test_shapes[0][0]),
  }
  try:
    with contextlib.ExitStack() as stack:
      writers = {
        k: stack.enter_context(
          pancollection.H5Writer(
            paths[k], _shapes(n, size, BANDS, c), np.float32, attrs=attrs, check_values=True
          )
        )
        for k, (n, size) in sizes.items()
      }
      for si, s in enumerate(train):
        cube = load(s)
        if cube.shape != first:
          raise DataError(f'{s}: scene is {cube.shape}; expected {first} like {train[0]}')
        full = reduce(cube)
        for pi, (y, x) in enumerate(positions):
          ms = full['ms'][y // RATIO : (y + patch) // RATIO, x // RATIO : (x + patch) // RATIO]
          example = {
            'gt': full['gt'][y : y + patch, x : x + patch],
            'ms': ms,
            'lms': toolbox.interp23tap(ms, RATIO),
            'guide': full['guide'][y : y + patch, x : x + patch],
          }
          kind, row = where[si * len(positions) + pi]
          writers[kind].put(row, pancollection.to_file_layout(example, KEYS))
      for i, s in enumerate(test):
        writers['test'].put(i, pancollection.to_file_layout(reduce(load(s)), KEYS))
      for w in writers.values():  # Every file complete before any is renamed.
        w.close()
  except BaseException:
    if made_dir and not any(out_dir.iterdir()):
      out_dir.rmdir()
    raise
  return paths


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags (on `flag_values`); `main` and `__main__` use them."""
  fv = {'flag_values': flag_values}
  flags.DEFINE_string('src', None, 'folder of scene folders (CAVE) or .mat files', **fv)
  flags.DEFINE_string('srf', None, '31x3 spectral response (.mat, .npy, .csv)', **fv)
  flags.DEFINE_string('out', None, 'output folder', **fv)
  flags.DEFINE_enum('format', 'cave', ['cave', 'harvard'], 'scene format', **fv)
  flags.DEFINE_string('name', None, 'file-name tag (default: the format)', **fv)
  flags.DEFINE_list('test_scenes', None, 'comma list of test scene names', **fv)
  flags.DEFINE_integer('patch', 64, 'training patch side', **fv)
  flags.DEFINE_integer('stride', 32, 'training patch stride', **fv)
  flags.DEFINE_integer('grid', 14, 'patch positions per axis; 0 = all that fit', **fv)
  flags.DEFINE_float('valid_fraction', 0.2, 'share of the patches for validation', **fv)
  flags.DEFINE_integer('kernel_size', 3, 'Gaussian blur kernel side', **fv)
  flags.DEFINE_float('sigma', 0.5, 'Gaussian blur sigma', **fv)
  flags.DEFINE_integer('crop', 1000, 'Harvard crop side', **fv)
  flags.DEFINE_integer('seed', 0, 'patch shuffle seed', **fv)
  for name in ('test_scenes', 'valid_fraction', 'kernel_size'):  # The dashed spellings too.
    flags.DEFINE_alias(name.replace('_', '-'), name, **fv)
  for name in ('src', 'srf', 'out'):
    flags.mark_flag_as_required(name, **fv)


def run(fv: flags.FlagValues) -> int:
  """Prepares the files from parsed flags; prints the written files.

  Returns:
    0, or 2 when the input is refused (nothing is written).
  """
  try:
    paths = prepare(
      fv.src,
      fv.srf,
      fv.out,
      fmt=fv.format,
      name=fv.name,
      test_scenes=fv.test_scenes or None,
      patch=fv.patch,
      stride=fv.stride,
      grid=fv.grid or None,
      valid_fraction=fv.valid_fraction,
      kernel_size=fv.kernel_size,
      sigma=fv.sigma,
      crop=fv.crop,
      seed=fv.seed,
    )
  except DataError as e:
    print(f'error: {e} (nothing written)', file=sys.stderr)
    return 2
  for kind, path in paths.items():
    with h5py.File(path, 'r') as f:
      print(f'{kind}: {path}', {k: f[k].shape for k in f})
  return 0


def main(argv: Sequence[str]) -> int:
  """Runs the command line `argv` (flags only, no program name), e.g. from a notebook or a test.

  Returns:
    0, or 2 when the input is refused.
  """
  return run_command('prepare_cave', define_flags, run, argv)


if __name__ == '__main__':
  run_command('prepare_cave', define_flags, run)
