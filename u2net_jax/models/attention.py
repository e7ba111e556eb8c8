"""The S2Block's attention kernels: spatial self-correlation in three forms, and the spectral one.

The spatial self-correlation of the paper's Eq. 1, softmax(q k^T / sqrt(d)) v over the H*W tokens
of a level, in the forms `ATTENTION_KINDS` names (`config.model.attention`):

  'direct':    the (N x N) matrix materialised, as the official code does
               (`jax.nn.dot_product_attention`, XLA implementation).
  'blockwise': exact flash attention, one (query block x key block) tile at a time, with a
               custom backward pass: O(N d) memory at any N (whole-image inference).
  'cudnn':     `jax.nn.dot_product_attention`'s fused cuDNN kernel (GPU, bfloat16 mode only).
  'auto':      'direct' up to `AUTO_DIRECT_MAX_TOKENS` tokens per image, 'blockwise' above.

Arrays are (batch, tokens, heads, head_dim), `jax.nn.dot_product_attention`'s layout. In bfloat16
mode the logits and the softmax (and the blockwise form's logsumexp) are float32 in every form;
in float64 mode (reference precision, tests) everything is float64 (`accumulation_dtype`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ATTENTION_KINDS = ('direct', 'blockwise', 'cudnn', 'auto')
# On CPU the blockwise form is already 4-5x faster than the direct one at N = 256 and 1024
# (forward + backward of 16 images x 8 heads x 256 tokens, 16 x 4 x 1024); below, the direct
# form's few small ops are cheap and its (N x N) matrix is small.
AUTO_DIRECT_MAX_TOKENS = 64


def accumulation_dtype(dtype) -> jnp.dtype:
  """Logits, softmax and products accumulate in float32, or float64 for float64 operands."""
  return jnp.promote_types(dtype, jnp.float32)


def spatial_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, kind: str = 'auto', block_size: int = 128
) -> jax.Array:
  """C_spa v = softmax(q k^T / sqrt(d)) v (paper Eq. 1) in the form `kind` selects.

  Args:
    q, k, v: (B, N, heads, d).
    kind: one of `ATTENTION_KINDS`.
    block_size: queries per tile of the blockwise form.

  Returns:
    (B, N, heads, d), q's dtype.

  Raises:
    ValueError: `kind` is not one of `ATTENTION_KINDS`.
  """
  if kind not in ATTENTION_KINDS:
    raise ValueError(f'attention must be one of {ATTENTION_KINDS}, got {kind!r}')
  if kind == 'auto':
    kind = 'direct' if q.shape[1] <= AUTO_DIRECT_MAX_TOKENS else 'blockwise'
  if kind == 'direct':
    return direct_attention(q, k, v)
  if kind == 'cudnn':
    return cudnn_attention(q, k, v)
  return blockwise_attention(q, k, v, block_size)


def spectral_attention(x1: jax.Array, x2: jax.Array, value: jax.Array) -> jax.Array:
  """value C_spe, C_spe = softmax(x1^T x2 / sqrt(d) / (N / d)) per head (paper Eq. 2).

  The extra 1/(N/d) is the official code's scaling, not the paper's: the released weights need
  it, and it makes the result depend on the input size (a tiled image != the whole image). The
  (d x d) logits and the softmax are float32 whatever the input dtype.

  Args:
    x1, x2, value: (B, N, heads, d).

  Returns:
    (B, N, heads, d), value's dtype.
  """
  n, d = x1.shape[1], x1.shape[-1]
  logits = jnp.einsum(
    'bnhd,bnhe->bhde', x1, x2, preferred_element_type=accumulation_dtype(x1.dtype)
  )
  p = jax.nn.softmax(logits / math.sqrt(d) / (n / d), axis=-1).astype(value.dtype)
  return jnp.einsum('bnhd,bhde->bnhe', value, p)


def direct_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with the (N x N) matrix materialised (the official computation).

  `jax.nn.dot_product_attention` with its XLA implementation: the logits are computed in
  float32 (bfloat16 operands, float32 accumulation) and scaled by 1/sqrt(d) as the official code
  does, the softmax is float32, and the probabilities are cast to v's dtype for the product with
  v, so bfloat16 mode keeps float32 logits and softmax; in float32 mode it is exactly the
  materialised computation (tests/attention_test.py).

  Args:
    q, k, v: (B, N, heads, d).

  Returns:
    (B, N, heads, d), q's dtype.
  """
  if q.dtype == jnp.float64:  # dot_product_attention's softmax is float32 at most.
    logits = jnp.einsum('bnhd,bmhd->bhnm', q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum('bhnm,bmhd->bnhd', jax.nn.softmax(logits, axis=-1), v)
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`jax.nn.dot_product_attention` with cuDNN's fused kernel (GPU only, bfloat16/float16 q, k, v).

  Args:
    q, k, v: (B, N, heads, d).

  Returns:
    (B, N, heads, d).
  """
  return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')


# The blockwise form computes one (groups x query block x key block) tile of logits at a time,
# groups being (batch, head) pairs. The defaults keep a tile (and its exp) within a core's L2
# cache on CPU: a (1 x 128 x 4096) float32 tile is 2 MiB. Measured on the 2-core benchmark CPU
# for a WV3 training step's level-0 attention (16 images x 2 heads x 4096 tokens, forward +
# backward: 1.13 s), query blocks of 128 beat 64 and 256 by 15% and 70%; two key blocks of 2048
# cost the same as one of 4096. Key blocks of up to 8192 keep a 72 x 72 inference tile (5184
# tokens) in one key block, a plain softmax: its forward pass is 13% faster than with two online-
# softmax blocks of 2592 (0.97 against 1.11 ns per logit, 13 tiles x 2 heads, interleaved, idle
# machine, 2026-11-25), and a 128 x 5184 tile is still 2.6 MiB.
KEY_BLOCK_SIZE = 8192
TILE_ENTRIES = 128 * 4096


def _pad_tokens(x: jax.Array, size: int) -> jax.Array:
  """Zero-pads axis 1 of (G, N, ...) to `size` tokens."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, size - x.shape[1])
  return jnp.pad(x, pad)


def _tiles(x: jax.Array, groups: int, num_blocks: int, block: int) -> jax.Array:
  """(G, N, c) -> (G / groups, num_blocks, groups, block, c), zero-padded to num_blocks * block."""
  g, _, c = x.shape
  x = _pad_tokens(x, num_blocks * block).reshape(g // groups, groups, num_blocks, block, c)
  return x.transpose(0, 2, 1, 3, 4)


def _untile(x: jax.Array, n: int) -> jax.Array:
  """Inverse of `_tiles`: (G / groups, num_blocks, groups, block, c) -> (G, n, c)."""
  chunks, num_blocks, groups, block, c = x.shape
  x = x.transpose(0, 2, 1, 3, 4).reshape(chunks * groups, num_blocks * block, c)
  return x[:, :n]


def _balanced_block(n: int, max_block: int) -> tuple[int, int]:
  """(block, count): the fewest blocks of at most `max_block` covering n, of equal size.

  Equal blocks (rounded up to a multiple of 8) waste little padding: a 72 x 72 tile's 5184
  tokens make 2 key blocks of 2592, not 4096 + 1088 padded to 4096 (58% more work).
  """
  count = -(-n // max_block)
  if count == 1:
    return n, 1
  block = -(-n // count)  # ceil(n / count), then up to a multiple of 8:
  block = -(-block // 8) * 8
  return block, -(-n // block)


def _geometry(g: int, n: int, block_size: int, key_block_size: int):
  """Query block, key block, their counts and the groups per tile for G groups of n tokens."""
  bq, nq = _balanced_block(n, block_size)
  bk, nk = _balanced_block(n, key_block_size)
  target = max(1, TILE_ENTRIES // (bq * bk))
  groups = max(c for c in range(1, min(target, g) + 1) if g % c == 0)
  return bq, bk, nq, nk, groups


def _key_bias(n: int, bk: int, nk: int) -> jax.Array:
  """(nk, 1, 1, bk): 0 for real keys, -inf for the zero padding of the last key block."""
  idx = jnp.arange(nk * bk).reshape(nk, 1, 1, bk)
  return jnp.where(idx < n, 0.0, -jnp.inf).astype(jnp.float32)  # Promotes with the logits.


def _logits(q_blk: jax.Array, k_blk: jax.Array, bias: jax.Array) -> jax.Array:
  """(g, bq, d) x (g, bk, d) -> (g, bq, bk) accumulation-dtype logits (q pre-scaled by 1/sqrt d)."""
  acc = accumulation_dtype(q_blk.dtype)
  s = jnp.einsum('gqd,gkd->gqk', q_blk, k_blk, preferred_element_type=acc)
  return s + bias


def _flash_forward(q, k, v, block_size, key_block_size):
  """Online-softmax attention over (G, N, d) arrays; returns the output and the logsumexp."""
  g, n, d = q.shape
  acc_dt = accumulation_dtype(q.dtype)  # float32 (float64 in float64 mode).
  bq, bk, nq, nk, groups = _geometry(g, n, block_size, key_block_size)
  # Scaling q by 1/sqrt(16) = 1/4 is exact, so the logits equal the direct form's.
  qt = _tiles(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), groups, nq, bq)
  kt, vt = _tiles(k, groups, nk, bk), _tiles(v, groups, nk, bk)
  bias = _key_bias(n, bk, nk)

  def query_block(q_blk, k_all, v_all):
    def key_block(carry, kvb):
      m, l, acc = carry
      s = _logits(q_blk, kvb[0], kvb[2])
      m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
      p = jnp.exp(s - m_new)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1, keepdims=True)
      pv = jnp.einsum('gqk,gkd->gqd', p.astype(v.dtype), kvb[1], preferred_element_type=acc_dt)
      return (m_new, l, acc * corr + pv), None

    init = (
      jnp.full((groups, bq, 1), -jnp.inf, acc_dt),
      jnp.zeros((groups, bq, 1), acc_dt),
      jnp.zeros((groups, bq, d), acc_dt),
    )
    if nk == 1:  # One key block: a plain softmax, no rescaling.
      (m, l, acc), _ = key_block(init, (k_all[0], v_all[0], bias[0]))
    else:
      (m, l, acc), _ = jax.lax.scan(key_block, init, (k_all, v_all, bias))
    return (acc / l).astype(q.dtype), m + jnp.log(l)

  def chunk(_, xs):
    q_c, k_c, v_c = xs
    out, lse = jax.lax.map(lambda q_blk: query_block(q_blk, k_c, v_c), q_c)
    return None, (out, lse)

  _, (out, lse) = jax.lax.scan(chunk, None, (qt, kt, vt))
  return _untile(out, n), _untile(lse, n)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash_attention(q, k, v, block_size, key_block_size):
  return _flash_forward(q, k, v, block_size, key_block_size)[0]


def _flash_attention_fwd(q, k, v, block_size, key_block_size):
  out, lse = _flash_forward(q, k, v, block_size, key_block_size)
  return out, (q, k, v, out, lse)  # O(N d) residuals: never the N x N matrix.


def _flash_attention_bwd(block_size, key_block_size, residuals, g_out):
  """Recomputes each tile's probabilities from the saved logsumexp (FlashAttention-2 backward).

  dP = dO V^T, dS = P * (dP - rowsum(dO * O)); dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d),
  dV = P^T dO. Each tile is computed transposed, keys x queries (S^T = K Q^T): on XLA:CPU the
  16-wide products run ~1.8x faster producing (keys, queries) than (queries, keys), and dK, dV
  then come out in their own (keys, d) layout; the backward pass is ~22% faster than the
  (queries, keys) form (benchmarks/README.md).
  """
  q, k, v, out, lse = residuals
  g, n, d = q.shape
  acc_dt = accumulation_dtype(q.dtype)  # float32 (float64 in float64 mode).
  bq, bk, nq, nk, groups = _geometry(g, n, block_size, key_block_size)
  scale = 1.0 / math.sqrt(d)
  delta = jnp.sum(g_out.astype(acc_dt) * out.astype(acc_dt), axis=-1, keepdims=True)
  qt = _tiles(q * jnp.asarray(scale, q.dtype), groups, nq, bq)
  gt = _tiles(g_out, groups, nq, bq)
  # Per-query rows as (groups, 1, bq): they broadcast along the keys of a transposed tile.
  lse_t = _tiles(lse[..., None], groups, nq, bq).swapaxes(-1, -2)
  delta_t = _tiles(delta, groups, nq, bq).swapaxes(-1, -2)
  kt, vt = _tiles(k, groups, nk, bk), _tiles(v, groups, nk, bk)
  bias = _key_bias(n, bk, nk).swapaxes(-1, -2)  # (nk, 1, bk, 1)

  def chunk(_, xs):
    q_c, g_c, lse_c, delta_c, k_c, v_c = xs

    def query_block(carry, ys):
      dk_acc, dv_acc = carry  # (nk, groups, bk, d)
      q_blk, g_blk, lse_blk, delta_blk = ys

      def key_block(dq_t, kvb):
        k_blk, v_blk, bias_blk = kvb
        s_t = jnp.einsum('gkd,gqd->gkq', k_blk, q_blk, preferred_element_type=acc_dt)
        p_t = jnp.exp(s_t + bias_blk - lse_blk)
        dp_t = jnp.einsum('gkd,gqd->gkq', v_blk, g_blk, preferred_element_type=acc_dt)
        ds_t = (p_t * (dp_t - delta_blk)).astype(q.dtype)
        dq_t = dq_t + jnp.einsum('gkd,gkq->gdq', k_blk, ds_t, preferred_element_type=acc_dt)
        dk = jnp.einsum('gkq,gqd->gkd', ds_t, q_blk, preferred_element_type=acc_dt)
        dv = jnp.einsum(
          'gkq,gqd->gkd', p_t.astype(g_blk.dtype), g_blk, preferred_element_type=acc_dt
        )
        return dq_t, (dk, dv)

      dq0 = jnp.zeros((groups, d, bq), acc_dt)
      if nk == 1:
        dq_t, (dk, dv) = key_block(dq0, (k_c[0], v_c[0], bias[0]))
        dk, dv = dk[None], dv[None]
      else:
        dq_t, (dk, dv) = jax.lax.scan(key_block, dq0, (k_c, v_c, bias))
      return (dk_acc + dk, dv_acc + dv), dq_t.swapaxes(-1, -2)

    zeros = jnp.zeros((nk, groups, bk, d), acc_dt)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), (q_c, g_c, lse_c, delta_c))
    return None, (dq, dk, dv)

  _, (dq, dk, dv) = jax.lax.scan(chunk, None, (qt, gt, lse_t, delta_t, kt, vt))
  dq = _untile(dq, n) * scale
  return dq.astype(q.dtype), _untile(dk, n).astype(k.dtype), _untile(dv, n).astype(v.dtype)


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def blockwise_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  block_size: int = 128,
  key_block_size: int = KEY_BLOCK_SIZE,
) -> jax.Array:
  """Exact softmax(q k^T / sqrt(d)) v that never forms the N x N matrix (flash attention).

  The (N x N) logits are computed one (query block x key block) tile at a time, for a few
  (batch, head) groups at once, with an online softmax across key blocks (running maximum and
  sum, FlashAttention). Only the output and the per-query logsumexp are saved for the backward
  pass (a `jax.custom_vjp`), which recomputes each tile's probabilities, so memory is O(N d) at
  any N: whole-image inference is limited by time, not memory. Token counts that do not divide
  the blocks are zero-padded; padded keys get -inf logits and padded queries are cropped.
  Equal to `direct_attention` up to float32 rounding (tests/attention_test.py).

  Args:
    q, k, v: (B, N, heads, d).
    block_size: at most this many queries per tile (N is split into equal blocks).
    key_block_size: at most this many keys per tile (one block when N <= key_block_size: a
      plain softmax, no rescaling).

  Returns:
    (B, N, heads, d), q's dtype.
  """
  b, n, h, d = q.shape
  groups = lambda t: t.transpose(0, 2, 1, 3).reshape(b * h, n, t.shape[-1])
  out = _flash_attention(groups(q), groups(k), groups(v), block_size, key_block_size)
  return out.reshape(b, h, n, v.shape[-1]).transpose(0, 2, 1, 3)
