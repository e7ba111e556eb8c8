"""Scene rasters read window by window: GeoTIFF (rasterio), `.npy`, `.mat` and PanCollection `.h5`.

  pan = rasters.open_raster('pan.tif', 'PAN')
  ms = rasters.open_raster('ms.tif', 'MS')
  rasters.check_pair(pan, ms, scale=4, bands=8, guide_bands=1)
  block = pan.read(y0, y1, x0, x1)  # (y1 - y0, x1 - x0, bands) in the file's dtype

`Raster` is the interface (size, dtype, georeference, nodata, band descriptions, `read`,
`valid`, `invalid`); `GeoTiffRaster` reads any GDAL raster by windows, `ArrayRaster` holds an
array (`.npy` memory-mapped; `.mat`/`.h5` loaded whole: they are test-image sized).
`check_pair` refuses a PAN/MS pair that does not overlay (CRS, pixel sizes, origins, sizes) or
does not fit a model (band counts). Used by the scene engine (`infer.scene`) and `fuse.py`.

A scene is the windowed case of the data layer's interface (`sources.Source`): `SceneSource`,
the 'scene' reader, is a one-image source (`[0]` reads the pair whole, divided by the sensor
maximum) whose `pan` and `ms` rasters are read by window; `open_scene` opens and checks a pair
through `sources.open_source`. Each file is opened once; the values are checked window by window
as the engine reads them (`infer.scene.SceneReader`), not when the scene is opened.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from u2net_jax.data import DataError, sources
from u2net_jax.data import prepare_pansharpening as prep

TIFF_SUFFIXES = ('.tif', '.tiff')
ARRAY_SUFFIXES = ('.npy', '.mat', '.h5', '.hdf5')
# GDAL's block cache (MB) while a scene is read and written. Its default, 5% of the RAM, would let
# the cache of written blocks grow with the scene up to that size; windows are written whole
# blocks at a time, so a small cache costs nothing.
GDAL_CACHE_MB = 64


def import_rasterio():
  """The rasterio module, or a DataError saying how to install it."""
  try:
    import rasterio
  except ImportError as e:  # A real dependency (requirements.txt); the message is for partial
    raise DataError('GeoTIFF input/output needs rasterio: pip install rasterio') from e  # installs.
  return rasterio


def gdal_env():
  """A rasterio environment with a bounded block cache (a no-op without rasterio)."""
  try:
    import rasterio
  except ImportError:
    return contextlib.nullcontext()
  return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


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
    rasterio = import_rasterio()
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
    except import_rasterio().errors.RasterioError as e:
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


# ---------------------------------------------------------------------------------------------
# A scene as a source.


@sources.register('scene')
class SceneSource(sources.Source):
  """A PAN/MS scene: a one-image `sources.Source` whose rasters are also read by window.

  Attributes:
    pan, ms: the `Raster`s (checked as a pair by `check_pair`), for windowed reading.
    file: 'PAN_PATH + MS_PATH'.
  """

  def __init__(self, pan: Raster, ms: Raster, *, max_value: float = 1.0):
    self.pan, self.ms = pan, ms
    self.max_value = float(max_value)
    self.file = f'{pan.path} + {ms.path}'
    self.roles = {'guide': str(pan.path), 'ms': str(ms.path)}

  @classmethod
  def from_spec(cls, spec: sources.Spec) -> SceneSource:
    """`spec.location` is the PAN; `spec.options`: 'ms' (the MS path), 'pan_key', 'ms_key'.

    Raises:
      DataError: a missing, unreadable or unsupported file, or a pair that does not overlay or
        does not fit (`check_pair`); nothing is left open.
    """
    o = spec.options
    pan = open_raster(spec.location, 'PAN', o.get('pan_key'))
    try:
      ms = open_raster(o['ms'], 'MS', o.get('ms_key'))
    except BaseException:
      pan.close()
      raise
    source = cls(pan, ms, max_value=spec.max_value)
    try:
      check_pair(pan, ms, scale=spec.scale, bands=spec.spectral_bands, guide_bands=spec.guide_bands)
    except BaseException:
      source.close()
      raise
    return source

  def __len__(self) -> int:
    return 1

  def window(self, role: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The window of 'guide' (PAN pixels) or 'ms' (MS pixels), in the file's dtype."""
    raster = {'guide': self.pan, 'ms': self.ms}[role]
    return raster.read(y0, y1, x0, x1)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """The whole scene (small scenes only): 'guide' and 'ms' float32 / `max_value`."""
    if int(index) != 0:
      raise IndexError(f'{self.file}: index {index} out of range [0, 1)')
    scale = np.float32(self.max_value)
    return {
      'guide': self.window('guide', 0, self.pan.height, 0, self.pan.width).astype(np.float32)
      / scale,
      'ms': self.window('ms', 0, self.ms.height, 0, self.ms.width).astype(np.float32) / scale,
    }

  def close(self) -> None:
    self.pan.close()
    self.ms.close()


def open_scene(
  pan_path: str | os.PathLike,
  ms_path: str | os.PathLike,
  *,
  scale: int,
  bands: int,
  guide_bands: int,
  max_value: float = 1.0,
  pan_key: str | None = None,
  ms_key: str | None = None,
) -> SceneSource:
  """Opens and checks a PAN/MS pair through the data layer's one entry (`sources.open_source`).

  Args:
    pan_path, ms_path: the inputs (`open_raster`).
    scale, bands, guide_bands: what the method takes (`check_pair`).
    max_value: the sensor maximum (for `[0]`).
    pan_key, ms_key: array names inside `.mat`/`.h5` inputs.

  Returns:
    The open `SceneSource` (close it, or use `with`).

  Raises:
    DataError: as `SceneSource.from_spec`.
  """
  spec = sources.Spec(
    kind='scene',
    location=str(pan_path),
    max_value=float(max_value),
    spectral_bands=bands,
    guide_bands=guide_bands,
    scale=scale,
    options={'ms': str(ms_path), 'pan_key': pan_key, 'ms_key': ms_key},
  )
  return sources.open_source(spec)
