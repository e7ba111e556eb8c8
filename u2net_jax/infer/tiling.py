"""Inference on whole images: the official `test.py` tiling and batched, jitted U2Net calls.

Geometry (`extract_tiles`, `assemble_tiles`) is the official `test.py` procedure exactly: the
guide reflect-padded by `pad` (4) pixels and the MS by pad / scale (1) pixel, a zero canvas of
H + tile - (H mod tile) by W + tile - (W mod tile) (so a side that is already a multiple of the
tile gets one extra row of tiles over zeros, as there), tile x tile (64 x 64) tiles read with their
margins (72 x 72 guide, 18 x 18 MS inputs), the central tile x tile of each output kept and the
canvas cropped to H x W. The tile size matters beyond the borders: the S2Block's spectral scaling
depends on the token count, so tiled and whole-image results differ everywhere.

Inference (`Fuser`) runs the network clamped to [0, 1] (as test.py clamps it) through ONE jitted
function per tile shape, on fixed-size batches of tiles sharded over this process's devices (the
last batch padded with zero tiles, so nothing recompiles). Three levels of use:

  fuser = Fuser(config.model, params, mode='tiled', tile_batch=16)
  fused = fuser(ms, guide)                          # one image, (h, w, C), (4h, 4w, c) in [0, 1]
  for example, fused in fuser.fuse_all(examples):   # a stream; tiles of consecutive images
    ...                                             # share batches
  out_tiles = fuser.fuse_tiles(ms_tiles, guide_tiles)  # any number of tiles of one shape

`fuse_tiles` is the building block for windows of a large scene (`infer.scene`): `cut_window` cuts
the tiles of a block of the grid reading only the pixels they need (margins from the
neighbouring real pixels, reflected only at the image border), so a scene fused window by window
equals the scene fused at once.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from u2net_jax import models, toolbox
from u2net_jax.data import DataError
from u2net_jax.run import config_utils, sharding

MODES = config_utils.EVAL_MODES  # 'auto' (the network's own procedure), 'tiled', 'whole'.
TILE, PAD = 64, 4  # The official test.py: 64 x 64 PAN tiles with 4-pixel margins.


# ---------------------------------------------------------------------------------------------
# Geometry.


def check_geometry(tile: int, pad: int, scale: int) -> None:
  """Raises a ValueError unless the tile and its margin map onto whole MS pixels."""
  if tile <= 0 or pad < 0 or tile % scale or pad % scale:
    raise ValueError(
      f'config.eval.tile_size ({tile}) and tile_pad ({pad}) must be non-negative multiples of '
      f'the scale {scale} (tile_size > 0)'
    )


def tile_grid(height: int, width: int, tile: int = TILE) -> tuple[int, int]:
  """Rows and columns of tiles: the official canvas is H + tile - (H mod tile) per side."""
  return (height + tile - height % tile) // tile, (width + tile - width % tile) // tile


def _cut(image: np.ndarray, rows: int, cols: int, tile: int, pad: int) -> np.ndarray:
  """(h, w, C) -> (rows * cols, tile + 2 pad, same, C): reflect margins, zero canvas, windows."""
  # Reflect padding as torch's F.pad(mode='reflect') (the edge sample is not repeated), then
  # zeros up to the canvas.
  h, w, c = image.shape
  canvas = np.zeros((rows * tile + 2 * pad, cols * tile + 2 * pad, c), np.float32)
  canvas[: h + 2 * pad, : w + 2 * pad] = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), 'reflect')
  side = tile + 2 * pad
  # Every side x side window of the canvas, read without copying; the tiles are every tile-th.
  windows = sliding_window_view(canvas, (side, side), axis=(0, 1))[::tile, ::tile]
  return np.ascontiguousarray(windows.transpose(0, 1, 3, 4, 2)).reshape(rows * cols, side, side, c)


def extract_tiles(
  ms: np.ndarray, guide: np.ndarray, *, tile: int = TILE, pad: int = PAD, scale: int = 4
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts one image into the official test.py tiles, margins included.

  Args:
    ms: (h, w, C) low-resolution image in [0, 1].
    guide: (scale*h, scale*w, c) PAN or RGB in [0, 1].
    tile: guide tile side (64).
    pad: guide margin (4); the MS margin is pad / scale (1).
    scale: guide / MS ratio (4).

  Returns:
    ms_tiles (T, (tile + 2 pad)/scale, same, C) and guide_tiles (T, tile + 2 pad, same, c)
    float32, row-major over the `tile_grid` of the image.

  Raises:
    ValueError: a geometry that does not map onto MS pixels, or a guide of another size.
  """
  check_geometry(tile, pad, scale)
  big_h, big_w = guide.shape[:2]
  h, w = ms.shape[:2]
  if (big_h, big_w) != (scale * h, scale * w):
    raise ValueError(f'guide {guide.shape} is not {scale}x the ms {ms.shape}')
  rows, cols = tile_grid(big_h, big_w, tile)
  return (
    _cut(ms, rows, cols, tile // scale, pad // scale),
    _cut(guide, rows, cols, tile, pad),
  )


def canvas_index(start: int, stop: int, size: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Image indices of positions [start, stop) of one side of the official canvas.

  Canvas position p holds image index p - pad, reflected at both borders as `np.pad(mode=
  'reflect')` (the edge sample not repeated) and zero from size + 2 pad on: what `_cut` builds in
  memory, computed for any range of it, so a window of a large image can be cut exactly.

  Args:
    start, stop: canvas positions (0 is the first margin pixel).
    size: the image side.
    pad: the margin (it must be smaller than `size`).

  Returns:
    (index, valid): image indices (0 where not valid) and False where the canvas is zero.
  """
  i = np.arange(start, stop) - pad
  i = np.where(i < 0, -i, i)
  valid = i < size + pad
  i = np.where(i >= size, 2 * (size - 1) - i, i)
  return np.where(valid, i, 0), valid


def cut_window(
  read, height: int, width: int, rows: range, cols: range, *, tile: int, pad: int
) -> np.ndarray:
  """The official tiles of rows x cols of the tile grid, reading only the pixels they need.

  Equal to the corresponding tiles of `_cut` of the whole image (margins from the neighbouring
  real pixels inside the image, reflected at its borders): windows of a scene give the same
  tiles as the scene cut at once.

  Args:
    read: `read(y0, y1, x0, x1)` -> image[y0:y1, x0:x1] as (y1 - y0, x1 - x0, C) float32.
    height, width: the image size.
    rows, cols: tile rows and columns (step 1) of `tile_grid(height, width, tile)`.
    tile, pad: tile side and margin on this image's grid.

  Returns:
    (len(rows) * len(cols), tile + 2 pad, same, C) float32, row-major.
  """
  iy, vy = canvas_index(rows.start * tile, rows.stop * tile + 2 * pad, height, pad)
  ix, vx = canvas_index(cols.start * tile, cols.stop * tile + 2 * pad, width, pad)
  side = tile + 2 * pad
  if not (vy.any() and vx.any()):  # Only the extra row/column of zero tiles (pad 0).
    channels = np.asarray(read(0, 1, 0, 1)).shape[-1]
    return np.zeros((len(rows) * len(cols), side, side, channels), np.float32)
  y0, y1 = int(iy[vy].min()), int(iy[vy].max()) + 1
  x0, x1 = int(ix[vx].min()), int(ix[vx].max()) + 1
  block = np.asarray(read(y0, y1, x0, x1), np.float32)
  canvas = block[np.ix_(np.clip(iy - y0, 0, y1 - y0 - 1), np.clip(ix - x0, 0, x1 - x0 - 1))]
  canvas = np.where((vy[:, None] & vx[None, :])[..., None], canvas, np.float32(0))
  windows = sliding_window_view(canvas, (side, side), axis=(0, 1))[::tile, ::tile]
  n = len(rows) * len(cols)
  return np.ascontiguousarray(windows.transpose(0, 1, 3, 4, 2)).reshape(n, side, side, -1)


def assemble_tiles(
  tiles: np.ndarray, height: int, width: int, *, tile: int = TILE, pad: int = PAD
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
def fused_output(model: nn.Module, params, ms: jax.Array, guide: jax.Array) -> jax.Array:
  """The network output clamped to [0, 1], as test.py does (the raw output is not confined
  there: -0.67..2.94 on a real WV3 pair). Compiled once per model and input shape.

  For a network that also takes `lms`, `guide` carries it after the guide's own bands (the
  high-resolution roles travel together through the tiling; see `Fuser`).
  """
  batch = {
    'ms': ms,
    'guide': guide[..., : model.guide_bands],
    'lms': guide[..., model.guide_bands :],
  }
  return jnp.clip(models.apply(model, params, batch), 0.0, 1.0)


class Fuser:
  """Runs a network on whole images, tiled like the official test.py or in one piece.

  A network that takes the upsampled MS (`lms` in its `ModelSpec.inputs`) gets it as the image's
  `lms` where the caller has one (the test sets store it), else the toolbox's `interp23tap` of
  the MS; inside, it travels as extra bands of the guide, so both are cut into the same tiles.

  Attributes:
    model: the network (`models.create_model`).
    mode: 'tiled' or 'whole' ('auto' resolved to the network's own procedure).
    needs_lms: whether the network takes `lms`.
    tile, pad, scale: the geometry (guide pixels).
    tile_batch: tiles per jitted call, a multiple of the device count.
    mesh: the device mesh the tiles are split over.
  """

  def __init__(
    self,
    model_config: Mapping[str, Any],
    params: Any,
    *,
    mode: str = 'tiled',
    tile_size: int = TILE,
    tile_pad: int = PAD,
    tile_batch: int = 16,
    mesh: jax.sharding.Mesh | None = None,
  ):
    """Places the parameters on the devices.

    Args:
      model_config: `config.model` (`models.create_model`).
      params: the model's parameters.
      mode: 'tiled' (the official procedure), 'whole' (each image in one call; memory grows
        with the image) or 'auto' (the network's own test procedure, `ModelSpec.eval_mode`).
      tile_size, tile_pad: guide tile side and margin (`config.eval`).
      tile_batch: tiles per jitted call; rounded up to a multiple of the device count.
      mesh: default `sharding.local_mesh()` (each process fuses its own images).
    """
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    self.model = models.create_model(model_config)
    spec = models.spec_of(self.model)
    self.mode = spec.eval_mode if mode == 'auto' else mode
    self.needs_lms = 'lms' in spec.inputs
    self.tile, self.pad, self.scale = int(tile_size), int(tile_pad), self.model.scale
    check_geometry(self.tile, self.pad, self.scale)
    self.mesh = mesh if mesh is not None else sharding.local_mesh()
    n = self.mesh.shape[sharding.BATCH_AXIS]
    self.tile_batch = max(1, -(-int(tile_batch) // n) * n)
    self.params = jax.device_put(params, sharding.replicated(self.mesh))

  # Low level: batches of tiles.

  def fuse_tiles(self, ms_tiles: np.ndarray, guide_tiles: np.ndarray) -> np.ndarray:
    """Fuses tiles of one shape in batches of `tile_batch` (the last padded with zeros).

    Args:
      ms_tiles: (T, m, m, C) in [0, 1].
      guide_tiles: (T, scale*m, scale*m, c) in [0, 1].

    Returns:
      (T, scale*m, scale*m, C) float32 in [0, 1], margins included.
    """
    b = self.tile_batch
    batches = []
    for start in range(0, len(ms_tiles), b):
      ms, guide = ms_tiles[start : start + b], guide_tiles[start : start + b]
      short = b - len(ms)
      if short:  # Zero tiles keep the batch shape, so the jitted function never recompiles.
        ms = np.concatenate([ms, np.zeros((short,) + ms.shape[1:], ms.dtype)])
        guide = np.concatenate([guide, np.zeros((short,) + guide.shape[1:], guide.dtype)])
      # Dispatched without waiting: the next batch is prepared while this one runs.
      batches.append((self._run(ms, guide, sharding.batch_sharding(self.mesh)), b - short))
    if not batches:
      return np.zeros(guide_tiles.shape[:3] + (self.model.spectral_bands,), np.float32)
    return np.concatenate([np.asarray(x)[:n] for x, n in batches])

  def fuse_tiles_at(
    self, ms_tiles: np.ndarray, guide_tiles: np.ndarray, slots: np.ndarray
  ) -> np.ndarray:
    """`fuse_tiles` with tile i run at position `slots[i]` of its batch.

    XLA may round a tile's result differently in the last bit depending on its position in the
    batch (seen on CPU: 7e-8 at position 3 of 4). A tile of a scene window placed at the
    position the whole-image cut gives it (its row-major index in the grid mod `tile_batch`)
    therefore gives the same bits as the whole image fused at once, whatever the windows.

    Args:
      ms_tiles, guide_tiles: as in `fuse_tiles`.
      slots: (T,) batch positions in [0, tile_batch).

    Returns:
      (T, scale*m, scale*m, C) float32 in [0, 1], in input order.
    """
    b = self.tile_batch
    slots = np.asarray(slots) % b
    # The k-th tile of each slot goes to batch k; slots without one that deep run zeros.
    depth = np.zeros(len(slots), np.int64)
    for s in range(b):
      here = slots == s
      depth[here] = np.arange(here.sum())
    out = np.zeros(guide_tiles.shape[:3] + (self.model.spectral_bands,), np.float32)
    pending = None  # One batch in flight while the previous one is copied out: bounded memory.
    for k in range(int(depth.max()) + 1 if len(slots) else 0):
      take = np.flatnonzero(depth == k)
      ms = np.zeros((b,) + ms_tiles.shape[1:], np.float32)
      guide = np.zeros((b,) + guide_tiles.shape[1:], np.float32)
      ms[slots[take]], guide[slots[take]] = ms_tiles[take], guide_tiles[take]
      running = (take, self._run(ms, guide, sharding.batch_sharding(self.mesh)))
      if pending is not None:
        out[pending[0]] = np.asarray(pending[1])[slots[pending[0]]]
      pending = running
    if pending is not None:
      out[pending[0]] = np.asarray(pending[1])[slots[pending[0]]]
    return out

  def _run(self, ms: np.ndarray, guide: np.ndarray, placement) -> jax.Array:
    ms, guide = jax.device_put(ms, placement), jax.device_put(guide, placement)
    return fused_output(self.model, self.params, ms, guide)

  # One image.

  def hires(self, ms: np.ndarray, guide: np.ndarray, lms: np.ndarray | None = None) -> np.ndarray:
    """The high-resolution input bands the network takes: the guide, then `lms` if it needs it.

    Args:
      ms: (h, w, C) in [0, 1].
      guide: (4h, 4w, c) in [0, 1].
      lms: (4h, 4w, C) the upsampled MS, or None (then `toolbox.interp23tap(ms)` if needed).

    Returns:
      (4h, 4w, c) the guide, or (4h, 4w, c + C) with `lms` appended.
    """
    if not self.needs_lms:
      return guide
    if lms is None:
      lms = toolbox.interp23tap(np.asarray(ms, np.float64), self.scale).astype(np.float32)
    return np.concatenate([guide, np.asarray(lms, guide.dtype)], axis=-1)

  def __call__(
    self, ms: np.ndarray, guide: np.ndarray, lms: np.ndarray | None = None
  ) -> np.ndarray:
    """Fuses one image: ms (h, w, C), guide (4h, 4w, c) in [0, 1] -> (4h, 4w, C) in [0, 1].

    `lms` (4h, 4w, C), used by the networks that take it (else computed; see `hires`).
    """
    self._check(ms, guide)
    guide = self.hires(ms, guide, lms)
    if self.mode == 'whole':
      return np.asarray(self._run(ms[None], guide[None], sharding.replicated(self.mesh))[0])
    ms_tiles, guide_tiles = self._tiles(ms, guide)
    return self._assemble(self.fuse_tiles(ms_tiles, guide_tiles), guide)

  def _check(self, ms: np.ndarray, guide: np.ndarray) -> None:
    h, w = ms.shape[:2]
    if tuple(guide.shape[:2]) != (self.scale * h, self.scale * w):
      raise DataError(
        f'guide {guide.shape} and ms {ms.shape}: the guide must be {self.scale}x the ms size'
      )

  def _tiles(self, ms: np.ndarray, guide: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return extract_tiles(ms, guide, tile=self.tile, pad=self.pad, scale=self.scale)

  def _assemble(self, tiles: np.ndarray, guide: np.ndarray) -> np.ndarray:
    return assemble_tiles(tiles, *guide.shape[:2], tile=self.tile, pad=self.pad)

  # A stream of images.

  def fuse_all(self, examples: Iterable[Mapping[str, np.ndarray]]) -> Iterator[tuple[dict, Any]]:
    """Fuses a stream of examples, in order; tiles of consecutive images share batches.

    Args:
      examples: dicts with 'ms' (h, w, C) and 'guide' (4h, 4w, c) in [0, 1] (other roles are
        passed through).

    Yields:
      (example, fused (4h, 4w, C) float32 in [0, 1]) in input order, each as soon as all its
      tiles have run.
    """
    if self.mode == 'whole':
      for ex in examples:
        yield ex, self(ex['ms'], ex['guide'], ex.get('lms'))
      return
    waiting: collections.deque = collections.deque()  # (example, tile count), oldest first.
    queued: list[tuple[np.ndarray, np.ndarray]] = []  # Input tiles not run yet, in order.
    done: list[np.ndarray] = []  # Output tiles not assembled yet, in order.
    for ex in examples:
      self._check(ex['ms'], ex['guide'])
      tiles = self._tiles(ex['ms'], self.hires(ex['ms'], ex['guide'], ex.get('lms')))
      waiting.append((ex, len(tiles[0])))
      queued.append(tiles)
      while sum(len(m) for m, _ in queued) >= self.tile_batch:
        done.append(self.fuse_tiles(*_take(queued, self.tile_batch)))
      yield from self._completed(waiting, done)
    if queued:
      done.append(self.fuse_tiles(*_take(queued, sum(len(m) for m, _ in queued))))
    yield from self._completed(waiting, done)

  def _completed(self, waiting: collections.deque, done: list) -> Iterator[tuple[dict, Any]]:
    """Assembles the waiting images whose tiles have all run (consumes them from `done`)."""
    out = np.concatenate(done) if done else np.zeros((0,), np.float32)
    ready = []
    while waiting and len(out) >= waiting[0][1]:
      ex, n = waiting.popleft()
      ready.append((ex, out[:n]))
      out = out[n:]
    done[:] = [out] if len(out) else []
    for ex, tiles in ready:
      yield ex, self._assemble(tiles, ex['guide'])


def _take(queued: list, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Removes the first `n` (ms, guide) tiles from the queue of per-image tile arrays."""
  ms = np.concatenate([m for m, _ in queued])
  guide = np.concatenate([g for _, g in queued])
  queued[:] = [(ms[n:], guide[n:])] if n < len(ms) else []
  return ms[:n], guide[:n]
