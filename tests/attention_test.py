"""Tests of `u2net_jax.models.attention`: blockwise (flash) == direct, values, gradients, dispatch.

The direct form must be the materialised official computation; the blockwise form must equal it
within 1e-5 on random inputs, forward and backward, including token counts that do not divide
the blocks, key blocks that need the online-softmax rescaling, and several (batch, head) groups
per tile. The official-weights fidelity of the whole model with either form is `models_test.py`'s.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from u2net_jax import models
from u2net_jax.models import attention, u2net

# (batch, heads, N, query block, key block): N = 37, 100 and 300 do not divide their blocks.
# Arrays are (batch, N, heads, d), `jax.nn.dot_product_attention`'s layout.
CASES = [
  (2, 2, 37, 16, 8),
  (1, 2, 64, 16, 64),
  (2, 3, 64, 128, 4096),  # One block each way: plain softmax, no padding.
  (3, 2, 100, 32, 48),
  (1, 4, 300, 128, 64),
  (2, 1, 300, 64, 300),
]


def _qkv(b, h, n, seed):
  """Random q, k, v and an output cotangent, (b, n, h, 16) (drawn as (b, h, n, 16))."""
  q, k, v = jax.random.normal(jax.random.key(seed), (3, b, h, n, 16)).transpose(0, 1, 3, 2, 4)
  cotangent = jax.random.normal(jax.random.key(seed + 1), (b, h, n, 16)).transpose(0, 2, 1, 3)
  return q, k, v, cotangent


def _materialised(q, k, v):
  """The official computation: softmax(q k^T * d^-0.5) v with float32 logits, (B, N, heads, d)."""
  logits = jnp.einsum('bnhd,bmhd->bhnm', q, k, preferred_element_type=jnp.float32)
  p = jax.nn.softmax(logits * (1.0 / math.sqrt(q.shape[-1])), axis=-1).astype(v.dtype)
  out = jnp.einsum('bhnm,bmhd->bnhd', p, v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def test_direct_is_the_materialised_computation():
  """jax.nn.dot_product_attention (XLA) computes the official matrix, float32 softmax included."""
  q, k, v, _ = _qkv(2, 2, 100, seed=11)
  np.testing.assert_allclose(attention.direct_attention(q, k, v), _materialised(q, k, v), atol=1e-6)
  bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
  out = attention.direct_attention(*bf)
  assert out.dtype == jnp.bfloat16
  # bfloat16 operands, float32 logits and softmax: the same as the materialised form's.
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(_materialised(*bf), np.float32), atol=1e-2
  )


@pytest.mark.parametrize('b,h,n,bq,bk', CASES)
def test_blockwise_equals_direct_forward_and_gradients(b, h, n, bq, bk):
  q, k, v, ct = _qkv(b, h, n, seed=n)
  blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, bq, bk)
  out_d = attention.direct_attention(q, k, v)
  out_b = jax.jit(blockwise)(q, k, v)
  np.testing.assert_allclose(out_b, out_d, atol=1e-5, rtol=0)

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)

  pairs = zip(grads(attention.direct_attention), grads(blockwise), strict=True)
  for name, (gd, gb) in zip('qkv', pairs, strict=True):
    np.testing.assert_allclose(gb, gd, atol=1e-5, rtol=0, err_msg=f'd/d{name}')


def test_blockwise_peaked_logits_are_stable():
  """Large logits (a peaked softmax): the running maximum keeps exp() finite, and exact.

  With logits up to ~150 float32 rounds each logit by ~1e-5, so two float32 forms differ by that
  much whatever their order of operations: exactness is compared in float64, stability (no
  overflow) in both precisions.
  """
  q, k, v, _ = _qkv(1, 2, 100, seed=3)
  q = q * 30.0
  assert np.isfinite(np.asarray(attention.blockwise_attention(q, k, v, 32, 16))).all()
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(t, jnp.float64) for t in (q, k, v))
    out_d = attention.direct_attention(q, k, v)
    out_b = attention.blockwise_attention(q, k, v, 32, 16)
    assert out_b.dtype == jnp.float64 and np.isfinite(np.asarray(out_b)).all()
    np.testing.assert_allclose(out_b, out_d, atol=1e-5, rtol=0)


def test_blockwise_saves_no_quadratic_residuals():
  """The backward pass keeps O(N d) residuals: nothing of size N x N is saved by the forward."""
  n = 512
  q, k, v, _ = _qkv(1, 2, n, seed=5)
  fn = lambda q, k, v: attention.blockwise_attention(q, k, v, 64, 128)
  _, vjp = jax.vjp(fn, q, k, v)
  sizes = [x.size for x in jax.tree_util.tree_leaves(vjp)]
  assert max(sizes) <= 2 * n * 16, sizes


def test_bfloat16_blockwise_close_to_float32():
  q, k, v, _ = _qkv(2, 2, 100, seed=7)
  ref = attention.direct_attention(q, k, v)
  bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
  for out in (
    attention.blockwise_attention(*bf, 32, 48),
    attention.direct_attention(*bf),
  ):
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_blockwise_equals_direct_default_key_block():
  """Default key blocks (one block, a plain softmax) at several query blocks."""
  key = jax.random.key(0)
  for n, block in [(64, 16), (100, 32), (37, 512)]:
    q, k, v = jax.random.normal(key, (3, 3, 2, n, 16)).transpose(0, 1, 3, 2, 4)
    direct = attention.direct_attention(q, k, v)
    blockwise = attention.blockwise_attention(q, k, v, block)
    np.testing.assert_allclose(blockwise, direct, atol=1e-5)


def test_spatial_attention_dispatch():
  small, _, _, _ = _qkv(1, 2, attention.AUTO_DIRECT_MAX_TOKENS, seed=1)
  large, _, _, _ = _qkv(1, 2, attention.AUTO_DIRECT_MAX_TOKENS + 36, seed=2)
  for x, form in [(small, attention.direct_attention), (large, attention.blockwise_attention)]:
    np.testing.assert_array_equal(attention.spatial_attention(x, x, x, 'auto'), form(x, x, x))
  np.testing.assert_array_equal(
    attention.spatial_attention(large, large, large, 'blockwise', block_size=32),
    attention.blockwise_attention(large, large, large, 32),
  )
  with pytest.raises(ValueError, match=r"attention must be one of .*got 'flash'"):
    attention.spatial_attention(small, small, small, 'flash')


def test_spectral_attention_official_scaling():
  """value C_spe with C_spe = softmax(x1^T x2 / sqrt(d) / (N / d)) per head (official code)."""
  x1, x2, value, _ = _qkv(2, 3, 20, seed=4)
  out = attention.spectral_attention(x1, x2, value)
  a, b, val = (np.asarray(t, np.float64) for t in (x1, x2, value))
  logits = np.einsum('bnhd,bnhe->bhde', a, b) / 4.0 / (20 / 16)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum('bnhd,bhde->bnhe', val, p), atol=1e-5)


def test_auto_dispatch_and_bad_kind():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 16))
  for kind in ('auto', 'direct', 'blockwise'):
    block = u2net.S2Block(attention=kind)
    params = block.init(jax.random.key(1), x, x)
    assert block.apply(params, x, x).shape == x.shape
  with pytest.raises(ValueError, match='attention must be one of'):
    u2net.S2Block(attention='flash').init(jax.random.key(1), x, x)


def test_model_dtype_bfloat16_keeps_float32_params_and_output():
  model = u2net.U2Net(spectral_bands=4, width=16, head_dim=8, dtype='bfloat16')
  params = models.init_params(model, jax.random.key(0), ms_size=4)
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  ms = jax.random.uniform(jax.random.key(1), (1, 4, 4, 4))
  guide = jax.random.uniform(jax.random.key(2), (1, 16, 16, 1))
  out = jax.jit(model.apply)({'params': params}, ms, guide)
  reference = u2net.U2Net(spectral_bands=4, width=16, head_dim=8)
  ref = jax.jit(reference.apply)({'params': params}, ms, guide)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - ref).max()) < 0.1
  with pytest.raises(ValueError, match='dtype must be one of'):
    nn.Module.init(
      u2net.U2Net(spectral_bands=4, width=16, dtype='float16'), jax.random.key(0), ms, guide
    )
