"""Tests of `u2net_jax.infer.tiling`: the official test.py tile geometry and the batched `Fuser`."""

import jax
import numpy as np
import pytest
from conftest import REPO

from u2net_jax import models
from u2net_jax.infer import tiling
from u2net_jax.run import config_utils

TINY_MODEL = {'width': 16, 'head_dim': 16, 'attention': 'auto'}
# 32-pixel tiles (40 x 40 with margins) keep the tiny model's spatial attention ~10x cheaper
# than the official 72 x 72 tiles; the procedure is the same.
TINY_TILE = 32


def loop_tiles(ms, guide, tile=64, pad=4, scale=4):
  """The official test.py's double loop over the padded canvas (the oracle of the cut)."""
  big_h, big_w = guide.shape[:2]
  h, w = ms.shape[:2]
  rows, cols = tiling.tile_grid(big_h, big_w, tile)
  t, p = tile // scale, pad // scale
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


def _pair(rng, height, width, bands=3, guide_bands=1):
  ms = rng.uniform(size=(height // 4, width // 4, bands)).astype(np.float32)
  guide = rng.uniform(size=(height, width, guide_bands)).astype(np.float32)
  return ms, guide


def test_tile_grid_matches_test_py():
  # The canvas is H + 64 - H mod 64: a multiple of 64 gets a whole extra row of tiles.
  assert tiling.tile_grid(128, 128) == (3, 3)
  assert tiling.tile_grid(256, 256) == (5, 5)
  assert tiling.tile_grid(100, 60) == (2, 1)


@pytest.mark.parametrize(
  'height, width, tile, pad', [(100, 60, 64, 4), (128, 64, 64, 4), (36, 96, 32, 8), (8, 4, 4, 0)]
)
def test_window_cut_equals_the_official_loop(height, width, tile, pad):
  rng = np.random.default_rng(height + width)
  ms, guide = _pair(rng, height, width, bands=5, guide_bands=3)
  got = tiling.extract_tiles(ms, guide, tile=tile, pad=pad)
  want = loop_tiles(ms, guide, tile=tile, pad=pad)
  for g, w in zip(got, want, strict=True):
    assert g.dtype == np.float32 and g.flags.c_contiguous
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize('height, width', [(100, 60), (128, 128), (4, 4), (68, 200)])
def test_assemble_inverts_the_cut(height, width):
  rng = np.random.default_rng(0)
  ms, guide = _pair(rng, height, width, guide_bands=2)
  ms_tiles, guide_tiles = tiling.extract_tiles(ms, guide)
  # A "network" returning its guide tile puts the guide back in place.
  np.testing.assert_array_equal(tiling.assemble_tiles(guide_tiles, height, width), guide)
  # MS tiles are aligned with the guide tiles (1 MS pixel = 4 guide pixels of margin).
  up = np.repeat(np.repeat(ms_tiles, 4, axis=1), 4, axis=2)
  np.testing.assert_array_equal(
    tiling.assemble_tiles(up, height, width), np.repeat(np.repeat(ms, 4, axis=0), 4, axis=1)
  )


def test_tiles_cover_the_image_with_reflected_margins():
  rng = np.random.default_rng(0)
  guide = rng.uniform(size=(100, 60, 1)).astype(np.float32)
  ms = rng.uniform(size=(25, 15, 3)).astype(np.float32)
  ms_tiles, guide_tiles = tiling.extract_tiles(ms, guide)
  assert ms_tiles.shape == (2, 18, 18, 3) and guide_tiles.shape == (2, 72, 72, 1)
  # Margins are torch-style reflections (edge not repeated), zeros beyond them.
  np.testing.assert_array_equal(guide_tiles[0, :4, 4:64], guide[4:0:-1])
  np.testing.assert_array_equal(ms_tiles[0, 0, 1:16], ms[1])
  np.testing.assert_array_equal(guide_tiles[0, 4:68, 64:68], guide[:64, 58:54:-1])
  assert not guide_tiles[:, :, 68:].any()  # Columns beyond the reflected margin are zeros.
  assert not guide_tiles[1, 4 + 36 + 4 :].any()  # Rows 104.. of the canvas are zeros.
  # A "network" returning its guide tile puts the guide back in place.
  np.testing.assert_array_equal(tiling.assemble_tiles(guide_tiles, 100, 60), guide)
  # MS tiles are aligned with the guide tiles (1 MS pixel = 4 guide pixels of margin).
  up = np.repeat(np.repeat(ms_tiles, 4, axis=1), 4, axis=2)
  np.testing.assert_array_equal(
    tiling.assemble_tiles(up, 100, 60), np.repeat(np.repeat(ms, 4, axis=0), 4, axis=1)
  )


def test_geometry_errors():
  ms, guide = _pair(np.random.default_rng(0), 32, 32)
  with pytest.raises(ValueError, match='multiples of the scale'):
    tiling.extract_tiles(ms, guide, tile=30)
  with pytest.raises(ValueError, match='not 4x the ms'):
    tiling.extract_tiles(ms, guide[:16])
  with pytest.raises(ValueError, match='tiles for a'):
    tiling.assemble_tiles(np.zeros((3, 72, 72, 1)), 100, 60)


# ---------------------------------------------------------------------------------------------
# The Fuser on a tiny model with random parameters.


def random_params(model, seed=0):
  """Random parameters of the model's shapes without compiling its init (fast on CPU)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name == 'scale':
      return np.ones(x.shape, np.float32)
    if name == 'bias':
      return rng.uniform(-0.05, 0.05, x.shape).astype(np.float32)
    bound = 1.0 / np.sqrt(np.prod(x.shape[:-1]))
    return rng.uniform(-bound, bound, x.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, models.abstract_params(model))


@pytest.fixture(scope='module')
def tiny():
  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
  with config.unlocked():
    config.model.update(TINY_MODEL)
  return config.model, random_params(models.create_model(config.model), 1)


def test_fuser_batches_tiles_across_images_without_recompiling(tiny):
  model_config, params = tiny
  rng = np.random.default_rng(1)
  examples = [
    dict(zip(('ms', 'guide'), _pair(rng, s, s, bands=8), strict=True)) for s in (32, 16, 48)
  ]
  before = tiling.fused_output._cache_size()
  # 4 + 1 + 4 tiles in batches of 4: the second batch mixes three images. One compilation.
  batched = tiling.Fuser(model_config, params, tile_size=TINY_TILE, tile_batch=4)
  outs = [fused for _, fused in batched.fuse_all(examples)]
  assert tiling.fused_output._cache_size() <= before + 1
  assert [o.shape for o in outs] == [(32, 32, 8), (16, 16, 8), (48, 48, 8)]
  # Alone (its tiles padded with zero tiles) each image gives the same result.
  for ex, out in zip(examples, outs, strict=True):
    np.testing.assert_allclose(batched(ex['ms'], ex['guide']), out, atol=1e-6)
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0
  assert tiling.fused_output._cache_size() <= before + 1
  # The tile-level API: any number of tiles, the same outputs, still the same compilation.
  ms_tiles, guide_tiles = tiling.extract_tiles(
    examples[2]['ms'], examples[2]['guide'], tile=TINY_TILE
  )
  out_tiles = batched.fuse_tiles(ms_tiles, guide_tiles)
  assert out_tiles.shape == (4, 40, 40, 8)
  np.testing.assert_allclose(
    tiling.assemble_tiles(out_tiles, 48, 48, tile=TINY_TILE), outs[2], atol=1e-6
  )
  assert batched.fuse_tiles(ms_tiles[:0], guide_tiles[:0]).shape == (0, 40, 40, 8)
  assert tiling.fused_output._cache_size() <= before + 1


def test_fuser_whole_mode_and_errors(tiny):
  model_config, params = tiny
  ms, guide = _pair(np.random.default_rng(2), 16, 16, bands=8)
  whole = tiling.Fuser(model_config, params, mode='whole')
  out = whole(ms, guide)
  assert out.shape == (16, 16, 8) and 0 <= out.min() and out.max() <= 1
  ((ex, fused),) = list(whole.fuse_all([{'ms': ms, 'guide': guide, 'gt': 'kept'}]))
  assert ex['gt'] == 'kept'
  np.testing.assert_array_equal(fused, out)
  with pytest.raises(ValueError, match='mode must be one of'):
    tiling.Fuser(model_config, params, mode='stripes')
  with pytest.raises(ValueError, match='multiples of the scale'):
    tiling.Fuser(model_config, params, tile_size=30)
  with pytest.raises(ValueError, match='the guide must be 4x the ms size'):
    whole(ms, guide[:8])
  # The batch is a multiple of the device count, so it splits over the mesh.
  fuser = tiling.Fuser(model_config, params, tile_batch=1)
  assert fuser.tile_batch % len(jax.local_devices()) == 0
