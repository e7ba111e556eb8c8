"""A network as a scene window fuser: the official tiling over the tile grid (`tiling.Fuser`).

  fuser = NetworkWindowFuser.from_workdir('workdirs/official_wv3')
  scene.fuse_files_with(fuser, 'pan.tif', 'ms.tif', 'fused.tif', max_value=2047)

The scene's official tile grid (`tiling.tile_grid`) is walked in windows of about `window` x
`window` PAN pixels (square with the default tile batch, `window_tiles`); each window's tiles are
cut by `tiling.cut_window` from a read of the window plus its halo (the tile margin: a tile takes
its margins from the neighbouring real pixels, so the result does not depend on the window size)
and fused as full batches of tiles on every local device, each tile at the batch position the
whole-image cut gives it (`tiling.Fuser.fuse_tiles_at`): the same bits as the image fused at once.

Networks that take the upsampled MS (`lms`: PanNet, FusionNet, DiCNN, PNN, ...) get, per window,
the toolbox's `interp23tap` of the MS (`window_lms`) computed from the MS window plus
`LMS_HALO` MS pixels read with circular borders (as the toolbox's `imfilter(..., 'circular')`):
equal, bit for bit, to `interp23tap` of the whole MS, which is what the test sets' `lms` hold
(`data.prepare_pansharpening`, `data.wald`) and what `evaluate.py` feeds the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from u2net_jax import toolbox
from u2net_jax.data import DataError
from u2net_jax.infer import scene, tiling
from u2net_jax.run import checkpointing, config_utils

# MS pixels of context of the 23-tap interpolator at ratio 4 (two x2 steps of an 11-pixel
# half-width filter: 6 + 3 MS pixels would do; 12 keeps a margin and a multiple of 4).
LMS_HALO = 12


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


def window_lms(ms, y0: int, y1: int, x0: int, x1: int, scale: int = 4) -> np.ndarray:
  """`toolbox.interp23tap` of the whole MS, rows y0..y1-1 and columns x0..x1-1 of the PAN grid.

  The MS window covering them plus `LMS_HALO` MS pixels each side (circular beyond the image, as
  the toolbox) is interpolated and cropped: every kept value is the same sum of the same 23 taps
  as in the whole-image interpolation (`ndimage.correlate1d` computes each output from its own
  neighbourhood), so the bits are equal.

  Args:
    ms: a `scene.SceneReader` of the MS (its `values`: the sensor scale, holes filled).
    y0, y1, x0, x1: the PAN-grid rectangle (inside the image).
    scale: PAN pixels per MS pixel.

  Returns:
    (y1 - y0, x1 - x0, C) float32 divided by the sensor maximum, as a test set's `lms` is read
    (`pancollection.H5Source`: float32(x) / max).
  """
  m0, n0 = y0 // scale - LMS_HALO, x0 // scale - LMS_HALO
  m1, n1 = -(-y1 // scale) + LMS_HALO, -(-x1 // scale) + LMS_HALO
  block = scene.read_padded(ms.values, m0, m1, n0, n1, ms.height, ms.width, 'wrap')
  up = toolbox.interp23tap(block.astype(np.float64), scale)
  top, left = y0 - scale * m0, x0 - scale * n0
  up = up[top : top + y1 - y0, left : left + x1 - x0]
  return up.astype(np.float32) / np.float32(ms.max_value)


class NetworkWindowFuser(scene.WindowFuser):
  """A network (`tiling.Fuser`) over the official tile grid, window by window.

  Attributes:
    config: the workdir's config (`config.model`, `config.eval` geometry).
    tile, pad: the tile side and margin (PAN pixels).
    tile_batch: tiles per jitted call.
    needs_lms: whether the network takes the upsampled MS.
    fuser: the `tiling.Fuser` (after `prepare`, or given).
    step: the checkpoint step (after `prepare`, or given).
  """

  unit = 'tile'

  def __init__(
    self,
    config,
    *,
    workdir: str | os.PathLike | None = None,
    step: int | None = None,
    which: str = 'best',
    tile_batch: int | None = None,
    loaded: tuple[tiling.Fuser, int] | None = None,
  ):
    """Nothing is restored here (that is `prepare`, after every check of the inputs).

    Args:
      config: the workdir's config.
      workdir: where the weights are (unless `loaded`).
      step, which: the checkpoint (`checkpointing.select_step`).
      tile_batch: tiles per jitted call (default `config.eval.tile_batch`).
      loaded: a built `tiling.Fuser` and its checkpoint step (`infer.archive` keeps one per
        worker process).
    """
    model = config.model
    self.config, self.workdir, self.which = config, workdir, which
    self.bands, self.guide_bands = int(model.spectral_bands), int(model.guide_bands)
    self.scale = int(model.get('scale', 4))
    self.tile, self.pad = int(config.eval.tile_size), int(config.eval.tile_pad)
    self.fuser, self.step = loaded if loaded is not None else (None, step)
    self.tile_batch = self.fuser.tile_batch if self.fuser else tile_batch or config.eval.tile_batch
    self.tile_batch = int(self.tile_batch)
    self.needs_lms = self.fuser.needs_lms if self.fuser else 'lms' in _spec_inputs(model)
    self.halo = self.pad + (LMS_HALO * self.scale if self.needs_lms else 0)
    self._selected = False  # Whether `step` was checked against the workdir.
    self._grid: tuple[int, int] = (0, 0)
    self._tiles: dict[tuple[int, int], tuple[int, int, int, int]] = {}

  @classmethod
  def from_workdir(cls, workdir, **kwargs) -> NetworkWindowFuser:
    """The fuser of a workdir's checkpoint (`config.json`; weights restored by `prepare`)."""
    return cls(config_utils.load_config(workdir), workdir=workdir, **kwargs)

  def windows(self, height: int, width: int, window: int) -> list[scene.Window]:
    tile = self.tile
    if window <= 0 or window % tile:
      raise DataError(f'--window={window} must be a positive multiple of the tile size {tile}')
    rows, cols = tiling.tile_grid(height, width, tile)
    self._grid, self._tiles = (rows, cols), {}
    win_rows, win_cols = window_tiles(window, tile, self.tile_batch)
    out = []
    for r0 in range(0, rows, win_rows):
      for c0 in range(0, cols, win_cols):
        r1, c1 = min(r0 + win_rows, rows), min(c0 + win_cols, cols)
        y0, x0 = r0 * tile, c0 * tile
        y1, x1 = max(y0, min(height, r1 * tile)), max(x0, min(width, c1 * tile))
        out.append(scene.Window(y0, y1, x0, x1, (r1 - r0) * (c1 - c0)))
        self._tiles[(y0, x0)] = (r0, r1, c0, c1)
    return out

  def _resolved_step(self) -> int:
    if not self._selected and self.fuser is None:
      self.step = checkpointing.select_step(self.workdir, self.step, self.which)
      self._selected = True
    return int(self.step)

  def prepare(self, pan, ms) -> None:
    if self.fuser is not None:
      return
    step = self._resolved_step()
    params, step, _ = checkpointing.restore_params(self.workdir, self.config.model, step=step)
    self.step = step
    self.fuser = tiling.Fuser(
      self.config.model,
      params,
      tile_size=self.tile,
      tile_pad=self.pad,
      tile_batch=self.tile_batch,
    )
    self.tile_batch = self.fuser.tile_batch

  def identity(self) -> dict[str, Any]:
    """The model (a digest of `config.model`), the workdir, the checkpoint step and a fast hash of
    its parameter files (`manifests.checkpoint_hash`), the tile geometry and batch, lms."""
    from u2net_jax.io import manifests

    model = json.dumps(self.config.model.to_dict(), sort_keys=True, default=str)
    step, weights = self._resolved_step(), None
    if self.workdir is not None:
      folder = checkpointing.checkpoint_dir(self.workdir) / str(step) / 'params'
      weights = manifests.checkpoint_hash(folder) if folder.is_dir() else None
    return {
      'fuser': 'network',
      'model': hashlib.sha256(model.encode()).hexdigest()[:16],
      'workdir': str(os.path.abspath(self.workdir)) if self.workdir else None,
      'step': step,
      'checkpoint_hash': weights,
      'tile': self.tile,
      'pad': self.pad,
      'tile_batch': self.tile_batch,
      'lms': self.needs_lms,
    }

  def fuse(self, pan, ms, w: scene.Window) -> Iterator[tuple[int, np.ndarray]]:
    tile, pad, scale = self.tile, self.pad, self.scale
    r0, r1, c0, c1 = self._tiles[(w.y0, w.x0)]
    rr, cc = range(r0, r1), range(c0, c1)
    ms_tiles = tiling.cut_window(
      ms, ms.height, ms.width, rr, cc, tile=tile // scale, pad=pad // scale
    )
    guide = _WithLms(pan, ms, scale) if self.needs_lms else pan
    guide_tiles = tiling.cut_window(guide, pan.height, pan.width, rr, cc, tile=tile, pad=pad)
    slots = (np.asarray(rr)[:, None] * self._grid[1] + np.asarray(cc)[None, :]).reshape(-1)
    out = self.fuser.fuse_tiles_at(ms_tiles, guide_tiles, slots)
    del ms_tiles, guide_tiles
    height, width, bands = w.y1 - w.y0, w.x1 - w.x0, out.shape[-1]
    # The central tile x tile of each fused tile, one row of tiles at a time: a row's float32
    # copy, not the window's (whole-window copies would add about twice the window's float32
    # output to the peak).
    for i in range(len(rr)):
      if i * tile >= height:
        break
      row = out[i * len(cc) : (i + 1) * len(cc), pad : pad + tile, pad : pad + tile]
      row = row.transpose(1, 0, 2, 3).reshape(tile, len(cc) * tile, bands)
      yield i * tile, row[: height - i * tile, :width]


class _WithLms:
  """The guide reader with the window's `lms` appended as extra bands (`tiling.Fuser.hires`)."""

  def __init__(self, pan, ms, scale: int):
    self.pan, self.ms, self.scale = pan, ms, scale

  def __call__(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    lms = window_lms(self.ms, y0, y1, x0, x1, self.scale)
    return np.concatenate([self.pan(y0, y1, x0, x1), lms], axis=-1)


def _spec_inputs(model_config) -> tuple[str, ...]:
  """The batch roles the configured network takes (`ModelSpec.inputs`)."""
  from u2net_jax import models

  return tuple(models.spec_of(models.create_model(model_config)).inputs)


def fuse_files(
  workdir: str | os.PathLike,
  pan_path: str | os.PathLike,
  ms_path: str | os.PathLike,
  out_path: str | os.PathLike,
  *,
  step: int | None = None,
  which: str = 'best',
  tile_batch: int | None = None,
  loaded: tuple[Any, int] | None = None,
  max_value: float | None = None,
  **options,
) -> dict[str, Any]:
  """Fuses a PAN/MS scene with a workdir's checkpoint into `out_path` (what `fuse.py` runs).

  Every check (inputs, output, checkpoint) happens before the model runs; on any failure nothing
  is left under `out_path`.

  Args:
    workdir: a training run's or converted weights' workdir (`config.json` + checkpoints).
    pan_path, ms_path, out_path: as `scene.fuse_files_with`.
    step, which: the checkpoint (`checkpointing.select_step`).
    tile_batch: tiles per jitted call (default `config.eval.tile_batch`).
    loaded: the workdir's `tiling.Fuser` and its checkpoint step, already built (`infer.archive`
      keeps one per worker process, so weights are read and compiled once, not per scene); None
      restores them from `step`/`which`/`tile_batch` once every check has passed.
    max_value: the sensor maximum (default `config.data.max_value`).
    **options: `scene.fuse_files_with`'s (dtype, window, overwrite, cog, keys, nodata, ...).

  Returns:
    `scene.fuse_files_with`'s summary plus 'step' (the checkpoint).

  Raises:
    FileNotFoundError: no config or checkpoint in the workdir.
    As `scene.fuse_files_with`.
  """
  scene.check_options(
    max_value=max_value,
    dtype=options.get('dtype'),
    window=options.get('window', 1024),
    tile_batch=tile_batch,
    nodata=options.get('nodata'),
  )
  fuser = NetworkWindowFuser.from_workdir(
    workdir, step=step, which=which, tile_batch=tile_batch, loaded=loaded
  )
  max_value = float(fuser.config.data.max_value if max_value is None else max_value)
  result = scene.fuse_files_with(fuser, pan_path, ms_path, out_path, max_value=max_value, **options)
  result['step'] = int(fuser.step)
  return result
