"""Tests of the S2Block spatial attention forms: blockwise (flash) == direct, values and gradients.

The blockwise form must equal the direct (materialised, official) computation within 1e-5 on
random inputs, forward and backward, including token counts that do not divide the blocks, key
blocks that need the online-softmax rescaling, and several (batch, head) groups per tile. The
official-weights fidelity of the whole model with the blockwise form is `models_test.py`'s.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from u2net_jax import models

# (batch, heads, N, query block, key block): N = 37, 100 and 300 do not divide their blocks.
CASES = [
  (2, 2, 37, 16, 8),
  (1, 2, 64, 16, 64),
  (2, 3, 64, 128, 4096),  # One block each way: plain softmax, no padding.
  (3, 2, 100, 32, 48),
  (1, 4, 300, 128, 64),
  (2, 1, 300, 64, 300),
]


def _qkv(b, h, n, seed):
  q, k, v = jax.random.normal(jax.random.key(seed), (3, b, h, n, 16))
  cotangent = jax.random.normal(jax.random.key(seed + 1), (b, h, n, 16))
  return q, k, v, cotangent


@pytest.mark.parametrize('b,h,n,bq,bk', CASES)
def test_blockwise_equals_direct_forward_and_gradients(b, h, n, bq, bk):
  q, k, v, ct = _qkv(b, h, n, seed=n)
  blockwise = lambda q, k, v: models.spatial_attention_blockwise(q, k, v, bq, bk)
  out_d = models.spatial_attention_direct(q, k, v)
  out_b = jax.jit(blockwise)(q, k, v)
  np.testing.assert_allclose(out_b, out_d, atol=1e-5, rtol=0)

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)

  pairs = zip(grads(models.spatial_attention_direct), grads(blockwise), strict=True)
  for name, (gd, gb) in zip('qkv', pairs, strict=True):
    np.testing.assert_allclose(gb, gd, atol=1e-5, rtol=0, err_msg=f'd/d{name}')


def test_blockwise_peaked_logits_are_stable():
  """Large logits (a peaked softmax): the running maximum keeps exp() finite."""
  q, k, v, _ = _qkv(1, 2, 100, seed=3)
  q = q * 30.0
  out_d = models.spatial_attention_direct(q, k, v)
  out_b = models.spatial_attention_blockwise(q, k, v, 32, 16)
  assert np.isfinite(np.asarray(out_b)).all()
  np.testing.assert_allclose(out_b, out_d, atol=1e-5, rtol=0)


def test_blockwise_saves_no_quadratic_residuals():
  """The backward pass keeps O(N d) residuals: nothing of size N x N is saved by the forward."""
  n = 512
  q, k, v, _ = _qkv(1, 2, n, seed=5)
  fn = lambda q, k, v: models.spatial_attention_blockwise(q, k, v, 64, 128)
  _, vjp = jax.vjp(fn, q, k, v)
  sizes = [x.size for x in jax.tree_util.tree_leaves(vjp)]
  assert max(sizes) <= 2 * n * 16, sizes


def test_bfloat16_blockwise_close_to_float32():
  q, k, v, _ = _qkv(2, 2, 100, seed=7)
  ref = models.spatial_attention_direct(q, k, v)
  bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
  for out in (
    models.spatial_attention_blockwise(*bf, 32, 48),
    models.spatial_attention_direct(*bf),
  ):
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_auto_dispatch_and_bad_kind():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 16))
  for kind in ('auto', 'direct', 'blockwise'):
    block = models.S2Block(attention=kind)
    params = block.init(jax.random.key(1), x, x)
    assert block.apply(params, x, x).shape == x.shape
  with pytest.raises(ValueError, match='attention must be one of'):
    models.S2Block(attention='flash').init(jax.random.key(1), x, x)


def test_model_dtype_bfloat16_keeps_float32_params_and_output():
  model = models.U2Net(spectral_bands=4, width=16, head_dim=8, dtype='bfloat16')
  params = models.init_params(model, jax.random.key(0), ms_size=4)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  ms = jax.random.uniform(jax.random.key(1), (1, 4, 4, 4))
  guide = jax.random.uniform(jax.random.key(2), (1, 16, 16, 1))
  out = model.apply({'params': params}, ms, guide)
  ref = models.U2Net(spectral_bands=4, width=16, head_dim=8).apply({'params': params}, ms, guide)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.1
  with pytest.raises(ValueError, match='dtype must be one of'):
    nn.Module.init(
      models.U2Net(spectral_bands=4, width=16, dtype='float16'), jax.random.key(0), ms, guide
    )
