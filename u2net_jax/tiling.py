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

`fuse_tiles` is the building block for windows of a large scene: cut windows with margins, fuse
them as batches of tiles, keep their centres.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from u2net_jax import models, sharding
from u2net_jax.data import DataError

MODES = ('tiled', 'whole')
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
def fused_output(model: models.U2Net, params, ms: jax.Array, guide: jax.Array) -> jax.Array:
  """The network output clamped to [0, 1], as test.py does (the raw output is not confined
  there: -0.67..2.94 on a real WV3 pair). Compiled once per model and input shape."""
  return jnp.clip(model.apply({'params': params}, ms, guide), 0.0, 1.0)


class Fuser:
  """Runs a U2Net on whole images, tiled like the official test.py or in one piece.

  Attributes:
    model: the `models.U2Net`.
    mode: 'tiled' or 'whole'.
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
      mode: 'tiled' (the official procedure) or 'whole' (each image in one call; memory grows
        with the image).
      tile_size, tile_pad: guide tile side and margin (`config.eval`).
      tile_batch: tiles per jitted call; rounded up to a multiple of the device count.
      mesh: default `sharding.local_mesh()` (each process fuses its own images).
    """
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    self.model = models.create_model(model_config)
    self.mode = mode
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

  def _run(self, ms: np.ndarray, guide: np.ndarray, placement) -> jax.Array:
    ms, guide = jax.device_put(ms, placement), jax.device_put(guide, placement)
    return fused_output(self.model, self.params, ms, guide)

  # One image.

  def __call__(self, ms: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """Fuses one image: ms (h, w, C), guide (4h, 4w, c) in [0, 1] -> (4h, 4w, C) in [0, 1]."""
    self._check(ms, guide)
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
        yield ex, self(ex['ms'], ex['guide'])
      return
    waiting: collections.deque = collections.deque()  # (example, tile count), oldest first.
    queued: list[tuple[np.ndarray, np.ndarray]] = []  # Input tiles not run yet, in order.
    done: list[np.ndarray] = []  # Output tiles not assembled yet, in order.
    for ex in examples:
      self._check(ex['ms'], ex['guide'])
      tiles = self._tiles(ex['ms'], ex['guide'])
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
