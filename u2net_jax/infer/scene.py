"""The scene streaming engine: any *window fuser* over a PAN/MS scene of any size, window by window.

  result = network_fuser.fuse_files('workdirs/official_wv3', 'pan.tif', 'ms.tif', 'fused.tif')
  result = scene.fuse_files_with(my_window_fuser, 'pan.tif', 'ms.tif', 'fused.tif', max_value=2047)

`fuse_scene` walks the windows a `WindowFuser` plans (`WindowFuser.windows`, a deterministic
row-major order) and asks it for each fused window (`WindowFuser.fuse`); the engine does what every
fuser needs: reading (`SceneReader`: nodata found, values checked, holes filled, divided by the
sensor maximum), the nodata mask of each window's output, the conversion to the output dtype,
the sink (`io.raster_sinks`), the progress bar and the heap release after each window. Memory is
bounded by the window, not the scene. The network path (the official tiling over the tile grid,
`tiling.Fuser`) is one fuser, `infer.network_fuser.NetworkWindowFuser`; `fuse_files` builds it
from a workdir, `fuse_files_with` runs any fuser (e.g. a classical method's).

Inputs are `data.rasters` (GeoTIFF read by windows, `.npy`, `.mat`, `.h5`); before any work
`rasters.check_pair` refuses a pair that does not overlay or does not fit the fuser, and the
output is checked writable and not silently replaced (`raster_sinks.check_output`). Nodata pixels
(the PAN's or the MS's nodata mask, or a PAN of 0 when the files declare none) are written as
nodata. Every output is written under a temporary name and renamed at the end: a killed run
leaves no file under the final name.

Size: ~740 lines: the fuser protocol and its border helper, the reader every fuser shares, the
streaming loop and the checked entry point (`fuse_files_with`) are one engine; the readers, the
sinks, the resume journal and the network fuser (with `network_fuser.fuse_files`, a workdir's
network over a scene) are modules of their own.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from u2net_jax import errors
from u2net_jax.data import DataError, rasters
from u2net_jax.data.rasters import Raster
from u2net_jax.infer import scene_resume
from u2net_jax.io import raster_sinks
from u2net_jax.io.raster_sinks import Sink

# ---------------------------------------------------------------------------------------------
# The window fuser protocol.


class Window(NamedTuple):
  """One window of the output, in PAN pixels: rows y0..y1-1, columns x0..x1-1 (clipped to the
  image; it may be empty), and its share of the progress bar (`units`, in `WindowFuser.unit`)."""

  y0: int
  y1: int
  x0: int
  x1: int
  units: int = 1


class WindowFuser(abc.ABC):
  """What the engine asks of a fusion method: one fused window at a time.

  Exact signature (a subclass sets the attributes and implements `fuse`; the rest has defaults)::

    class WindowFuser(abc.ABC):
      bands: int            # output bands (= the MS bands)
      guide_bands: int = 1  # PAN (guide) bands the method takes
      scale: int = 4        # PAN pixels per MS pixel
      halo: int = 0         # PAN pixels of context a window reads beyond itself, each side
      unit: str = 'window'  # what the progress bar counts (`Window.units`)
      sensor_scale: bool = False  # strips on the sensor scale (float64), not in [0, 1]

      def windows(self, height: int, width: int, window: int) -> list[Window]
      def prepare(self, pan: SceneReader, ms: SceneReader) -> None
      def fuse(self, pan: SceneReader, ms: SceneReader, w: Window)
          -> Iterable[tuple[int, np.ndarray]]
      def identity(self) -> dict[str, Any]

  - `windows(height, width, window)`: the windows covering the PAN (height x width), about
    `window` x `window` pixels each, in the order they are fused and written; the default is a
    row-major grid of `window` x `window` squares (raise `DataError` for a `window` the method
    cannot use). The order must be deterministic (a resumed run, `fuse.py --resume`, continues it).
  - `prepare(pan, ms)`: called once before the first window, after every check of the inputs
    and the output: a first pass over the scene for methods with image-wide statistics (it may
    read the rasters window by window through the readers), or expensive setup (a network
    restores its weights here). Default: nothing. A resumed run calls it again.
  - `fuse(pan, ms, w)`: the fused window `w`, as strips from top to bottom: pairs (r, strip)
    with `strip` (rows, w.x1 - w.x0, bands) float32 in [0, 1] (the output scale is the engine's)
    for window rows r .. r + rows - 1; together the strips cover the window's w.y1 - w.y0 rows
    (a method may yield the whole window as one strip; strips keep the float32 copies a strip's,
    not the window's). Read the inputs through `pan(y0, y1, x0, x1)` / `ms(...)` (in-image
    coordinates: the PAN's for `pan`, the MS's for `ms`; the halo, and whatever border policy the
    method needs, are the method's: `read_padded` reads past the image border with numpy's
    'wrap', 'symmetric', 'reflect' or 'edge' rules). Reads never see NaN or nodata values (holes are
    filled by the nearest valid pixel of the region read); the engine writes the nodata pixels.
  - `identity()`: JSON-serialisable facts that decide the output's values (method, options,
    weights); a resumed run refuses a journal written by a fuser of another identity.
  """

  bands: int
  guide_bands: int = 1
  scale: int = 4
  halo: int = 0
  unit: str = 'window'
  sensor_scale: bool = False  # `fuse` strips on the sensor scale, not in [0, 1] (any float).

  def windows(self, height: int, width: int, window: int) -> list[Window]:
    return [
      Window(y0, min(y0 + window, height), x0, min(x0 + window, width))
      for y0 in range(0, height, window)
      for x0 in range(0, width, window)
    ]

  def prepare(self, pan: SceneReader, ms: SceneReader) -> None:  # noqa: B027 (optional hook)
    """The first pass over the scene (default: nothing)."""

  @abc.abstractmethod
  def fuse(self, pan: SceneReader, ms: SceneReader, w: Window) -> Iterable[tuple[int, np.ndarray]]:
    """The fused window `w` as (first row, (rows, width, bands) float32 in [0, 1]) strips."""

  def identity(self) -> dict[str, Any]:
    return {'fuser': type(self).__qualname__, 'bands': self.bands, 'halo': self.halo}


def read_padded(
  read, y0: int, y1: int, x0: int, x1: int, height: int, width: int, mode: str = 'wrap'
) -> np.ndarray:
  """image[y0:y1, x0:x1] for any rectangle, the pixels outside the image by numpy's pad `mode`.

  Reads only in-image pixels, as a few rectangles (the runs of consecutive source rows and
  columns); e.g. 'wrap' is MATLAB's `imfilter(..., 'circular')` border, 'symmetric' its
  'symmetric', 'edge' its 'replicate'.

  Args:
    read: `read(y0, y1, x0, x1)` -> (y1 - y0, x1 - x0, C), in-image coordinates only (a
      `SceneReader`).
    y0, y1, x0, x1: the rectangle, possibly beyond the image on any side.
    height, width: the image size.
    mode: 'wrap', 'symmetric', 'reflect' or 'edge'.

  Returns:
    (y1 - y0, x1 - x0, C).
  """
  iy, ix = _pad_index(y0, y1, height, mode), _pad_index(x0, x1, width, mode)
  out = None
  for ry in _runs(iy):
    for rx in _runs(ix):
      block = read(int(iy[ry][0]), int(iy[ry][-1]) + 1, int(ix[rx][0]), int(ix[rx][-1]) + 1)
      if out is None:
        out = np.empty((len(iy), len(ix), block.shape[-1]), block.dtype)
      out[np.ix_(ry, rx)] = block
  return out


def _pad_index(start: int, stop: int, size: int, mode: str) -> np.ndarray:
  """Source indices of positions start..stop-1 of a side of `size` padded by `mode`."""
  i = np.arange(start, stop)
  if mode == 'wrap':
    return i % size
  if mode == 'edge':
    return np.clip(i, 0, size - 1)
  if mode in ('symmetric', 'reflect'):
    period = 2 * size if mode == 'symmetric' else max(1, 2 * size - 2)
    i = i % period
    back = (2 * size - 1 - i) if mode == 'symmetric' else (period - i)
    return np.where(i < size, i, back)
  raise ValueError(f'mode must be wrap, symmetric, reflect or edge, got {mode!r}')


def _runs(index: np.ndarray) -> list[np.ndarray]:
  """Positions of `index` split into runs of consecutive increasing source indices."""
  breaks = np.flatnonzero(np.diff(index) != 1) + 1
  return np.split(np.arange(len(index)), breaks)


# ---------------------------------------------------------------------------------------------
# Reading.


class SceneReader:
  """One raster as a window fuser reads it: nodata found, values checked, holes filled, scaled.

  `reader(y0, y1, x0, x1)` -> (y1 - y0, x1 - x0, bands) float32 divided by the sensor maximum
  (`values`: the same on the sensor scale), in-image coordinates. A fuser reads the region of a
  window plus its halo; the nodata masks of the regions read for the current window are kept
  for the window's output pixels (`bad`), so nothing is read twice. A fuser never sees a NaN or
  a nodata value: those pixels take the value of the nearest valid pixel of the region (local
  interpolation), so a hole spoils only the output pixels it covers; they are written as
  nodata afterwards.

  Attributes:
    raster: the `rasters.Raster`.
    height, width, bands: its size.
    max_value: the sensor maximum the values are divided by.
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
    self.height, self.width, self.bands = raster.height, raster.width, raster.bands
    self._regions: list[tuple[int, int, np.ndarray]] = []  # The current window's masks.

  def start_window(self) -> None:
    """Forgets the masks of the previous window's regions."""
    self._regions = []

  def _mask(self, values: np.ndarray, y0: int, x0: int) -> np.ndarray:
    bad = self.raster.invalid(values, y0, x0, self.nodata)
    if self.zero_is_nodata:
      bad |= ~np.any(values != 0, axis=-1)
    return bad

  def __call__(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """[y0:y1, x0:x1] (y1 - y0, x1 - x0, bands) float32 in [0, 1], holes filled."""
    # As `pancollection.H5Source`: float32(x) / max.
    return self.values(y0, y1, x0, x1) / np.float32(self.max_value)

  def values(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """[y0:y1, x0:x1] as float32 on the sensor scale, holes filled (nothing divided)."""
    values = self.raster.read(y0, y1, x0, x1)
    bad = self._mask(values, y0, x0)
    if self.check_values:
      self._check(values, bad, y0, y1, x0, x1)
    x = values.astype(np.float32)
    if bad.any():
      x = _fill_holes(x, bad)
    self._regions.append((y0, x0, bad))
    return x

  def bad(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The nodata mask of [y0:y1, x0:x1]: from a region read for this window that covers it."""
    for ry, rx, mask in reversed(self._regions):
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


# ---------------------------------------------------------------------------------------------
# Streaming.


def fuse_scene(
  fuser: WindowFuser,
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
  windows: list[Window] | None = None,
  done: int = 0,
  nodata_pixels: int = 0,
  on_window: Any = None,
) -> dict[str, Any]:
  """Fuses a checked PAN/MS pair window by window into `sink`.

  An output pixel is nodata when a value it depends on (its PAN pixel, the MS pixel that
  covers it, any band) is NaN, infinite or the input's nodata value (a PAN of 0 in every band
  counts when no input declares nodata); such pixels are filled before fusing (`SceneReader`)
  and written as the output's nodata value.

  Args:
    fuser: the method (`WindowFuser`; `prepare` is called here, before the first window).
    pan, ms: the inputs (`check_pair` passed).
    sink: where the fused windows go (`sink.dtype`).
    max_value: the sensor maximum the inputs are divided by.
    window: PAN pixels per window side (`WindowFuser.windows`).
    nodata: the inputs' nodata value where a file declares none, and the output's
      (`output_nodata`); None: the files' own.
    progress: show a progress bar on stderr.
    check_values: refuse values off the 0..max_value scale (as `value_checks.scan_values`).
    out_scale: the output value of a fused 1.0 (default `max_value`; `--rescale_output` maps
      it onto the integer dtype's maximum).
    windows: the plan (`fuser.windows(...)`, already made); None makes it here.
    done: windows of the plan already in the sink (a resumed run) that are skipped.
    nodata_pixels: the nodata pixels of those windows.
    on_window: called as `on_window(i, nodata_pixels)` after window i is written (the resume
      journal), with the nodata pixels of windows 0..i.

  Returns:
    {'windows', 'seconds', 'nodata_pixels', 'nodata', UNITs} with UNIT `fuser.unit` + 's'
    (e.g. 'tiles': the units of the whole plan); 'resumed_windows' when `done`.

  Raises:
    DataError: a value off the scale (file, band, window and value named) or an unreadable
      window.
  """
  fill = output_nodata(pan, ms, sink.dtype, nodata)
  declared = nodata is not None or any(r.has_mask or r.nodata is not None for r in (pan, ms))
  readers = {
    r.role: SceneReader(r, max_value, nodata, r is pan and not declared, check_values)
    for r in (pan, ms)
  }
  if windows is None:
    windows = fuser.windows(pan.height, pan.width, window)
  total = sum(w.units for w in windows)
  bar = _Progress(total, progress, fuser.unit)
  bar.update(sum(w.units for w in windows[:done]))
  masked = nodata_pixels
  scale = out_scale or max_value
  if fuser.sensor_scale:  # Strips already on the sensor scale (float64: classical methods).
    scale = scale / max_value
  start = time.perf_counter()
  try:
    if done < len(windows):  # (A resumed run killed while writing the output has no window.)
      fuser.prepare(readers['PAN'], readers['MS'])
    for i in range(done, len(windows)):
      w = windows[i]
      for r in readers.values():
        r.start_window()
      block = np.empty((w.y1 - w.y0, w.x1 - w.x0, fuser.bands), sink.dtype)
      covered = 0
      for r0, strip in fuser.fuse(readers['PAN'], readers['MS'], w):
        block[r0 : r0 + len(strip)] = _to_output(strip, scale, sink.dtype)
        covered += len(strip)
        del strip
      if covered != len(block):
        raise ValueError(f'{type(fuser).__name__}.fuse gave {covered} rows of {len(block)}')
      if block.size:
        bad = _bad_pixels(readers, w.y0, w.y1, w.x0, w.x1, fuser.scale)
        if bad.any():
          masked += int(bad.sum())
          block[bad] = fill
        sink.write(w.y0, w.x0, block)
      del block
      if on_window is not None:
        on_window(i, masked)
      _release_free_heap()
      bar.update(w.units)
  finally:
    bar.close()
  result = {
    'windows': len(windows),
    'seconds': time.perf_counter() - start,
    'nodata_pixels': masked,
    'nodata': fill,
  }
  if fuser.unit != 'window':
    result[f'{fuser.unit}s'] = total
  if done:
    result['resumed_windows'] = done
  return result


def _bad_pixels(readers, y0, y1, x0, x1, scale) -> np.ndarray:
  """The nodata output pixels of a window: the PAN's, and the MS's repeated onto its pixels."""
  bad = readers['PAN'].bad(y0, y1, x0, x1).copy()
  # MS pixel (i, j) covers PAN pixels scale*i .. scale*i + scale - 1.
  m = readers['MS'].bad(y0 // scale, -(-y1 // scale), x0 // scale, -(-x1 // scale))
  m = np.repeat(np.repeat(m, scale, axis=0), scale, axis=1)
  bad |= m[y0 % scale : y0 % scale + y1 - y0, x0 % scale : x0 % scale + x1 - x0]
  return bad


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
  """Units (tiles) done, units/s and ETA on stderr (tqdm, installed with tensorflow-datasets)."""

  def __init__(self, total: int, enabled: bool, unit: str = 'tile'):
    self._bar = None
    if enabled:
      from tqdm import tqdm

      self._bar = tqdm(
        total=total,
        unit=unit,
        file=sys.stderr,
        smoothing=0.1,
        desc='fusing',
        # Always units/s (tqdm inverts slow rates to s/unit by default).
        bar_format='{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} ' + unit + 's '
        '[{elapsed}<{remaining}, {rate_noinv_fmt}]',
      )

  def update(self, n: int) -> None:
    if self._bar is not None and n:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


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


def fuse_files_with(
  fuser: WindowFuser,
  pan_path: str | os.PathLike,
  ms_path: str | os.PathLike,
  out_path: str | os.PathLike,
  *,
  max_value: float,
  dtype: str | None = None,
  window: int = 1024,
  overwrite: bool = False,
  cog: bool = False,
  pan_key: str | None = None,
  ms_key: str | None = None,
  progress: bool = True,
  nodata: float | None = None,
  allow_off_scale: bool = False,
  rescale_output: bool = False,
  resume: bool | str = False,
) -> dict[str, Any]:
  """Fuses a PAN/MS scene with any `WindowFuser` into `out_path`.

  Every check (flags, inputs, output, the window plan) happens before `fuser.prepare`; on any
  failure nothing is left under `out_path`.

  Args:
    fuser: the method.
    pan_path, ms_path: the inputs (`rasters.open_scene`).
    out_path: `.tif`/`.tiff`, `.npy` or `.mat`.
    max_value: the sensor maximum.
    dtype: stored dtype, e.g. 'float32' (default: the MS's dtype).
    window: PAN pixels per window side (`fuser.windows`).
    overwrite: replace an existing `out_path`.
    cog: write a Cloud-Optimized GeoTIFF.
    pan_key, ms_key: array names inside `.mat`/`.h5` inputs.
    progress: show a progress bar on stderr.
    nodata: the nodata value of inputs that declare none, and the output's (default: the
      inputs', else 0 for integer outputs and NaN for float ones).
    allow_off_scale: fuse values off the 0..max_value scale (already in [0, 1], above the
      maximum, negative) instead of refusing them.
    rescale_output: an integer `dtype` narrower than the data holds 0..max_value mapped onto
      its full range (without it such a dtype is refused: most pixels would clip).
    resume: keep a partial output and its journal beside the output, and continue the run they
      record after its last finished window (`infer.scene_resume`; `fuse.py --resume`);
      'restart': the same, but a journal of another run is replaced instead of refused (the
      archive's re-runs, whose options may have changed).

  Returns:
    `fuse_scene`'s summary plus 'output', 'shape', 'dtype', 'megapixels_per_s' and
    'temporaries' (`raster_sinks.clean_temporaries`: those of killed runs removed, or left).

  Raises:
    DataError: inputs that do not overlay or do not fit the method, a window it cannot use.
    fileio.OutputError: an existing (without `overwrite`) or unwritable output, or an input.
    errors.OptionError: a flag value that cannot work (`check_options`); with `resume`, a
      journal of another run or another run writing the same output.
  """
  dtype = check_options(max_value=max_value, dtype=dtype, window=window, nodata=nodata)
  with contextlib.ExitStack() as stack:
    stack.enter_context(rasters.gdal_env())
    scene = rasters.open_scene(  # The data layer's one entry; the pair checked (`check_pair`).
      pan_path,
      ms_path,
      scale=fuser.scale,
      bands=fuser.bands,
      guide_bands=fuser.guide_bands,
      max_value=max_value,
      pan_key=pan_key,
      ms_key=ms_key,
    )
    stack.callback(scene.close)
    pan, ms = scene.pan, scene.ms
    out = raster_sinks.check_output(out_path, overwrite, {'PAN': pan_path, 'MS': ms_path})
    windows = fuser.windows(pan.height, pan.width, window)
    out_dtype = dtype or ms.dtype
    if out_dtype.kind not in 'uif':
      raise errors.OptionError(f'the MS is {out_dtype}, not numeric; pass --dtype=float32')
    max_value = float(max_value)
    out_scale = _output_scale(out_dtype, max_value, rescale_output)
    output_nodata(pan, ms, out_dtype, nodata)  # Refused now rather than after the fusion.
    temporaries = raster_sinks.clean_temporaries(out)
    run = dict(
      max_value=max_value,
      window=window,
      nodata=nodata,
      progress=progress,
      check_values=not allow_off_scale,
      out_scale=out_scale,
      windows=windows,
    )
    if resume:
      inputs = {
        'PAN': scene_resume.input_identity(pan_path, pan_key),
        'MS': scene_resume.input_identity(ms_path, ms_key),
      }
      restart = resume == 'restart'
      result = _fuse_resumable(fuser, pan, ms, out, out_dtype, cog, inputs, restart, **run)
    else:
      if scene_resume.partial_run_exists(out):
        logging.warning(
          'A --resume run of %s left its partial output (%s); pass --resume to continue it.',
          out,
          scene_resume.paths(out)['npy'],
        )
      with raster_sinks.open_sink(out, pan, ms, out_dtype, cog=cog) as sink:
        result = fuse_scene(fuser, pan, ms, sink, **run)
        sink.finish(result['nodata'])
  megapixels = pan.height * pan.width / 1e6
  return dict(
    result,
    output=str(out),
    shape=[pan.height, pan.width, ms.bands],
    dtype=out_dtype.name,
    megapixels_per_s=megapixels / result['seconds'],
    temporaries=temporaries,
  )


def _fuse_resumable(fuser, pan, ms, out, dtype, cog, inputs, restart, **run) -> dict[str, Any]:
  """`fuse_scene` into a partial output with a journal (`scene_resume`), then the output.

  The output is written from the partial output in the plan's window order with the same
  blocks as an uninterrupted run writes: the same file.
  """
  windows = run['windows']
  fill = output_nodata(pan, ms, dtype, run['nodata'])
  options = {
    'max_value': run['max_value'],
    'out_scale': run['out_scale'] or run['max_value'],
    'nodata': run['nodata'],
    'fill': fill,
    'check_values': run['check_values'],
  }
  shape = (pan.height, pan.width, fuser.bands)
  record = scene_resume.record(
    inputs=inputs,
    fuser=fuser.identity(),
    options=options,
    windows=windows,
    shape=shape,
    dtype=dtype,
  )
  journal = scene_resume.Journal(out, record, restart_other=restart)
  with journal.open(*shape, dtype) as partial:
    result = fuse_scene(
      fuser,
      pan,
      ms,
      partial,
      done=journal.done,
      nodata_pixels=journal.nodata_pixels,
      on_window=lambda i, masked: journal.window_done(i, masked, partial),
      **run,
    )
    with raster_sinks.open_sink(out, pan, ms, dtype, cog=cog) as sink:
      for w in windows:
        if w.y1 > w.y0 and w.x1 > w.x0:
          sink.write(w.y0, w.x0, np.array(partial.map[w.y0 : w.y1, w.x0 : w.x1]))
      sink.finish(result['nodata'])
    journal.remove()
  return result


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
