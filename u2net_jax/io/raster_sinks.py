"""Scene outputs written window by window, under a temporary name renamed when complete.

  out = raster_sinks.check_output('fused.tif', overwrite=False, inputs={'PAN': pan_path})
  raster_sinks.clean_temporaries(out)
  with raster_sinks.open_sink(out, pan, ms, np.dtype('uint16'), cog=False) as sink:
    sink.write(y0, x0, block)  # (h, w, bands) in the sink's dtype
    sink.finish(nodata)

`Sink` is the interface; `GeoTiffSink` writes a tiled, compressed GeoTIFF with the PAN's CRS and
transform and the MS band descriptions (`cog=True` converts it to a Cloud-Optimized GeoTIFF with
overviews at the end), `NpySink` an `.npy` through a memory map, `MatSink` a `.mat` (`sr`,
H x W x C, as `evaluate.py` saves it). `open_sink` writes under a temporary name that says which
host and process writes it (`.NAME.fuse-HOST-PID-RANDOM.tmpSUFFIX`) and renames it onto the output
when its block succeeds (as `fileio.atomic_file`): a killed run leaves no file under the final
name, and `clean_temporaries` removes what killed runs left.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.io
from absl import logging

from u2net_jax.data.rasters import TIFF_SUFFIXES, Raster, import_rasterio
from u2net_jax.io import fileio

OUTPUT_SUFFIXES = TIFF_SUFFIXES + ('.npy', '.mat')
BLOCK = 256  # GeoTIFF internal tile side; the default window is a multiple of it.


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
    rasterio = import_rasterio()
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
    if m and m['host'] == socket.gethostname() and not fileio.pid_alive(int(m['pid'])):
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


def _temporary(path: Path, suffix: str):
  """`fileio.atomic_file` with a temporary name that says which process writes it."""
  prefix = f'.{path.name}{TEMPORARY_TAG}{socket.gethostname()}-{os.getpid()}-'
  return fileio.atomic_file(path, suffix, prefix=prefix)


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
