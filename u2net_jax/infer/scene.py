"""Fusing whole scenes of any size: windowed, georeferenced reading and writing around `tiling`.

  result = scene.fuse_files('workdirs/official_wv3', 'pan.tif', 'ms.tif', 'fused.tif')

Inputs (`open_raster`): GeoTIFF through rasterio, read window by window; `.npy` (memory-mapped),
`.mat` and PanCollection `.h5` single images (loaded whole: they are test-image sized). Before any
work, `check_pair` refuses a pair that does not overlay (CRS, pixel sizes, origins, sizes) or does
not fit the model (band counts), and the output is checked writable and not silently replaced.

Streaming (`fuse_scene`): the official tile grid (`tiling.tile_grid`) is walked in windows of
about `window` x `window` PAN pixels (square with the default tile batch, `window_tiles`); each
window's tiles are cut by `tiling.cut_window` from a read of the window plus its halo (so a tile
takes its margins from the neighbouring real pixels and the result does not depend on the window
size), fused as full batches of tiles on every local device (`tiling.Fuser.fuse_tiles_at`, one
compiled function per tile shape) and written. Memory is bounded by the window, not the scene:
freed memory is handed back to the system after each window (`_release_free_heap`). Nodata
pixels (the PAN's or the MS's nodata mask, or a PAN of 0 when the files declare none) are written
as nodata.

Outputs (`open_sink`): a tiled, compressed GeoTIFF with the PAN's CRS and transform, the MS band
descriptions and nodata, written window by window (`cog=True` converts it to a Cloud-Optimized
GeoTIFF with overviews); `.npy` (written through a memory map) or `.mat` (`sr`, H x W x C, as
`evaluate.py` saves it). Every output is written under a temporary name and renamed at the end
(`fileio.atomic_file`): a killed run leaves no file under the final name.

Size: ~630 lines: readers and writers for four file kinds, the georeference checks and the
streaming loop belong to one feature and share private helpers; the tiling itself is `tiling`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import math
import os
import platform
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from absl import logging

from u2net_jax import errors
from u2net_jax.data import DataError
from u2net_jax.data import prepare_pansharpening as prep
from u2net_jax.infer import tiling
from u2net_jax.io import fileio
from u2net_jax.run import checkpointing, config_utils

TIFF_SUFFIXES = ('.tif', '.tiff')
ARRAY_SUFFIXES = ('.npy', '.mat', '.h5', '.hdf5')
OUTPUT_SUFFIXES = TIFF_SUFFIXES + ('.npy', '.mat')
BLOCK = 256  # GeoTIFF internal tile side; the default window is a multiple of it.
# GDAL's block cache (MB) while a scene is read and written. Its default, 5% of the RAM, would let
# the cache of written blocks grow with the scene up to that size; windows are written whole
# blocks at a time, so a small cache costs nothing.
GDAL_CACHE_MB = 64


def _rasterio():
  try:
    import rasterio
  except ImportError as e:  # A real dependency (requirements.txt); the message is for partial
    raise DataError('GeoTIFF input/output needs rasterio: pip install rasterio') from e  # installs.
  return rasterio


# ---------------------------------------------------------------------------------------------
# Readers.


class Raster:
  """One image read by windows: (height, width, bands) in its own dtype, with a georeference.

  Attributes:
    path: the file.
    role: 'PAN' or 'MS', for messages.
    height, width, bands, dtype: the image.
    crs, transform: the georeference (rasterio CRS and Affine), None for plain arrays.
    nodata: the declared nodata value or None.
    descriptions: per-band names (None each when the file has none).
  """

  path: Path
  role: str
  height: int
  width: int
  bands: int
  dtype: np.dtype
  crs: Any = None
  transform: Any = None
  nodata: float | None = None
  has_mask = False  # Whether `valid` can be False somewhere (a mask band or an alpha band).

  @property
  def descriptions(self) -> tuple[str | None, ...]:
    return (None,) * self.bands

  def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """image[y0:y1, x0:x1] as (y1 - y0, x1 - x0, bands), in the file's dtype."""
    raise NotImplementedError

  def valid(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(y1 - y0, x1 - x0) bool, False where the file's mask band (or alpha) says nodata."""
    return np.ones((y1 - y0, x1 - x0), bool)

  def invalid(self, values: np.ndarray, y0: int, x0: int, nodata: float | None) -> np.ndarray:
    """The nodata pixels of `values` (read at y0, x0): any band NaN, infinite or nodata.

    Args:
      values: (h, w, bands) as `read` returned them.
      y0, x0: where they were read (for the mask band).
      nodata: the nodata value when the file declares none (`--nodata`), or None.

    Returns:
      (h, w) bool, True at nodata pixels.
    """
    bad = np.zeros(values.shape[:2], bool)
    if values.dtype.kind in 'fc':
      bad |= ~np.isfinite(values).all(axis=-1)
    value = self.nodata if self.nodata is not None else nodata
    if value is not None and not math.isnan(value):
      bad |= (values == value).any(axis=-1)
    if self.has_mask:
      bad |= ~self.valid(y0, y0 + values.shape[0], x0, x0 + values.shape[1])
    return bad

  def close(self) -> None:
    """Releases the file."""

  def describe(self) -> str:
    return f'{self.role} {self.path} ({self.height}x{self.width}x{self.bands} {self.dtype})'


class GeoTiffRaster(Raster):
  """A GeoTIFF (or any GDAL raster) read window by window with rasterio."""

  def __init__(self, path: Path, role: str):
    rasterio = _rasterio()
    self.path, self.role = path, role
    try:
      self._src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
      raise DataError(f'{role} {path}: cannot read it as a raster ({e})') from e
    src = self._src
    self.height, self.width, self.bands = src.height, src.width, src.count
    self.dtype = np.dtype(src.dtypes[0])
    self.crs = src.crs
    self.transform = src.transform if src.crs is not None or not src.transform.is_identity else None
    self.nodata = src.nodata
    # A nodata value is compared with the values themselves (`invalid`); a mask band or an
    # alpha band is read beside them.
    kinds = rasterio.enums.MaskFlags
    flags = src.mask_flag_enums[0] if src.count else ()
    self.has_mask = kinds.per_dataset in flags or kinds.alpha in flags

  @property
  def descriptions(self) -> tuple[str | None, ...]:
    return tuple(self._src.descriptions)

  def read(self, y0, y1, x0, x1):
    from rasterio.windows import Window

    with self._read_errors(y0, y1, x0, x1):
      return self._src.read(window=Window(x0, y0, x1 - x0, y1 - y0)).transpose(1, 2, 0)

  def valid(self, y0, y1, x0, x1):
    if not self.has_mask:
      return super().valid(y0, y1, x0, x1)
    from rasterio.windows import Window

    with self._read_errors(y0, y1, x0, x1):
      return self._src.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0)) > 0

  @contextlib.contextmanager
  def _read_errors(self, y0, y1, x0, x1):
    # A truncated or corrupt file opens fine and fails at the first damaged block.
    try:
      yield
    except _rasterio().errors.RasterioError as e:
      raise DataError(
        f'{self.role} {self.path}: rows {y0}..{y1 - 1}, columns {x0}..{x1 - 1} cannot be read '
        f'(a truncated or corrupt file?): {str(e).strip().splitlines()[0] if str(e) else e!r}'
      ) from e

  def close(self):
    self._src.close()


class ArrayRaster(Raster):
  """An image held as an array (`.npy` memory-mapped, `.mat`, PanCollection `.h5`)."""

  def __init__(self, path: Path, role: str, array: np.ndarray):
    self.path, self.role = path, role
    self._array = array if array.ndim == 3 else array[..., None]
    self.height, self.width, self.bands = self._array.shape
    self.dtype = self._array.dtype

  def read(self, y0, y1, x0, x1):
    return np.asarray(self._array[y0:y1, x0:x1])


def open_raster(path: str | os.PathLike, role: str, key: str | None = None) -> Raster:
  """Opens the PAN (`role='PAN'`) or the MS (`role='MS'`) of a scene.

  Args:
    path: GeoTIFF (`.tif`/`.tiff`), `.npy`, `.mat` or PanCollection `.h5` (one image).
    role: 'PAN' or 'MS'.
    key: the array's name inside a `.mat`/`.h5` (default: a known name or the only array).

  Returns:
    The `Raster`.

  Raises:
    DataError: a missing, unreadable or unsupported file.
  """
  path = Path(path)
  if not path.exists():
    raise DataError(f'{role} {path}: file not found')
  suffix = path.suffix.lower()
  if suffix in TIFF_SUFFIXES:
    return GeoTiffRaster(path, role)
  if suffix == '.npy':
    array = np.load(path, mmap_mode='r')
    if array.ndim not in (2, 3):
      raise DataError(f'{role} {path}: shape {array.shape}; expected (H, W) or (H, W, C)')
    return ArrayRaster(path, role, array)
  if suffix in ARRAY_SUFFIXES:
    ndim = 2 if role == 'PAN' else 3
    return ArrayRaster(path, role, prep.load_array(path, key, ndim, dtype=None))
  known = ', '.join(TIFF_SUFFIXES + ARRAY_SUFFIXES)
  raise DataError(f'{role} {path}: unsupported format {suffix!r} (use {known})')


# ---------------------------------------------------------------------------------------------
# Checks.


def check_pair(pan: Raster, ms: Raster, *, scale: int, bands: int, guide_bands: int) -> None:
  """Refuses a pair that does not overlay exactly or does not fit the model.

  Georeferenced pairs: the same CRS, the PAN pixel size = the MS pixel size / scale (1e-6
  relative), no rotation difference, top-left corners within half a PAN pixel. Every pair: the
  PAN exactly `scale` x the MS, band counts equal to the model's.

  Raises:
    DataError: naming both files and the found vs expected values.
  """
  pair = f'{pan.describe()} and {ms.describe()}'
  if (pan.crs is None) != (ms.crs is None):
    having, lacking = (pan, ms) if pan.crs is not None else (ms, pan)
    raise DataError(
      f'{pair}: the {having.role} has a coordinate system ({having.crs}) but the '
      f'{lacking.role} has none; give both georeferenced or both plain'
    )
  if pan.crs is not None:
    if pan.crs != ms.crs:
      raise DataError(
        f'{pair}: different coordinate systems: PAN {pan.crs}, MS {ms.crs}; reproject one '
        '(e.g. gdalwarp -t_srs) so both share a CRS'
      )
    p, m = pan.transform, ms.transform
    for name, pv, mv in (('x', p.a, m.a), ('y', p.e, m.e)):
      if not math.isclose(mv, scale * pv, rel_tol=1e-6):
        raise DataError(
          f'{pair}: MS pixel {name}-size {mv:g} is {mv / pv:g}x the PAN pixel {name}-size {pv:g}; '
          f'expected {scale}x'
        )
    if not (math.isclose(m.b, scale * p.b, abs_tol=1e-9) and math.isclose(m.d, scale * p.d)):
      raise DataError(f'{pair}: the transforms are rotated differently: PAN {p}, MS {m}')
    dx, dy = (m.c - p.c) / abs(p.a), (m.f - p.f) / abs(p.e)
    if abs(dx) > 0.5 or abs(dy) > 0.5:
      raise DataError(
        f'{pair}: top-left corners differ by ({dx:+.3g}, {dy:+.3g}) PAN pixels (x, y): PAN '
        f'({p.c:.10g}, {p.f:.10g}), MS ({m.c:.10g}, {m.f:.10g}); expected within half a pixel'
      )
  if (pan.height, pan.width) != (scale * ms.height, scale * ms.width):
    raise DataError(
      f'{pair}: the PAN is {pan.height}x{pan.width}; expected exactly {scale}x the MS '
      f'{ms.height}x{ms.width}, i.e. {scale * ms.height}x{scale * ms.width}'
    )
  if ms.bands != bands:
    raise DataError(f'{pair}: the MS has {ms.bands} bands; the model takes {bands}')
  if pan.bands != guide_bands:
    raise DataError(f'{pair}: the PAN has {pan.bands} bands; the model takes {guide_bands}')


def check_output(
  path: str | os.PathLike, overwrite: bool, inputs: dict[str, str | os.PathLike] | None = None
) -> Path:
  """Refuses an unsupported, existing (without `overwrite`) or unwritable output path.

  Args:
    path: the output file.
    overwrite: an existing output may be replaced.
    inputs: role -> input file; an output that is one of them (the same file through any
      hard or symbolic link) is refused whatever `overwrite` says.

  Returns:
    The output path.

  Raises:
    fileio.OutputError: naming the path.
  """
  path = Path(path)
  for role, source in (inputs or {}).items():
    same = False
    with contextlib.suppress(OSError):  # An output that does not exist is no input.
      same = os.path.samefile(path, source)
    if same:
      raise fileio.OutputError(
        f'--out {path} is the {role} input {source}: an output never replaces an input '
        '(even with --overwrite); choose another output name'
      )
  if path.suffix.lower() not in OUTPUT_SUFFIXES:
    raise fileio.OutputError(
      f'{path}: unsupported output format {path.suffix!r} (use {", ".join(OUTPUT_SUFFIXES)})'
    )
  if path.is_dir():
    raise fileio.OutputError(f'{path} is a folder; give the output file name')
  if path.exists() and not overwrite:
    raise fileio.OutputError(f'{path} exists; pass --overwrite to replace it')
  fileio.ensure_writable_dir(path.parent)
  return path


# ---------------------------------------------------------------------------------------------
# Writers.


class Sink:
  """Receives the fused windows of a scene; `finish` completes the (temporary) file."""

  def __init__(self, tmp: Path, height: int, width: int, bands: int, dtype: np.dtype):
    self.tmp, self.dtype = tmp, np.dtype(dtype)
    self.shape = (height, width, bands)

  def write(self, y0: int, x0: int, block: np.ndarray) -> None:
    raise NotImplementedError

  def finish(self, nodata: float | None) -> None:
    """Completes the file (`nodata`: the value written at nodata pixels, None when none)."""


class GeoTiffSink(Sink):
  """A tiled, compressed GeoTIFF written block by block; optionally converted to a COG."""

  def __init__(self, tmp, height, width, bands, dtype, *, crs, transform, descriptions, cog):
    super().__init__(tmp, height, width, bands, dtype)
    rasterio = _rasterio()
    self.cog = cog
    self._plain = tmp.with_name(tmp.name + '.gtiff.tif') if cog else tmp
    float_data = self.dtype.kind == 'f'
    self._dst = rasterio.open(
      self._plain,
      'w',
      driver='GTiff',
      height=height,
      width=width,
      count=bands,
      dtype=self.dtype.name,
      crs=crs,
      transform=transform,
      tiled=True,
      blockxsize=BLOCK,
      blockysize=BLOCK,
      compress='deflate',
      predictor=3 if float_data else 2,
      BIGTIFF='IF_SAFER',
    )
    for i, d in enumerate(descriptions):
      if d:
        self._dst.set_band_description(i + 1, d)

  def write(self, y0, x0, block):
    from rasterio.windows import Window

    h, w = block.shape[:2]
    self._dst.write(block.transpose(2, 0, 1), window=Window(x0, y0, w, h))

  def finish(self, nodata):
    if nodata is not None:
      self._dst.nodata = nodata
    self._dst.close()
    if self.cog:
      import rasterio.shutil

      try:
        rasterio.shutil.copy(
          self._plain, self.tmp, driver='COG', compress='DEFLATE', blocksize=512, overviews='AUTO'
        )
      finally:
        self._plain.unlink(missing_ok=True)

  def abort(self):
    with contextlib.suppress(Exception):
      self._dst.close()
    if self.cog:
      self._plain.unlink(missing_ok=True)


class NpySink(Sink):
  """An `.npy` file (H, W, C) written through a memory map."""

  def __init__(self, tmp, height, width, bands, dtype):
    super().__init__(tmp, height, width, bands, dtype)
    self._map = np.lib.format.open_memmap(tmp, 'w+', self.dtype, self.shape)

  def write(self, y0, x0, block):
    self._map[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block

  def finish(self, nodata):
    self._map.flush()
    del self._map


class MatSink(Sink):
  """A `.mat` file with `sr` (H, W, C), as `evaluate.py` writes; held in memory (MATLAB files
  cannot be written by parts), so for test-image-sized scenes."""

  def __init__(self, tmp, height, width, bands, dtype):
    super().__init__(tmp, height, width, bands, dtype)
    self._array = np.zeros(self.shape, self.dtype)

  def write(self, y0, x0, block):
    self._array[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block

  def finish(self, nodata):
    scipy.io.savemat(self.tmp, {'sr': self._array})


TEMPORARY_TAG = '.fuse-'  # `.NAME.fuse-HOST-PID-RANDOM.tmpSUFFIX`: who wrote a temporary.


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process.
  return True


def clean_temporaries(path: Path) -> dict[str, list[str]]:
  """Removes the temporaries that killed runs (SIGKILL, a crash) left beside an output.

  A temporary names its host and process (`TEMPORARY_TAG`): one of a process of this host that
  is gone is removed; one of a live process (another run writing the same output) or of another
  host is reported, not touched.

  Args:
    path: the output file.

  Returns:
    {'removed': [...], 'left': [...]}: the temporaries' paths, each list possibly empty.
  """
  found = {'removed': [], 'left': []}
  if not path.parent.is_dir():
    return found
  pattern = re.compile(
    re.escape(f'.{path.name}{TEMPORARY_TAG}') + r'(?P<host>.+)-(?P<pid>\d+)-[^-.]+\.tmp'
  )
  for tmp in sorted(path.parent.glob(f'.{glob.escape(path.name)}{TEMPORARY_TAG}*')):
    m = pattern.match(tmp.name)
    if m and m['host'] == socket.gethostname() and not _pid_alive(int(m['pid'])):
      with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
      found['removed'].append(str(tmp))
      logging.warning('Removed %s, the temporary of a killed run (process %s).', tmp, m['pid'])
    else:
      found['left'].append(str(tmp))
      logging.warning(
        'Left %s: the temporary of a run that may still be writing %s (another process or '
        'host); delete it if no such run is alive.',
        tmp,
        path,
      )
  return found


@contextlib.contextmanager
def _temporary(path: Path, suffix: str) -> Iterator[Path]:
  """As `fileio.atomic_file`, with a temporary name that says which process writes it."""
  prefix = f'.{path.name}{TEMPORARY_TAG}{socket.gethostname()}-{os.getpid()}-'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=f'.tmp{suffix}')
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it private; outputs are not.
  except OSError as e:
    raise fileio.OutputError(f'cannot write {path}: {e}') from e
  tmp = Path(tmp)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_sink(
  path: Path, pan: Raster, ms: Raster, dtype: np.dtype, *, cog: bool = False
) -> Iterator[Sink]:
  """The output of a scene under a temporary name, renamed onto `path` when the block succeeds.

  Args:
    path: `.tif`/`.tiff` (GeoTIFF with the PAN's georeference), `.npy` or `.mat`.
    pan, ms: the inputs (size, georeference, band descriptions).
    dtype: the stored dtype.
    cog: write a Cloud-Optimized GeoTIFF (GeoTIFF outputs only).
  """
  suffix = path.suffix.lower()
  with _temporary(path, suffix) as tmp:
    size = (pan.height, pan.width, ms.bands, dtype)
    if suffix in TIFF_SUFFIXES:
      sink = GeoTiffSink(
        tmp,
        *size,
        crs=pan.crs,
        transform=pan.transform,
        descriptions=ms.descriptions,
        cog=cog,
      )
    elif cog:
      raise fileio.OutputError(f'{path}: --cog needs a .tif output')
    else:
      sink = (NpySink if suffix == '.npy' else MatSink)(tmp, *size)
    try:
      yield sink
    except BaseException:
      if isinstance(sink, GeoTiffSink):
        sink.abort()
      raise


# ---------------------------------------------------------------------------------------------
# Streaming.


def _to_output(fused: np.ndarray, max_value: float, dtype: np.dtype) -> np.ndarray:
  """[0, 1] float32 -> the sensor scale in `dtype` (as `evaluate.py`: x max value in float32).

  `max_value` is the output's full scale: the sensor maximum, or the dtype's maximum when the
  output is rescaled (`--rescale_output`).
  """
  sr = fused * np.float32(max_value)
  if dtype.kind in 'ui':
    info = np.iinfo(dtype)
    return np.clip(np.rint(sr), info.min, info.max).astype(dtype)
  return sr.astype(dtype)


class _Progress:
  """Tiles done, tiles/s and ETA on stderr (tqdm, installed with tensorflow-datasets)."""

  def __init__(self, total: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm

      self._bar = tqdm(
        total=total,
        unit='tile',
        file=sys.stderr,
        smoothing=0.1,
        desc='fusing',
        # Always tiles/s (tqdm inverts slow rates to s/tile by default).
        bar_format='{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tiles '
        '[{elapsed}<{remaining}, {rate_noinv_fmt}]',
      )

  def update(self, n: int) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def window_tiles(window: int, tile: int, tile_batch: int) -> tuple[int, int]:
  """(rows, cols) of tiles per window: about (window / tile)^2 tiles, cols a multiple of tile_batch.

  `Fuser.fuse_tiles_at` runs tile t of the grid at batch position t mod tile_batch (the position
  the whole-image cut gives it). Along a row of the grid, tile indices are consecutive, so a
  window whose width is a multiple of tile_batch tiles fills every position equally and every
  batch is full. A width that is not would stack a window's tiles on a few positions (e.g. a
  16-tile-wide window, 64-tile batches and a grid 129 tiles wide put 256 tiles on 31 positions):
  up to 4x the batches, mostly padding, and their results held at once (peak memory that grew
  with the scene). With the defaults (1024-px windows of 64-px tiles, 16 tiles per batch) the
  window is square, 16 x 16 tiles.

  Args:
    window: the window side in PAN pixels, a multiple of `tile`.
    tile: the tile side.
    tile_batch: tiles per jitted call.

  Returns:
    (rows, cols): cols = tile_batch * max(1, round(side / tile_batch)) with side = window / tile,
    rows = max(1, side^2 // cols).
  """
  side = window // tile
  cols = tile_batch * max(1, round(side / tile_batch))
  return max(1, side * side // cols), cols


class _Reader:
  """One raster read for the tiling: nodata found, values checked, holes filled, scaled.

  `tiling.cut_window` calls it with the region of a window plus its halo; the region's nodata
  mask is kept for the window's output pixels (`bad`), so nothing is read twice. The network
  never sees a NaN or a nodata value: those pixels take the value of the nearest valid pixel
  of the region (local interpolation), so a hole spoils only the output pixels it covers, not
  its tile; they are written as nodata afterwards.
  """

  def __init__(
    self,
    raster: Raster,
    max_value: float,
    nodata: float | None,
    zero_is_nodata: bool,
    check_values: bool,
  ):
    self.raster, self.max_value, self.nodata = raster, max_value, nodata
    self.zero_is_nodata, self.check_values = zero_is_nodata, check_values
    # Data already divided to [0, 1] are caught on the first region holding a positive value
    # (a sensor-scale window whose every value is <= 1 does not occur).
    self.scale_seen = max_value <= 1.0
    self._region: tuple[int, int, np.ndarray] | None = None

  def _mask(self, values: np.ndarray, y0: int, x0: int) -> np.ndarray:
    bad = self.raster.invalid(values, y0, x0, self.nodata)
    if self.zero_is_nodata:
      bad |= ~np.any(values != 0, axis=-1)
    return bad

  def __call__(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    values = self.raster.read(y0, y1, x0, x1)
    bad = self._mask(values, y0, x0)
    if self.check_values:
      self._check(values, bad, y0, y1, x0, x1)
    x = values.astype(np.float32)
    if bad.any():
      x = _fill_holes(x, bad)
    self._region = (y0, x0, bad)
    return x / np.float32(self.max_value)  # As `pancollection.H5Source`: float32(x) / max.

  def bad(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The nodata mask of [y0:y1, x0:x1]: from the last region read when it covers it."""
    if self._region is not None:
      ry, rx, mask = self._region
      if ry <= y0 and rx <= x0 and y1 <= ry + mask.shape[0] and x1 <= rx + mask.shape[1]:
        return mask[y0 - ry : y1 - ry, x0 - rx : x1 - rx]
    return self._mask(self.raster.read(y0, y1, x0, x1), y0, x0)

  def _refuse(self, values, where, y0, y1, x0, x1, why: str) -> DataError:
    y, x, b = (int(i) for i in np.argwhere(where)[0])
    r = self.raster
    return DataError(
      f'{r.role} {r.path}: band {b + 1} holds {values[y, x, b]:g} at row {y0 + y}, column '
      f'{x0 + x} (window rows {y0}..{y1 - 1}, columns {x0}..{x1 - 1}): {why}; pass '
      '--allow_off_scale if this scale is intended'
    )

  def _check(self, values, bad, y0, y1, x0, x1) -> None:
    """The checks of `value_checks.scan_values`, on this region's valid values."""
    good = ~bad[..., None]
    limit = self.max_value * (1 + 1e-6)
    above = good & (values > limit)
    if above.any():
      raise self._refuse(
        values, above, y0, y1, x0, x1,
        f'above the sensor maximum {self.max_value:g} (config.data.max_value or --max_value): '
        'data of another sensor or bit depth (2047 for 11-bit WV3/WV2/QB, 1023 for GF-2)?',
      )  # fmt: skip
    if values.dtype.kind not in 'u':
      below = good & (values < 0)
      if below.any():
        raise self._refuse(
          values, below, y0, y1, x0, x1,
          'negative, but radiances on the sensor scale are >= 0 (declare the fill value with '
          '--nodata if it marks missing pixels)',
        )  # fmt: skip
    if not self.scale_seen:
      positive = good & (values > 0)
      if positive.any():
        self.scale_seen = True
        if not (good & (values > 1)).any():
          peak = np.where(good, values, 0).max()
          raise self._refuse(
            values, good & (values == peak), y0, y1, x0, x1,
            f'every value of this window is within [0, 1] but the sensor maximum is '
            f'{self.max_value:g}: the data look already divided to [0, 1] (multiply them back '
            'by the sensor maximum, or pass --max_value=1)',
          )  # fmt: skip


def _fill_holes(x: np.ndarray, bad: np.ndarray) -> np.ndarray:
  """`x` with every `bad` pixel replaced by its nearest valid pixel (zeros when none is)."""
  if bad.all():
    return np.zeros_like(x)
  from scipy import ndimage

  iy, ix = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
  return x[iy, ix]


def output_nodata(pan: Raster, ms: Raster, dtype: np.dtype, nodata: float | None = None) -> float:
  """The value written at nodata pixels: `nodata`, else the MS's, else the PAN's, else 0 / NaN.

  Raises:
    errors.OptionError: the value cannot be stored in `dtype`.
  """
  value = next((v for v in (nodata, ms.nodata, pan.nodata) if v is not None), None)
  if value is None:
    return math.nan if dtype.kind == 'f' else 0
  if dtype.kind in 'ui':
    info = np.iinfo(dtype)
    if not (math.isfinite(value) and value == int(value) and info.min <= value <= info.max):
      where = 'given' if nodata is not None else 'declared by the inputs'
      raise errors.OptionError(
        f'the nodata value {value:g} {where} cannot be stored in a {dtype.name} output; pass '
        f'--nodata with a value in {info.min}..{info.max} (or a float --dtype)'
      )
    return int(value)
  return float(value)


def fuse_scene(
  fuser: tiling.Fuser,
  pan: Raster,
  ms: Raster,
  sink: Sink,
  *,
  max_value: float,
  window: int = 1024,
  nodata: float | None = None,
  progress: bool = True,
  check_values: bool = True,
  out_scale: float | None = None,
) -> dict[str, Any]:
  """Fuses a checked PAN/MS pair window by window into `sink`.

  An output pixel is nodata when a value it depends on (its PAN pixel, the MS pixel that
  covers it, any band) is NaN, infinite or the input's nodata value (a PAN of 0 in every band
  counts when no input declares nodata); such pixels are filled before fusing (`_Reader`) and
  written as the output's nodata value.

  Args:
    fuser: the model (`tiling.Fuser`; its tile geometry is used).
    pan, ms: the inputs (`check_pair` passed).
    sink: where the fused windows go (`sink.dtype`).
    max_value: the sensor maximum the inputs are divided by.
    window: PAN pixels per window side, a multiple of the tile (memory grows with its square);
      the window's width is rounded to a multiple of the tile batch (`window_tiles`).
    nodata: the inputs' nodata value where a file declares none, and the output's
      (`output_nodata`); None: the files' own.
    progress: show a progress bar on stderr.
    check_values: refuse values off the 0..max_value scale (as `value_checks.scan_values`).
    out_scale: the output value of a fused 1.0 (default `max_value`; `--rescale_output` maps
      it onto the integer dtype's maximum).

  Returns:
    {'tiles', 'windows', 'seconds', 'nodata_pixels', 'nodata'}.

  Raises:
    DataError: a value off the scale (file, band, window and value named) or an unreadable
      window.
  """
  tile, pad, scale = fuser.tile, fuser.pad, fuser.scale
  if window <= 0 or window % tile:
    raise ValueError(f'window ({window}) must be a positive multiple of the tile size {tile}')
  fill = output_nodata(pan, ms, sink.dtype, nodata)
  declared = nodata is not None or any(r.has_mask or r.nodata is not None for r in (pan, ms))
  readers = {
    r.role: _Reader(r, max_value, nodata, r is pan and not declared, check_values)
    for r in (pan, ms)
  }
  height, width = pan.height, pan.width
  rows, cols = tiling.tile_grid(height, width, tile)
  win_rows, win_cols = window_tiles(window, tile, fuser.tile_batch)
  bar = _Progress(rows * cols, progress)
  masked = windows = 0
  start = time.perf_counter()
  try:
    for r0 in range(0, rows, win_rows):
      for c0 in range(0, cols, win_cols):
        rr, cc = range(r0, min(r0 + win_rows, rows)), range(c0, min(c0 + win_cols, cols))
        ms_tiles = tiling.cut_window(
          readers['MS'], ms.height, ms.width, rr, cc, tile=tile // scale, pad=pad // scale
        )
        guide_tiles = tiling.cut_window(readers['PAN'], height, width, rr, cc, tile=tile, pad=pad)
        slots = (np.asarray(rr)[:, None] * cols + np.asarray(cc)[None, :]).reshape(-1)
        out = fuser.fuse_tiles_at(ms_tiles, guide_tiles, slots)
        del ms_tiles, guide_tiles
        y0, x0 = r0 * tile, c0 * tile
        y1, x1 = min(height, rr.stop * tile), min(width, cc.stop * tile)
        block = _assemble_window(
          out, len(rr), len(cc), tile, pad, out_scale or max_value, sink.dtype
        )
        del out
        block = block[: y1 - y0, : x1 - x0]
        if y1 > y0 and x1 > x0:
          bad = _bad_pixels(readers, y0, y1, x0, x1, scale)
          if bad.any():
            masked += int(bad.sum())
            block[bad] = fill
        sink.write(y0, x0, block)
        del block
        _release_free_heap()
        windows += 1
        bar.update(len(rr) * len(cc))
  finally:
    bar.close()
  return {
    'tiles': rows * cols,
    'windows': windows,
    'seconds': time.perf_counter() - start,
    'nodata_pixels': masked,
    'nodata': fill,
  }


def _bad_pixels(readers, y0, y1, x0, x1, scale) -> np.ndarray:
  """The nodata output pixels of a window: the PAN's, and the MS's repeated onto its pixels."""
  bad = readers['PAN'].bad(y0, y1, x0, x1).copy()
  # MS pixel (i, j) covers PAN pixels scale*i .. scale*i + scale - 1.
  m = readers['MS'].bad(y0 // scale, -(-y1 // scale), x0 // scale, -(-x1 // scale))
  m = np.repeat(np.repeat(m, scale, axis=0), scale, axis=1)
  bad |= m[y0 % scale : y0 % scale + y1 - y0, x0 % scale : x0 % scale + x1 - x0]
  return bad


def _assemble_window(
  out: np.ndarray, rows: int, cols: int, tile: int, pad: int, max_value: float, dtype: np.dtype
) -> np.ndarray:
  """The central tile x tile of each fused tile, placed, on the output scale in `dtype`.

  One row of tiles at a time, so the float32 temporaries (scaled, rounded, clipped) are a row's,
  not the window's: whole-window copies would add about twice the window's float32 output to the
  peak.

  Args:
    out: (rows * cols, tile + 2 pad, same, C) fused tiles in [0, 1], row-major.
    rows, cols: the window's tile grid.
    tile, pad: tile side and margin.
    max_value: the sensor maximum.
    dtype: the output dtype.

  Returns:
    (rows * tile, cols * tile, C) in `dtype`.
  """
  bands = out.shape[-1]
  block = np.empty((rows * tile, cols * tile, bands), dtype)
  for i in range(rows):
    row = out[i * cols : (i + 1) * cols, pad : pad + tile, pad : pad + tile]
    row = row.transpose(1, 0, 2, 3).reshape(tile, cols * tile, bands)
    block[i * tile : (i + 1) * tile] = _to_output(row, max_value, dtype)
  return block


@functools.cache
def _malloc_trim():
  """glibc's `malloc_trim`, or None on other C libraries."""
  if platform.libc_ver()[0] != 'glibc':
    return None
  try:
    return ctypes.CDLL('libc.so.6').malloc_trim
  except (OSError, AttributeError):
    return None


def _release_free_heap() -> None:
  """Returns the heap's free pages to the system after a window (glibc; elsewhere a no-op).

  A window allocates and frees tens of MB of arrays of a few sizes; glibc keeps freed heap memory
  resident, and without this the peak resident set rose in steps of ~30 MB over the windows of an
  8192^2 scene (651 -> 702 MB over 99 windows, VmHWM sampled after each window; 655 -> 675 MB with
  it). `malloc_trim(0)` releases every free page of every arena: 0.4-15 ms a call, against
  seconds of fusion per window.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def _gdal_env():
  """A rasterio environment with a bounded block cache (a no-op without rasterio)."""
  try:
    import rasterio
  except ImportError:
    return contextlib.nullcontext()
  return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


def check_options(
  *,
  max_value: float | None = None,
  dtype: str | None = None,
  window: int = 1024,
  tile_batch: int | None = None,
  nodata: float | None = None,
) -> np.dtype | None:
  """Refuses flag values that cannot work, before anything is read (messages name the flags).

  Returns:
    The output dtype `dtype` names (None when unset).

  Raises:
    errors.OptionError: naming the flag, its value and what it can be.
  """

  def bad(flag, value, expected):
    return errors.OptionError(f'--{flag}={value} is not {expected}')

  if max_value is not None and not (math.isfinite(max_value) and max_value > 0):
    raise bad('max_value', max_value, 'a positive finite number (the sensor maximum, e.g. 2047)')
  if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
    raise bad('window', window, 'a positive integer (PAN pixels per window side)')
  if tile_batch is not None and (
    isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch <= 0
  ):
    raise bad('tile_batch', tile_batch, 'a positive integer (tiles per jitted call)')
  if nodata is not None and math.isinf(nodata):
    raise bad('nodata', nodata, 'a finite number or nan')
  if dtype is None:
    return None
  try:
    out = np.dtype(dtype)
  except TypeError:
    out = None
  if out is None or out.kind not in 'uif':
    raise bad('dtype', dtype, 'a numeric dtype (uint8, uint16, int16, float32, ...)')
  return out


def fuse_files(
  workdir: str | os.PathLike,
  pan_path: str | os.PathLike,
  ms_path: str | os.PathLike,
  out_path: str | os.PathLike,
  *,
  step: int | None = None,
  which: str = 'best',
  max_value: float | None = None,
  dtype: str | None = None,
  window: int = 1024,
  tile_batch: int | None = None,
  overwrite: bool = False,
  cog: bool = False,
  pan_key: str | None = None,
  ms_key: str | None = None,
  progress: bool = True,
  loaded: tuple[tiling.Fuser, int] | None = None,
  nodata: float | None = None,
  allow_off_scale: bool = False,
  rescale_output: bool = False,
) -> dict[str, Any]:
  """Fuses a PAN/MS scene with a workdir's checkpoint into `out_path` (what `fuse.py` runs).

  Every check (inputs, output, checkpoint) happens before the model runs; on any failure nothing
  is left under `out_path`.

  Args:
    workdir: a training run's or converted weights' workdir (`config.json` + checkpoints).
    pan_path, ms_path: the inputs (`open_raster`).
    out_path: `.tif`/`.tiff`, `.npy` or `.mat`.
    step, which: the checkpoint (`checkpointing.select_step`).
    max_value: the sensor maximum (default `config.data.max_value`).
    dtype: stored dtype, e.g. 'float32' (default: the MS's dtype).
    window: PAN pixels per window side (a multiple of the tile size).
    tile_batch: tiles per jitted call (default `config.eval.tile_batch`).
    overwrite: replace an existing `out_path`.
    cog: write a Cloud-Optimized GeoTIFF.
    pan_key, ms_key: array names inside `.mat`/`.h5` inputs.
    progress: show a progress bar on stderr.
    loaded: the workdir's `Fuser` and its checkpoint step, already built (`infer.archive` keeps
      one per worker process, so weights are read and compiled once, not per scene); None
      restores them here from `step`/`which`/`tile_batch`.
    nodata: the nodata value of inputs that declare none, and the output's (default: the
      inputs', else 0 for integer outputs and NaN for float ones).
    allow_off_scale: fuse values off the 0..max_value scale (already in [0, 1], above the
      maximum, negative) instead of refusing them.
    rescale_output: an integer `dtype` narrower than the data holds 0..max_value mapped onto
      its full range (without it such a dtype is refused: most pixels would clip).

  Returns:
    `fuse_scene`'s summary plus 'output', 'step', 'shape', 'dtype', 'megapixels_per_s' and
    'temporaries' (`clean_temporaries`: those of killed runs removed, or left).

  Raises:
    FileNotFoundError: no config or checkpoint in the workdir.
    DataError: inputs that do not overlay or do not fit the model.
    fileio.OutputError: an existing (without `overwrite`) or unwritable output, or an input.
    errors.OptionError: a flag value that cannot work (`check_options`).
  """
  dtype = check_options(
    max_value=max_value, dtype=dtype, window=window, tile_batch=tile_batch, nodata=nodata
  )
  config = config_utils.load_config(workdir)
  model = config.model
  scale = int(model.get('scale', 4))
  with contextlib.ExitStack() as stack:
    stack.enter_context(_gdal_env())
    pan = open_raster(pan_path, 'PAN', pan_key)
    stack.callback(pan.close)
    ms = open_raster(ms_path, 'MS', ms_key)
    stack.callback(ms.close)
    check_pair(
      pan, ms, scale=scale, bands=int(model.spectral_bands), guide_bands=int(model.guide_bands)
    )
    out = check_output(out_path, overwrite, {'PAN': pan_path, 'MS': ms_path})
    tile = int(config.eval.tile_size)
    if window % tile:
      raise DataError(f'--window={window} must be a positive multiple of the tile size {tile}')
    out_dtype = dtype or ms.dtype
    if out_dtype.kind not in 'uif':
      raise errors.OptionError(f'the MS is {out_dtype}, not numeric; pass --dtype=float32')
    max_value = float(config.data.max_value if max_value is None else max_value)
    out_scale = _output_scale(out_dtype, max_value, rescale_output)
    output_nodata(pan, ms, out_dtype, nodata)  # Refused now rather than after the fusion.
    temporaries = clean_temporaries(out)
    if loaded is not None:
      fuser, step = loaded
    else:
      step = checkpointing.select_step(workdir, step, which)
      params, step, _ = checkpointing.restore_params(workdir, model, step=step)
      fuser = tiling.Fuser(
        model,
        params,
        tile_size=tile,
        tile_pad=int(config.eval.tile_pad),
        tile_batch=tile_batch or int(config.eval.tile_batch),
      )
    with open_sink(out, pan, ms, out_dtype, cog=cog) as sink:
      result = fuse_scene(
        fuser,
        pan,
        ms,
        sink,
        max_value=max_value,
        window=window,
        nodata=nodata,
        progress=progress,
        check_values=not allow_off_scale,
        out_scale=out_scale,
      )
      sink.finish(result['nodata'])
  megapixels = pan.height * pan.width / 1e6
  return dict(
    result,
    output=str(out),
    step=int(step),
    shape=[pan.height, pan.width, ms.bands],
    dtype=out_dtype.name,
    megapixels_per_s=megapixels / result['seconds'],
    temporaries=temporaries,
  )


def _output_scale(dtype: np.dtype, max_value: float, rescale: bool) -> float:
  """The output value of a fused 1.0: `max_value`, or the integer dtype's maximum (`rescale`).

  Raises:
    errors.OptionError: an integer dtype narrower than 0..max_value without `rescale`, or
      `rescale` with a float dtype.
  """
  if dtype.kind == 'f':
    if rescale:
      raise errors.OptionError(
        f'--rescale_output maps 0..{max_value:g} onto an integer --dtype; {dtype.name} is not one'
      )
    return max_value
  top = int(np.iinfo(dtype).max)
  if rescale:
    return float(top)
  if top < max_value:
    raise errors.OptionError(
      f'--dtype={dtype.name} holds at most {top} but the data reach {max_value:g} (--max_value '
      'or config.data.max_value): most pixels would clip; use --dtype=uint16 or float32, or '
      f'pass --rescale_output to map 0..{max_value:g} onto 0..{top}'
    )
  return max_value
