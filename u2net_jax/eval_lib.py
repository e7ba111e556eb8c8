"""Evaluation: the paper's protocols on a workdir's checkpoint, with tables, files and pictures.

`evaluate(config, workdir)` restores the best (or a given) checkpoint of a workdir -- a training
run or official weights converted by `python -m u2net_jax.convert` -- fuses every image of each
test set and writes, per test set, into `workdir/eval/<test set>/`:

  table.txt               mean ± std per metric, the fused images and the upsampled MS ('EXP',
                          the `lms` baseline of the paper's tables), also printed
  metrics.json            means, stds and per-image values of both rows, plus provenance
  per_image.csv           one line per image and row
  output_mulExm_{k}.mat   `sr`, H x W x C on the sensor scale, as the official `test.py` saves it
                          (k from 0), so the MATLAB toolbox can re-check the numbers
  preview_{k}_*.png       natural-colour composites of lms / fused / gt and the guide, the
                          absolute error map, and all of them side by side (`preview_{k}.png`)

Protocols (`u2net_jax.metrics`, the conventions of `../shared/metrics/README.md`):
  'reduced' (pansharpening, the file has `gt`): PSNR, Q2n (Q8 / Q4), Q_avg, SAM, ERGAS, SCC;
  'full' (pansharpening, no `gt`): D_lambda, D_s, QNR, D_lambda_K and HQNR (the paper's "QNR");
  'hisr': PSNR, SSIM, SAM, ERGAS.

Inference (`Fuser`): 'tiled' (default) is the official `test.py` procedure exactly -- the image
divided by the sensor maximum, the guide reflect-padded by `tile_pad` (4) pixels and the MS by
tile_pad / 4 (1) pixel, a zero canvas of H + 64 - (H mod 64) by W + 64 - (W mod 64) (so a side
that is already a multiple of 64 gets one extra row of tiles over zeros, as there), 64 x 64 tiles
read with their margins (72 x 72 guide, 18 x 18 MS inputs), the output clamped to [0, 1], the
central 64 x 64 kept, times the sensor maximum, cropped to H x W. The tiles of consecutive images
run through ONE jitted function in batches of `config.eval.tile_batch` (the last batch padded),
so it compiles once for every image size. The tile size matters beyond the borders: the S2Block's
spectral scaling depends on the token count, so tiled and whole-image results differ everywhere.
HISR uses the same procedure with the RGB guide (the official HISR test script may tile
differently; this is the documented pansharpening procedure applied to both tasks). 'whole' runs
each image in one call (clamped likewise); memory grows with the image.

A failed run leaves no half-written results: each test set is written into a temporary folder
beside its destination and renamed into place when complete (an earlier result stays until then).
"""

from __future__ import annotations

import collections
import copy
import csv
import functools
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.io
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from u2net_jax import checkpointing, config_utils, input_pipeline, metrics, models
from u2net_jax.data import DataError

MODES = ('tiled', 'whole')
METHOD, BASELINE = 'U2Net', 'EXP'  # Row names: the fused images and the upsampled MS (`lms`).
# Natural-colour bands (red, green, blue; 0-based) by band count: WV3/WV2 (coastal, blue,
# green, yellow, red, red edge, NIR1, NIR2) -> 5, 3, 2 in the toolbox's 1-based numbering;
# QB/GF-2/IKONOS/GeoEye-1 (blue, green, red, NIR); CAVE/Harvard 400..700 nm by 10 nm -> 650,
# 550 and 450 nm.
RGB_BANDS = {8: (4, 2, 1), 4: (2, 1, 0), 31: (25, 15, 5)}
STRETCH_PERCENTILES = (2.0, 98.0)


class OutputError(OSError):
  """The evaluation's output folder cannot be created or written."""


# ---------------------------------------------------------------------------------------------
# Tiling (the official test.py procedure).


def tile_grid(height: int, width: int, tile: int = 64) -> tuple[int, int]:
  """Rows and columns of tiles: the official canvas is H + tile - (H mod tile) per side."""
  return (height + tile - height % tile) // tile, (width + tile - width % tile) // tile


def _check_geometry(tile: int, pad: int, scale: int) -> None:
  if tile % scale or pad % scale or tile <= 0 or pad < 0:
    raise ValueError(
      f'config.eval.tile_size ({tile}) and tile_pad ({pad}) must be non-negative multiples of '
      f'the scale {scale}'
    )


def extract_tiles(
  ms: np.ndarray, guide: np.ndarray, *, tile: int = 64, pad: int = 4, scale: int = 4
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts one image into the official test.py tiles, margins included.

  Args:
    ms: (h, w, C) low-resolution image in [0, 1].
    guide: (scale*h, scale*w, c) PAN or RGB in [0, 1].
    tile: guide tile side (64).
    pad: guide margin (4); the MS margin is pad / scale (1).
    scale: guide / MS ratio (4).

  Returns:
    ms_tiles (T, (tile + 2 pad)/scale, same, C) and guide_tiles (T, tile + 2 pad, same, c),
    row-major over the `tile_grid` of the image.
  """
  _check_geometry(tile, pad, scale)
  big_h, big_w = guide.shape[:2]
  h, w = ms.shape[:2]
  if (big_h, big_w) != (scale * h, scale * w):
    raise ValueError(f'guide {guide.shape} is not {scale}x the ms {ms.shape}')
  rows, cols = tile_grid(big_h, big_w, tile)
  t, p = tile // scale, pad // scale
  # Reflect padding as torch's F.pad(mode='reflect') (the edge sample is not repeated), then
  # zeros up to the canvas.
  canvas_g = np.zeros((rows * tile + 2 * pad, cols * tile + 2 * pad, guide.shape[2]), np.float32)
  canvas_g[: big_h + 2 * pad, : big_w + 2 * pad] = np.pad(
    guide, ((pad, pad), (pad, pad), (0, 0)), mode='reflect'
  )
  canvas_m = np.zeros((rows * t + 2 * p, cols * t + 2 * p, ms.shape[2]), np.float32)
  canvas_m[: h + 2 * p, : w + 2 * p] = np.pad(ms, ((p, p), (p, p), (0, 0)), mode='reflect')
  g_side, m_side = tile + 2 * pad, t + 2 * p
  ms_tiles, guide_tiles = [], []
  for i in range(rows):
    for j in range(cols):
      guide_tiles.append(canvas_g[i * tile : i * tile + g_side, j * tile : j * tile + g_side])
      ms_tiles.append(canvas_m[i * t : i * t + m_side, j * t : j * t + m_side])
  return np.stack(ms_tiles), np.stack(guide_tiles)


def assemble_tiles(
  tiles: np.ndarray, height: int, width: int, *, tile: int = 64, pad: int = 4
) -> np.ndarray:
  """Puts the central tile x tile of each output tile back and crops to the image.

  Args:
    tiles: (T, tile + 2 pad, tile + 2 pad, C) network outputs, row-major over the grid.
    height, width: the guide's size.
    tile, pad: as in `extract_tiles`.

  Returns:
    (height, width, C).
  """
  rows, cols = tile_grid(height, width, tile)
  if len(tiles) != rows * cols:
    raise ValueError(f'{len(tiles)} tiles for a {rows} x {cols} grid')
  core = tiles[:, pad : pad + tile, pad : pad + tile]
  canvas = core.reshape(rows, cols, tile, tile, -1).transpose(0, 2, 1, 3, 4)
  return canvas.reshape(rows * tile, cols * tile, -1)[:height, :width]


# ---------------------------------------------------------------------------------------------
# Inference.


@functools.partial(jax.jit, static_argnums=0)
def fused_output(model: models.U2Net, params, ms: jax.Array, guide: jax.Array) -> jax.Array:
  """The network output clamped to [0, 1], as test.py does (the raw output is not confined
  there: -0.67..2.94 on a real WV3 pair). Compiled once per model and input shape."""
  return jnp.clip(model.apply({'params': params}, ms, guide), 0.0, 1.0)


class Fuser:
  """Runs a U2Net on whole images, tiled like the official test.py or in one piece.

  Usable on its own (e.g. in a notebook)::

    fuser = Fuser(config.model, params, mode='tiled')
    fused = fuser(ms, guide)  # (h, w, C), (4h, 4w, c) in [0, 1] -> (4h, 4w, C) in [0, 1]

  The tiles go through one jitted function in fixed-size batches sharded over the local devices
  (the batch is rounded up to a multiple of their number).
  """

  def __init__(
    self,
    model_config: Mapping[str, Any],
    params: Any,
    *,
    mode: str = 'tiled',
    tile_size: int = 64,
    tile_pad: int = 4,
    tile_batch: int = 16,
  ):
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    self.model = models.U2Net(**dict(model_config))
    self.mode = mode
    self.tile, self.pad, self.scale = int(tile_size), int(tile_pad), self.model.scale
    _check_geometry(self.tile, self.pad, self.scale)
    devices = jax.local_devices()
    # Auto axis type: the compiler propagates the shardings; the model never mentions devices.
    self.mesh = jax.make_mesh(
      (len(devices),),
      (input_pipeline.BATCH_AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=devices,
    )
    n = len(devices)
    self.tile_batch = max(1, -(-int(tile_batch) // n) * n)
    self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))

  def _run(self, ms: np.ndarray, guide: np.ndarray) -> jax.Array:
    spec = PartitionSpec(input_pipeline.BATCH_AXIS) if self.mode == 'tiled' else PartitionSpec()
    sharding = NamedSharding(self.mesh, spec)
    ms, guide = jax.device_put(ms, sharding), jax.device_put(guide, sharding)
    return fused_output(self.model, self.params, ms, guide)

  def __call__(self, ms: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """Fuses one image: ms (h, w, C), guide (4h, 4w, c) in [0, 1] -> (4h, 4w, C) in [0, 1]."""
    ((_, fused),) = self.fuse_all([{'ms': ms, 'guide': guide}])
    return fused

  def fuse_all(self, examples: Iterable[Mapping[str, np.ndarray]]) -> Iterator[tuple[dict, Any]]:
    """Fuses a stream of examples, in order.

    Args:
      examples: dicts with 'ms' (h, w, C) and 'guide' (4h, 4w, c) in [0, 1] (other roles are
        passed through).

    Yields:
      (example, fused (4h, 4w, C) float32 in [0, 1]) in input order.
    """
    if self.mode == 'whole':
      for ex in examples:
        self._check_example(ex)
        yield ex, np.asarray(self._run(ex['ms'][None], ex['guide'][None])[0])
      return
    yield from self._fuse_tiled(examples)

  def _check_example(self, ex: Mapping[str, np.ndarray]) -> None:
    h, w = ex['ms'].shape[:2]
    if tuple(ex['guide'].shape[:2]) != (self.scale * h, self.scale * w):
      raise DataError(
        f'guide {ex["guide"].shape} and ms {ex["ms"].shape}: the guide must be {self.scale}x the '
        'ms size'
      )

  def _fuse_tiled(self, examples):
    # Tiles of consecutive images share batches; an image is returned once all its tiles ran.
    waiting: collections.deque = collections.deque()  # (example, number of tiles)
    queued_ms, queued_guide, done = [], [], []
    queued = finished = 0

    def run_batch(final: bool):
      nonlocal queued, finished
      ms, guide = np.concatenate(queued_ms), np.concatenate(queued_guide)
      take = len(ms) if final else self.tile_batch
      batch_ms, batch_guide = ms[:take], guide[:take]
      short = self.tile_batch - take
      if short:  # Pad with zero tiles so that the jitted function never recompiles.
        batch_ms = np.concatenate([batch_ms, np.zeros((short,) + ms.shape[1:], ms.dtype)])
        batch_guide = np.concatenate([batch_guide, np.zeros((short,) + guide.shape[1:], ms.dtype)])
      done.append(np.asarray(self._run(batch_ms, batch_guide))[:take])
      queued_ms[:], queued_guide[:] = [ms[take:]], [guide[take:]]
      queued -= take
      finished += take

    def ready():
      nonlocal finished
      while waiting and finished >= waiting[0][1]:
        ex, n = waiting.popleft()
        out = np.concatenate(done)
        done[:] = [out[n:]]
        finished -= n
        big_h, big_w = ex['guide'].shape[:2]
        yield ex, assemble_tiles(out[:n], big_h, big_w, tile=self.tile, pad=self.pad)

    for ex in examples:
      self._check_example(ex)
      ms_tiles, guide_tiles = extract_tiles(
        ex['ms'], ex['guide'], tile=self.tile, pad=self.pad, scale=self.scale
      )
      waiting.append((ex, len(ms_tiles)))
      queued_ms.append(ms_tiles)
      queued_guide.append(guide_tiles)
      queued += len(ms_tiles)
      while queued >= self.tile_batch:
        run_batch(final=False)
      yield from ready()
    if queued:
      run_batch(final=True)
    yield from ready()


# ---------------------------------------------------------------------------------------------
# Test sets.


def parse_test_files(spec: str | Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
  """Parses `--test_files`: 'name=path.h5,...' (HDF5 files) and bare names (test sets of the
  config, or TFDS splits when `config.data.source == 'tfds'`).

  Returns:
    name -> path ('' for a bare name), in order.
  """
  if not spec:
    return {}
  if isinstance(spec, Mapping):
    return {str(k): str(v) for k, v in spec.items()}
  items = spec.split(',') if isinstance(spec, str) else list(spec)
  out = {}
  for item in (i.strip() for i in items):
    if not item:
      continue
    name, sep, path = item.partition('=')
    name = name.strip()
    if sep and not path.strip():
      raise ValueError(f'--test_files: {item!r} has an empty path (expected name=path.h5)')
    if name in out:
      raise ValueError(f'--test_files: test set {name!r} is given twice')
    out[name] = path.strip()
  return out


def _check_name(name: str) -> None:
  if not name or name.startswith('.') or '/' in name or os.sep in name or name != name.strip():
    raise ValueError(f'test set name {name!r} cannot be a folder name under workdir/eval')


def _canonical_sensor(name: str) -> str:
  try:
    return metrics.get_sensor(name)['name']
  except ValueError:
    return str(name).strip()


def _file_sensor(path: str) -> str | None:
  """The `sensor` attribute our preparers write into HDF5 files, if any."""
  from u2net_jax.data import pancollection

  with pancollection.open_h5(path) as f:
    value = f.attrs.get('sensor')
  if value is None:
    return None
  if isinstance(value, bytes | np.bytes_):
    value = value.decode()
  return str(np.asarray(value).reshape(-1)[0]) if np.ndim(value) else str(value)


def resolve_sensor(config, sensor: str | None, *, file_sensor: str | None, where: str) -> str:
  """The sensor whose conventions (MTF gains, RGB bands) are used for one test set.

  Args:
    config: the workdir's config (`config.data.sensor`: the model's sensor).
    sensor: the `--sensor` override (e.g. WV2 data through a WV3 model, the paper's
      generalisation test) or None.
    file_sensor: the test file's `sensor` attribute, if it has one.
    where: the test set and file, for messages.

  Returns:
    The canonical sensor name.

  Raises:
    DataError: an unknown sensor, one whose band count or maximum differs from the model's, or
      a file that says it comes from another sensor.
  """
  used = _canonical_sensor(sensor or config.data.sensor)
  if config.task != 'hisr':
    try:
      info = metrics.get_sensor(used)
    except ValueError as e:
      raise DataError(f'{where}: {e}') from e
    bands = config.model.spectral_bands
    if len(info['ms_gnyq']) != bands:
      raise DataError(
        f'{where}: sensor {used} has {len(info["ms_gnyq"])} bands but the model has '
        f'spectral_bands={bands} (config.data.sensor = {config.data.sensor})'
      )
    if float(info['max_value']) != float(config.data.max_value):
      raise DataError(
        f'{where}: sensor {used} is on a 0..{info["max_value"]} scale but the model uses '
        f'config.data.max_value = {config.data.max_value:g}'
      )
  if file_sensor is not None and _canonical_sensor(file_sensor) != used:
    raise DataError(
      f"{where}: the file's sensor attribute is {file_sensor!r} but the evaluation uses sensor "
      f'{used!r} (the model is for {config.data.sensor}); pass --sensor {file_sensor} to '
      'evaluate it with its own MTF gains'
    )
  if used != _canonical_sensor(config.data.sensor):
    logging.warning(
      '%s: the model was configured for %s; evaluating %s data with %s conventions '
      '(generalisation test)',
      where,
      config.data.sensor,
      used,
      used,
    )
  return used


class TestSet:
  """One test set: its source, protocol and sensor (validated before any inference)."""

  __test__ = False  # Not a pytest class.

  def __init__(self, config, name: str, path: str, sensor: str | None):
    _check_name(name)
    self.name = name
    cfg = copy.deepcopy(config)
    if path:  # An HDF5 file given on the command line.
      with cfg.unlocked():
        cfg.data.source = 'hdf5'
        cfg.data.test_files = {name: path}
    elif name not in config.data.test_files:
      if config.data.source != 'tfds':
        raise DataError(
          f'unknown test set {name!r}: the config has {sorted(config.data.test_files.keys())}; '
          'give a file as name=path.h5'
        )
      with cfg.unlocked():  # Any split of the TFDS dataset.
        cfg.data.test_files[name] = ''
    self.config = cfg
    self.source = input_pipeline.get_source(cfg, name)
    self.file = getattr(self.source, 'path', None) or (path or cfg.data.test_files.get(name, ''))
    where = f'test set {name!r} ({self.file or cfg.data.source})'
    if not len(self.source):
      raise DataError(f'{where}: no examples')
    file_sensor = _file_sensor(self.source.path) if hasattr(self.source, 'path') else None
    self.sensor = resolve_sensor(config, sensor, file_sensor=file_sensor, where=where)
    first = self.source[0]
    has_gt = 'gt' in first
    if config.task == 'hisr':
      self.protocol = 'hisr'
      if not has_gt:
        raise DataError(f'{where}: HISR evaluation needs the reference (role gt)')
    else:
      self.protocol = 'reduced' if has_gt else 'full'
    self.shape = first['guide'].shape[:2]
    self._check_sizes(config, where)

  def _check_sizes(self, config, where: str) -> None:
    h, w = self.shape
    block = config.eval.block
    if self.protocol == 'full' and (h % block or w % block):
      raise DataError(
        f'{where}: {h}x{w} images; full-resolution metrics need multiples of '
        f'config.eval.block = {block}'
      )
    if self.protocol == 'reduced' and min(h, w) - 2 * config.eval.crop + 1 < block:
      raise DataError(
        f'{where}: {h}x{w} images cropped by config.eval.crop = {config.eval.crop} are smaller '
        f'than config.eval.block = {block}'
      )

  def __len__(self) -> int:
    return len(self.source)

  def examples(self) -> Iterator[dict[str, np.ndarray]]:
    for i in range(len(self.source)):
      yield self.source[i]

  def reference(self, index: int, example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The roles on the sensor scale in float64 for the metrics: read back from the HDF5 file
    when there is one (the toolbox sees the file's values, not float32 / max * max)."""
    max_value = float(self.config.data.max_value)
    roles = getattr(self.source, 'roles', None)
    if hasattr(self.source, 'path') and isinstance(roles, Mapping):
      from u2net_jax.data import pancollection

      with pancollection.open_h5(self.source.path) as f:
        return {
          r: np.ascontiguousarray(np.asarray(f[k][index], np.float64).transpose(1, 2, 0))
          for r, k in roles.items()
        }
    return {r: np.asarray(x, np.float64) * max_value for r, x in example.items()}


def select_test_sets(config, test_files=None, sensor: str | None = None) -> list[TestSet]:
  """Opens and validates every test set before anything runs.

  Args:
    config: the workdir's config.
    test_files: `parse_test_files` input; None or empty: every test set of the config.
    sensor: the `--sensor` override.
  """
  spec = parse_test_files(test_files) or {k: '' for k in config.data.test_files.keys()}
  if not spec:
    raise DataError('no test sets: config.data.test_files is empty and none were given')
  return [TestSet(config, name, path, sensor) for name, path in spec.items()]


# ---------------------------------------------------------------------------------------------
# Metrics of one image.


def image_metrics(test_set: TestSet, ref: Mapping[str, np.ndarray], out: np.ndarray) -> dict:
  """The protocol's metrics of one image.

  Args:
    test_set: the test set (protocol, sensor, config).
    ref: roles on the sensor scale (float64), from `TestSet.reference`.
    out: (H, W, C) estimate on the sensor scale.
  """
  cfg = test_set.config
  max_value = float(cfg.data.max_value)
  if test_set.protocol == 'reduced':
    return metrics.reduced_resolution_metrics(
      ref['gt'], out, max_value, ratio=cfg.model.scale, crop=cfg.eval.crop, block=cfg.eval.block
    )
  if test_set.protocol == 'full':
    return metrics.full_resolution_metrics(
      out, ref['lms'], ref['guide'][..., 0], test_set.sensor, cfg.model.scale, cfg.eval.block
    )
  return metrics.hisr_metrics(ref['gt'] / max_value, out / max_value, ratio=cfg.model.scale)


# ---------------------------------------------------------------------------------------------
# Pictures.


def rgb_bands(bands: int) -> tuple[int, int, int] | tuple[int]:
  """The bands shown as red, green, blue (one grey band below three bands)."""
  if bands in RGB_BANDS:
    return RGB_BANDS[bands]
  if bands < 3:
    return (0,)
  return (3 * bands // 4, bands // 2, bands // 4)


def stretch_limits(image: np.ndarray, bands) -> tuple[np.ndarray, np.ndarray]:
  """Per-band 2% and 98% percentiles of `image` (H, W, C) over the chosen bands."""
  sel = image[..., list(bands)].reshape(-1, len(bands))
  lo, hi = np.percentile(sel, STRETCH_PERCENTILES, axis=0)
  return lo, np.maximum(hi, lo + 1e-12)


def composite(image: np.ndarray, bands, limits) -> np.ndarray:
  """(H, W, C) -> (H, W, 3) uint8: the chosen bands linearly stretched between `limits`."""
  lo, hi = limits
  x = (image[..., list(bands)] - lo) / (hi - lo)
  x = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def colormap(values: np.ndarray, vmax: float) -> np.ndarray:
  """(H, W) -> (H, W, 3) uint8 with a jet-like colour map on [0, vmax] (dark blue to red)."""
  t = np.clip(values / vmax, 0.0, 1.0)
  rgb = np.stack([np.clip(1.5 - np.abs(4.0 * t - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], -1)
  return np.round(rgb * 255.0).astype(np.uint8)


def previews(
  fused: np.ndarray, ref: Mapping[str, np.ndarray], *, max_value: float, error_max: float
) -> dict[str, np.ndarray]:
  """The preview images of one example (all on the sensor scale).

  The same stretch (2%-98% of the reference, or of `lms` without one) is used for lms, fused and
  gt so that they compare. The error map is the mean over bands of |fused - gt| / max_value on a
  colour scale from 0 to `error_max`.

  Returns:
    name -> (H, W, 3) uint8: 'lms', 'fused', 'gt' and 'error' (with a reference), 'guide', and
    'panel' (all side by side, 4-pixel white gaps).
  """
  bands = rgb_bands(fused.shape[-1])
  anchor = ref['gt'] if 'gt' in ref else ref['lms']
  limits = stretch_limits(anchor, bands)
  out = {'lms': composite(ref['lms'], bands, limits), 'fused': composite(fused, bands, limits)}
  if 'gt' in ref:
    out['gt'] = composite(ref['gt'], bands, limits)
    err = np.abs(fused - ref['gt']).mean(axis=-1) / max_value
    out['error'] = colormap(err, error_max)
  guide = ref['guide']
  g_bands = (0, 1, 2)[: min(3, guide.shape[-1])] if guide.shape[-1] >= 3 else (0,)
  out['guide'] = composite(guide, g_bands, stretch_limits(guide, g_bands))
  h = fused.shape[0]
  gap = np.full((h, 4, 3), 255, np.uint8)
  parts = [out[k] for k in ('lms', 'fused', 'gt', 'error', 'guide') if k in out]
  out['panel'] = np.concatenate([p for part in parts for p in (part, gap)][:-1], axis=1)
  return out


# ---------------------------------------------------------------------------------------------
# Output files.


def _display_names(protocol: str, bands: int) -> dict[str, str]:
  if protocol == 'reduced':
    return {'Q2n': f'Q{2 ** math.ceil(math.log2(bands))}'}  # Q8 / Q4 as the tables call it.
  return {}


def format_report(result: Mapping[str, Any]) -> str:
  """The printed table of one test set: a title line, mean ± std per metric, notes."""
  names = _display_names(result['protocol'], result['bands'])
  rows = {
    method: {names.get(k, k): v for k, v in agg.items()}
    for method, agg in ((m, _agg_tuples(result['methods'][m])) for m in result['methods'])
  }
  title = (
    f'{result["test_set"]}: {result["protocol"]} resolution, {result["num_images"]} images '
    f'{result["image_size"][0]}x{result["image_size"][1]}, sensor {result["sensor"]}, '
    f'step {result["step"]}, {result["mode"]} inference'
  )
  if result['protocol'] == 'hisr':
    title = title.replace('hisr resolution', 'HISR')
  notes = {
    'reduced': f'PSNR on the whole image; the others on the image cropped by {result["crop"]} '
    'px (config.eval.crop). EXP = the upsampled MS (lms).',
    'full': "HQNR is the paper's 'QNR' column (QNR: the classic D_lambda). EXP = the "
    'upsampled MS (lms).',
    'hisr': 'EXP = the upsampled HSI (lms).',
  }[result['protocol']]
  return f'{title}\n{metrics.format_table(rows)}\n{notes}\n'


def _agg_tuples(method: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
  return {k: (method['mean'][k], method['std'][k]) for k in method['mean']}


def _csv_text(per_image: Mapping[str, list[dict]]) -> str:
  buf = io.StringIO()
  keys = list(next(iter(per_image.values()))[0])
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['image', 'method', *keys])
  n = len(next(iter(per_image.values())))
  for k in range(n):
    for method, rows in per_image.items():
      writer.writerow([k, method, *(repr(float(rows[k][m])) for m in keys)])
  return buf.getvalue()


def _save_png(path: Path, image: np.ndarray) -> None:
  Image.fromarray(image).save(path, format='PNG')


def _prepare_output_root(root: Path) -> None:
  """Creates `root` and proves it writable before any work is done."""
  try:
    root.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=root, prefix='.write-test-')
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise OutputError(f'cannot write evaluation outputs to {root}: {e}') from e


class _AtomicDir:
  """A temporary folder beside `final`, renamed onto it on success, removed on failure."""

  def __init__(self, final: Path):
    self.final = final

  def __enter__(self) -> Path:
    try:
      self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f'.{self.final.name}.tmp-'))
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; results are not.
    except OSError as e:
      raise OutputError(f'cannot write evaluation outputs to {self.final.parent}: {e}') from e
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    old = None
    if self.final.exists():
      old = self.final.with_name(f'.{self.final.name}.old-{os.getpid()}')
      os.replace(self.final, old)
    os.replace(self.tmp, self.final)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return False


# ---------------------------------------------------------------------------------------------
# The evaluation.


def _eval_option(config, name: str, default):
  # Workdirs written before a field existed keep working.
  return config.eval.get(name, default)


def evaluate_test_set(
  test_set: TestSet,
  fuser: Fuser,
  out_dir: Path,
  *,
  step: int,
  save_images: bool = True,
  error_max: float = 0.1,
  verbose: bool = True,
) -> dict[str, Any]:
  """Fuses, scores and saves one test set into `out_dir/<name>` (atomically).

  Returns:
    The contents of `metrics.json` (plus 'table' and 'dir').
  """
  cfg = test_set.config
  max_value = float(cfg.data.max_value)
  per_image = {METHOD: [], BASELINE: []}
  times = {'inference': 0.0, 'metrics': 0.0, 'files': 0.0}
  final = out_dir / test_set.name
  with _AtomicDir(final) as tmp:
    start = time.perf_counter()
    for k, (example, fused) in enumerate(fuser.fuse_all(test_set.examples())):
      t0 = time.perf_counter()
      times['inference'] += t0 - start
      sr = np.asarray(fused, np.float32) * np.float32(max_value)  # As test.py: x max value.
      ref = test_set.reference(k, example)
      per_image[METHOD].append(image_metrics(test_set, ref, sr.astype(np.float64)))
      per_image[BASELINE].append(image_metrics(test_set, ref, ref['lms']))
      t1 = time.perf_counter()
      times['metrics'] += t1 - t0
      if save_images:
        scipy.io.savemat(tmp / f'output_mulExm_{k}.mat', {'sr': sr})
        pictures = previews(sr, ref, max_value=max_value, error_max=error_max)
        for what, picture in pictures.items():
          name = f'preview_{k}.png' if what == 'panel' else f'preview_{k}_{what}.png'
          _save_png(tmp / name, picture)
      start = time.perf_counter()
      times['files'] += start - t1
      logging.info('%s: image %d/%d %s', test_set.name, k + 1, len(test_set), per_image[METHOD][-1])
    result = {
      'test_set': test_set.name,
      'file': str(test_set.file),
      'protocol': test_set.protocol,
      'sensor': test_set.sensor,
      'model_sensor': cfg.data.sensor,
      'max_value': max_value,
      'bands': int(cfg.model.spectral_bands),
      'mode': fuser.mode,
      'step': int(step),
      'num_images': len(per_image[METHOD]),
      'image_size': [int(s) for s in test_set.shape],
      'crop': int(cfg.eval.crop) if test_set.protocol == 'reduced' else 0,
      'methods': {},
      'seconds': times,
    }
    for method, rows in per_image.items():
      agg = metrics.aggregate(rows)
      result['methods'][method] = {
        'mean': {k: v[0] for k, v in agg.items()},
        'std': {k: v[1] for k, v in agg.items()},
        'per_image': rows,
      }
    table = format_report(result)
    (tmp / 'table.txt').write_text(table)
    (tmp / 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
    (tmp / 'per_image.csv').write_text(_csv_text(per_image))
  if verbose:
    print(table, flush=True)
  return dict(result, table=table, dir=str(final))


def evaluate(
  config: ml_collections.ConfigDict | None,
  workdir: str | Path,
  *,
  step: int | None = None,
  which: str = 'best',
  test_files=None,
  sensor: str | None = None,
  mode: str | None = None,
  tile_batch: int | None = None,
  output_dir: str | Path | None = None,
  save_images: bool | None = None,
  verbose: bool = True,
) -> dict[str, dict[str, Any]]:
  """Evaluates a workdir's checkpoint on test sets with the paper's protocols.

  Args:
    config: the run's config; None reads `workdir/config.json`.
    workdir: a training run's or a converted checkpoint's workdir.
    step: the checkpoint step; None: the best one by validation loss (else the latest).
    which: 'best' or 'latest' when `step` is None.
    test_files: 'name=path.h5,...' / bare test-set or TFDS split names / a dict; None: every
      test set of `config.data.test_files`.
    sensor: evaluate as this sensor's data (MTF gains of HQNR, RGB bands) instead of
      `config.data.sensor`, e.g. WV2 files through a WV3 model.
    mode: 'tiled' or 'whole' (default `config.eval.mode`).
    tile_batch: tiles per jitted call (default `config.eval.tile_batch`).
    output_dir: default `workdir/eval`; each test set goes to `output_dir/<name>/`.
    save_images: write the `.mat` and PNG files (default `config.eval.save_images`).
    verbose: print each test set's table.

  Returns:
    test set name -> its `metrics.json` contents plus 'table' and 'dir'.

  Raises:
    FileNotFoundError: no config or no checkpoint in the workdir.
    DataError: a test set is missing or does not match the model (bands, sensor, sizes).
    OutputError: the output folder cannot be written.
  """
  workdir = Path(workdir)
  if config is None:
    config = config_utils.load_config(workdir)
  mode = mode or _eval_option(config, 'mode', 'tiled')
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  step = checkpointing.select_step(workdir, step, which)  # Fails before any data are read.
  test_sets = select_test_sets(config, test_files, sensor)
  out_dir = Path(output_dir) if output_dir else workdir / 'eval'
  writer = jax.process_index() == 0
  if writer:
    _prepare_output_root(out_dir)
  params, step, _ = checkpointing.restore_params(workdir, config.model, step=step)
  fuser = Fuser(
    config.model,
    params,
    mode=mode,
    tile_size=config.eval.tile_size,
    tile_pad=config.eval.tile_pad,
    tile_batch=tile_batch or config.eval.tile_batch,
  )
  if save_images is None:
    save_images = bool(_eval_option(config, 'save_images', True))
  error_max = float(_eval_option(config, 'error_max', 0.1))
  results = {}
  for test_set in test_sets:
    target = out_dir if writer else Path(tempfile.mkdtemp())
    logging.info(
      'evaluating %s (%s, %d images, %s) at step %d',
      test_set.name,
      test_set.file,
      len(test_set),
      test_set.protocol,
      step,
    )
    results[test_set.name] = evaluate_test_set(
      test_set,
      fuser,
      target,
      step=step,
      save_images=save_images,
      error_max=error_max,
      verbose=verbose and writer,
    )
    if not writer:
      shutil.rmtree(target, ignore_errors=True)
  return results
