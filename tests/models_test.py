"""Tests of `u2net_jax.models.u2net`: shapes, errors, gradients, and the official outputs.

The model factory and the variants are `variants_test.py`'s; the attention kernels are
`attention_test.py`'s.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, shared_path

from u2net_jax import convert, models
from u2net_jax.models import u2net
from u2net_jax.run import config_utils


def tiny(**overrides):
  cfg = dict(spectral_bands=4, guide_bands=1, width=16, head_dim=8)
  cfg.update(overrides)
  return u2net.U2Net(**cfg)


def _inputs(model, b, h, w, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  ms = jax.random.uniform(k1, (b, h, w, model.spectral_bands))
  guide = jax.random.uniform(k2, (b, 4 * h, 4 * w, model.guide_bands))
  return ms, guide


@pytest.mark.parametrize(
  'bands,guide,b,h,w', [(4, 1, 1, 4, 6), (8, 1, 2, 3, 5), (31, 3, 1, 6, 4), (5, 3, 3, 2, 2)]
)
def test_output_shape_non_square(bands, guide, b, h, w):
  model = tiny(spectral_bands=bands, guide_bands=guide)
  ms, g = _inputs(model, b, h, w)
  params = models.init_params(model, jax.random.key(1), ms_size=4)
  out = jax.jit(model.apply)({'params': params}, ms, g)
  assert out.shape == (b, 4 * h, 4 * w, bands)
  assert np.isfinite(np.asarray(out)).all()


def test_param_counts_match_official():
  """536,248 used tensors' values for WV3 (width 32); 2,254,351 for HISR (width 64)."""
  for name, expected in [('wv3', 536_248), ('cave', 2_254_351)]:
    cfg = config_utils.load_config_file(REPO / 'configs' / f'{name}.py')
    shapes = convert.param_shapes(cfg.model)
    assert sum(int(np.prod(s)) for s in shapes.values()) == expected, name
    model = models.create_model(cfg.model)
    assert models.count_params(models.abstract_params(model)) == expected, name


def test_bad_inputs_name_shapes():
  model = tiny()
  params = models.init_params(model, jax.random.key(0), ms_size=4)
  ms, g = _inputs(model, 1, 4, 4)
  with pytest.raises(
    ValueError, match=r'guide has shape \(1, 15, 16, 1\); expected \(1, 16, 16, 1\)'
  ):
    model.apply({'params': params}, ms, g[:, :15])
  with pytest.raises(ValueError, match='ms has 3 bands'):
    model.apply({'params': params}, ms[..., :3], g)
  with pytest.raises(ValueError, match='guide has shape'):
    model.apply({'params': params}, ms, jnp.concatenate([g, g], -1))
  with pytest.raises(ValueError, match='NHWC'):
    model.apply({'params': params}, ms[0], g[0])


def test_gradients_finite():
  model = tiny()
  ms, g = _inputs(model, 2, 4, 4)
  params = models.init_params(model, jax.random.key(0), ms_size=4)
  gt = jax.random.uniform(jax.random.key(3), (2, 16, 16, 4))
  loss = lambda p: jnp.mean(jnp.abs(model.apply({'params': p}, ms, g) - gt))
  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert sum(float(jnp.abs(x).sum()) for x in leaves) > 0


def test_pixel_shuffle_matches_torch_order():
  # Channel c*16 + 4a + b goes to output channel c at pixel (4i + a, 4j + b).
  x = np.arange(2 * 3 * 32, dtype=np.float32).reshape(1, 2, 3, 32)
  y = np.asarray(u2net.pixel_shuffle(jnp.asarray(x), 4))
  for c, a, b, i, j in [(0, 0, 0, 0, 0), (1, 3, 2, 1, 2), (0, 2, 1, 1, 0)]:
    assert y[0, 4 * i + a, 4 * j + b, c] == x[0, i, j, c * 16 + 4 * a + b]


def test_conv_transpose_matches_definition():
  mod = u2net.ConvTranspose2x2(3)
  x = jax.random.normal(jax.random.key(0), (1, 2, 3, 5))
  params = mod.init(jax.random.key(1), x)
  y = np.asarray(mod.apply(params, x))
  k, bias = np.asarray(params['params']['kernel']), np.asarray(params['params']['bias'])
  xn = np.asarray(x)
  for i, j, a, b in [(0, 0, 0, 0), (1, 2, 1, 1), (1, 0, 0, 1)]:
    np.testing.assert_allclose(y[0, 2 * i + a, 2 * j + b], xn[0, i, j] @ k[a, b] + bias, rtol=1e-5)


def _official_case(npz_name, pth_name, config_name, guide_key, attention):
  ref = np.load(shared_path('official', npz_name))
  state_dict = convert.load_torch_state_dict(shared_path('official', pth_name))
  cfg = config_utils.load_config_file(REPO / 'configs' / f'{config_name}.py')
  params = convert.torch_to_flax(state_dict, cfg.model)
  model = models.create_model(cfg.model, attention=attention)
  ms = ref['ms'].transpose(0, 2, 3, 1)
  guide = ref[guide_key].transpose(0, 2, 3, 1)
  out = np.asarray(jax.jit(model.apply)({'params': params}, ms, guide))
  return np.abs(out.transpose(0, 3, 1, 2) - ref['out']).max()


@pytest.mark.slow
@pytest.mark.parametrize('attention', ['direct', 'blockwise'])
def test_official_wv3_weights_reproduce_official_output(attention):
  err = _official_case(
    'official_io_wv3_real.npz', 'u2net_wv3_200000_iter.pth', 'wv3', 'pan', attention
  )
  assert err <= 1e-4, err


@pytest.mark.slow
def test_official_hisr_architecture_reproduces_official_output():
  err = _official_case(
    'official_io_hisr_random_seed1.npz', 'u2net_hisr_random_seed1.pth', 'cave', 'guide', 'direct'
  )
  assert err <= 1e-4, err
