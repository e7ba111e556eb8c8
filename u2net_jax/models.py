"""U2Net: the spatial-spectral-integrated double U-Net (Peng et al., ACM MM 2023) in Flax Linen.

The modules compute exactly what the authors' official PyTorch code (PSRben/U2Net) computes, so
that the released weights run here (see `u2net_jax.convert`). Where the official code and the
paper differ, the code is followed and the comment says so. Layout is NHWC throughout:

  ms:    (B, h, w, C)     low-resolution multi/hyperspectral image
  guide: (B, 4h, 4w, c)   PAN (c = 1) or RGB (c = 3)
  out:   (B, 4h, 4w, C)

Sub-module names mirror the official state-dict names (`s2block0`, `down0`, `up1`, `to_hrms`,
...) so that the converter is a readable table of rules.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# The official code uses nn.LeakyReLU() everywhere: negative slope 0.01.
leaky_relu = functools.partial(nn.leaky_relu, negative_slope=0.01)

# PyTorch's default LayerNorm eps; Flax's default "fast variance" (E[x^2] - E[x]^2) is replaced
# by the two-pass variance PyTorch computes.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5, use_fast_variance=False)

# PyTorch's default initialisation, which the official training starts from (its Kaiming
# `init_weights` is defined but never called): weights and biases ~ U(-1/sqrt(fan_in), +...).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias initialiser U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# 'direct' materialises the (HW)x(HW) spatial matrix (the official computation); 'blockwise' never
# does (exact); 'cudnn' is jax.nn.dot_product_attention's fused GPU kernel (bfloat16 mode only);
# 'auto' picks 'direct' up to AUTO_DIRECT_MAX_TOKENS tokens per image and 'blockwise' above.
ATTENTION_KINDS = ('direct', 'blockwise', 'cudnn', 'auto')
# On CPU the blockwise form is already 4-5x faster than the direct one at N = 256 and 1024
# (forward + backward of 16 images x 8 heads x 256 tokens, 16 x 4 x 1024); below, the direct
# form's few small ops are cheap and its (N x N) matrix is small.
AUTO_DIRECT_MAX_TOKENS = 64

# Compute dtypes of the `dtype` attribute (parameters always stay float32).
DTYPES = ('float32', 'bfloat16')


def compute_dtype(name: str) -> jnp.dtype:
  """The jnp dtype for a `dtype` attribute ('float32' or 'bfloat16')."""
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {name!r}')
  return jnp.dtype(name)


def conv(
  features: int,
  in_features: int,
  name: str,
  kernel: int = 3,
  stride: int = 1,
  use_bias: bool = True,
  groups: int = 1,
  dtype: str = 'float32',
) -> nn.Conv:
  """PyTorch `Conv2d(in, out, kernel, stride, padding=kernel // 2 if odd else 0)` in NHWC.

  Zero padding 1 for 3x3 kernels, none for 1x1 and the 2x2 stride-2 downsampling convolutions;
  PyTorch's default initialisation (`in_features` gives the fan-in); float32 parameters, computed
  in `dtype`.
  """
  pad = kernel // 2 if kernel % 2 else 0
  fan_in = in_features // groups * kernel * kernel
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=use_bias,
    feature_group_count=groups,
    kernel_init=torch_kernel_init,
    bias_init=torch_bias_init(fan_in),
    dtype=compute_dtype(dtype),
    name=name,
  )


def dense(
  features: int, in_features: int, name: str, use_bias: bool = True, dtype: str = 'float32'
) -> nn.Dense:
  """PyTorch `Linear(in, out)` with its default initialisation, computed in `dtype`."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    kernel_init=torch_kernel_init,
    bias_init=torch_bias_init(in_features),
    dtype=compute_dtype(dtype),
    name=name,
  )


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
  """PyTorch `PixelShuffle` in NHWC: channel c*f*f + f*a + b -> channel c at (f*i + a, f*j + b).

  Args:
    x: (B, H, W, C * factor**2).
    factor: the upscaling factor f.

  Returns:
    (B, f*H, f*W, C).
  """
  b, h, w, cff = x.shape
  c = cff // (factor * factor)
  x = x.reshape(b, h, w, c, factor, factor)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, H, a, W, b, C)
  return x.reshape(b, h * factor, w * factor, c)


class Upsample(nn.Module):
  """The learned x`scale` upsampler of the MS image (official `Upsample`).

  A bias-free 3x3 convolution C -> scale^2 * C followed by a pixel shuffle. Its output is both
  the input of the spectral branch and the global skip added to the network output (the official
  code does not use a bicubic upsampled MS).
  """

  scale: int = 4
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = conv(channels * self.scale**2, channels, use_bias=False, dtype=self.dtype, name='conv')(x)
    return pixel_shuffle(x, self.scale)


class ConvTranspose2x2(nn.Module):
  """`ConvTranspose2d(in, out, kernel_size=2, stride=2)`: each pixel becomes a 2x2 block.

  With kernel size equal to the stride the output blocks do not overlap, so the transposed
  convolution is exactly one matrix product per pixel. Kernel layout (2, 2, in, out): tap (a, b)
  writes output pixel (2i + a, 2j + b).
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, cin = x.shape
    # PyTorch takes a ConvTranspose2d's fan-in from its weight's dim 1: out_channels * 2 * 2.
    fan_in = self.features * 4
    bound = 1.0 / math.sqrt(fan_in)
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound
    )
    kernel = self.param('kernel', init, (2, 2, cin, self.features), jnp.float32)
    bias = self.param('bias', init, (self.features,), jnp.float32)
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    y = jnp.einsum('bhwi,pqio->bhpwqo', x, kernel)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias


class ResBlock(nn.Module):
  """Official `ResBlock`: 3x3 conv d -> ratio*d, LReLU, 3x3 conv -> d, plus the input."""

  ratio: float = 0.5
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    hidden = int(self.ratio * dim)
    h = leaky_relu(conv(hidden, dim, dtype=self.dtype, name='conv0')(x))
    return x + conv(dim, hidden, dtype=self.dtype, name='conv1')(h)


class Down(nn.Module):
  """Official `Down(d -> 2d)` (its `conv` branch; `maxpool_conv` is built there but never used).

  2x2 conv stride 2 (d -> d), LReLU, 1x1 conv d -> 2d, depth-wise 3x3 conv, LReLU.
  """

  features: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim, f, dt = x.shape[-1], self.features, self.dtype
    x = leaky_relu(conv(dim, dim, kernel=2, stride=2, dtype=dt, name='conv0')(x))
    x = conv(f, dim, kernel=1, dtype=dt, name='conv1')(x)
    return leaky_relu(conv(f, f, groups=f, dtype=dt, name='conv2')(x))


class Up(nn.Module):
  """Official `Up(d -> d/2)` (its `up1` branch; `up0` is built there but never used).

  2x2 transposed conv stride 2 (d -> d/2), LReLU, add the skip, 3x3 conv, LReLU.
  """

  features: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x = leaky_relu(ConvTranspose2x2(self.features, name='up')(x))
    f = self.features
    return leaky_relu(conv(f, f, dtype=self.dtype, name='conv')(x + skip))


def _split_heads(t: jax.Array, head_dim: int) -> jax.Array:
  """(B, N, heads*head_dim) -> (B, heads, N, head_dim), channel = head*head_dim + j (einops)."""
  b, n, d = t.shape
  return t.reshape(b, n, d // head_dim, head_dim).transpose(0, 2, 1, 3)


def spatial_attention_direct(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with the (N x N) matrix materialised (the official computation).

  Logits and softmax are float32 whatever the input dtype (bfloat16 mode); the result has q's
  dtype.

  Args:
    q, k, v: (B, heads, N, d).

  Returns:
    (B, heads, N, d).
  """
  logits = jnp.einsum('bhnd,bhmd->bhnm', q, k, preferred_element_type=jnp.float32)
  p = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
  return jnp.einsum('bhnm,bhmd->bhnd', p, v, preferred_element_type=jnp.float32).astype(q.dtype)


# The blockwise form computes one (groups x query block x key block) tile of logits at a time,
# groups being (batch, head) pairs. The defaults keep a tile (and its exp) within a core's L2
# cache on CPU: a (1 x 128 x 4096) float32 tile is 2 MiB. Measured on the 2-core benchmark CPU
# for a WV3 training step's level-0 attention (16 images x 2 heads x 4096 tokens, forward +
# backward: 1.13 s), query blocks of 128 beat 64 and 256 by 15% and 70%; two key blocks of 2048
# cost the same as one of 4096.
KEY_BLOCK_SIZE = 4096
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
  return jnp.where(idx < n, 0.0, -jnp.inf).astype(jnp.float32)


def _logits(q_blk: jax.Array, k_blk: jax.Array, bias: jax.Array) -> jax.Array:
  """(g, bq, d) x (g, bk, d) -> float32 (g, bq, bk) logits (q is pre-scaled by 1/sqrt(d))."""
  s = jnp.einsum('gqd,gkd->gqk', q_blk, k_blk, preferred_element_type=jnp.float32)
  return s + bias


def _flash_forward(q, k, v, block_size, key_block_size):
  """Online-softmax attention over (G, N, d) arrays; returns the output and the logsumexp."""
  g, n, d = q.shape
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
      pv = jnp.einsum('gqk,gkd->gqd', p.astype(v.dtype), kvb[1], preferred_element_type=jnp.float32)
      return (m_new, l, acc * corr + pv), None

    init = (
      jnp.full((groups, bq, 1), -jnp.inf, jnp.float32),
      jnp.zeros((groups, bq, 1), jnp.float32),
      jnp.zeros((groups, bq, d), jnp.float32),
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
  dV = P^T dO. dK and dV are accumulated transposed, (d, keys): on XLA:CPU the product
  contracting the query axis is ~7x faster in that layout.
  """
  q, k, v, out, lse = residuals
  g, n, d = q.shape
  bq, bk, nq, nk, groups = _geometry(g, n, block_size, key_block_size)
  scale = 1.0 / math.sqrt(d)
  delta = jnp.sum(g_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  qt = _tiles(q * jnp.asarray(scale, q.dtype), groups, nq, bq)
  gt = _tiles(g_out, groups, nq, bq)
  lse_t, delta_t = _tiles(lse[..., None], groups, nq, bq), _tiles(delta, groups, nq, bq)
  kt, vt = _tiles(k, groups, nk, bk), _tiles(v, groups, nk, bk)
  bias = _key_bias(n, bk, nk)

  def chunk(_, xs):
    q_c, g_c, lse_c, delta_c, k_c, v_c = xs

    def query_block(carry, ys):
      dk_acc, dv_acc = carry  # (nk, groups, d, bk)
      q_blk, g_blk, lse_blk, delta_blk = ys

      def key_block(dq, kvb):
        k_blk, v_blk, bias_blk = kvb
        p = jnp.exp(_logits(q_blk, k_blk, bias_blk) - lse_blk)
        dp = jnp.einsum('gqd,gkd->gqk', g_blk, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_blk)).astype(q.dtype)
        dq = dq + jnp.einsum('gqk,gkd->gqd', ds, k_blk, preferred_element_type=jnp.float32)
        dk_t = jnp.einsum('gqd,gqk->gdk', q_blk, ds, preferred_element_type=jnp.float32)
        dv_t = jnp.einsum(
          'gqd,gqk->gdk', g_blk, p.astype(g_blk.dtype), preferred_element_type=jnp.float32
        )
        return dq, (dk_t, dv_t)

      dq0 = jnp.zeros((groups, bq, d), jnp.float32)
      if nk == 1:
        dq, (dk_t, dv_t) = key_block(dq0, (k_c[0], v_c[0], bias[0]))
        dk_t, dv_t = dk_t[None], dv_t[None]
      else:
        dq, (dk_t, dv_t) = jax.lax.scan(key_block, dq0, (k_c, v_c, bias))
      return (dk_acc + dk_t, dv_acc + dv_t), dq

    zeros = jnp.zeros((nk, groups, d, bk), jnp.float32)
    (dk_t, dv_t), dq = jax.lax.scan(query_block, (zeros, zeros), (q_c, g_c, lse_c, delta_c))
    return None, (dq, dk_t.swapaxes(-1, -2), dv_t.swapaxes(-1, -2))

  _, (dq, dk, dv) = jax.lax.scan(chunk, None, (qt, gt, lse_t, delta_t, kt, vt))
  dq = _untile(dq, n) * scale
  return dq.astype(q.dtype), _untile(dk, n).astype(k.dtype), _untile(dv, n).astype(v.dtype)


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def spatial_attention_blockwise(
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
  Equal to `spatial_attention_direct` up to float32 rounding (tests/attention_test.py).

  Args:
    q, k, v: (B, heads, N, d).
    block_size: at most this many queries per tile (N is split into equal blocks).
    key_block_size: at most this many keys per tile (one block when N <= key_block_size: a
      plain softmax, no rescaling).

  Returns:
    (B, heads, N, d).
  """
  b, h, n, d = q.shape
  flat = lambda t: t.reshape(b * h, n, t.shape[-1])
  out = _flash_attention(flat(q), flat(k), flat(v), block_size, key_block_size)
  return out.reshape(b, h, n, v.shape[-1])


def spatial_attention_cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`jax.nn.dot_product_attention` with cuDNN's fused kernel (GPU only, bfloat16/float16 q, k, v).

  Args:
    q, k, v: (B, heads, N, d).

  Returns:
    (B, heads, N, d).
  """
  bthd = lambda t: t.transpose(0, 2, 1, 3)
  out = jax.nn.dot_product_attention(bthd(q), bthd(k), bthd(v), implementation='cudnn')
  return bthd(out)


class S2Attention(nn.Module):
  """The S2Block's attention A(x, y): spatial and spectral self-correlation (paper Eqs. 1-3).

  x (spectral feature) and y (spatial feature) are token arrays (B, N, d) with N = H*W.
  Four bias-free projections d -> d, split into heads of width `head_dim`:
    y1 = sa1(y), y2 = sa2(y)  (spatial);  x1 = se1(x), x2 = se2(x)  (spectral).
  Spatial matrix:  C_spa = softmax(y1 y2^T / sqrt(head_dim)), (N x N) per head.
  Spectral matrix: C_spe = softmax(x1^T x2 / sqrt(head_dim) / (N / head_dim)), (hd x hd) per head.
    The extra 1/(N/head_dim) is the official code's scaling, not the paper's Eq. 2; the released
    weights need it, and it makes the function depend on the input size (tiled != whole image).
  Output: to_out(merge((C_spa x1) * (y1 C_spe))).

  Ablations (paper Sec. 4.5, Table 3), `mode`:
    'spatial_only' (V3): only C_spa, combined with the spectral feature map: to_out(C_spa x). No
      spectral projections (se1, se2); with `value_projection` the value is se1(x) instead of x.
    'spectral_only' (V4): only C_spe (from se1, se2), merged with the spatial feature map:
      to_out(y C_spe). No spatial projections (sa1, sa2); with `value_projection`, sa1(y).
  """

  heads: int
  head_dim: int = 16
  attention: str = 'auto'
  block_size: int = 128
  dtype: str = 'float32'
  mode: str = 'full'  # 'full' | 'spatial_only' | 'spectral_only'.
  value_projection: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    b, n, dim = x.shape
    inner = self.heads * self.head_dim
    proj = functools.partial(dense, inner, dim, use_bias=False, dtype=self.dtype)
    heads = functools.partial(_split_heads, head_dim=self.head_dim)
    mode = self.mode
    if mode not in ('full', 'spatial_only', 'spectral_only'):
      raise ValueError(
        f"S2Attention mode {mode!r}; expected 'full', 'spatial_only' or 'spectral_only'"
      )
    if mode == 'spatial_only':
      y1, y2 = heads(proj(name='sa1')(y)), heads(proj(name='sa2')(y))
      value = heads(proj(name='se1')(x) if self.value_projection else x)
      out = self._spatial(y1, y2, value, n)
    elif mode == 'spectral_only':
      x1, x2 = heads(proj(name='se1')(x)), heads(proj(name='se2')(x))
      value = heads(proj(name='sa1')(y) if self.value_projection else y)
      out = self._spectral(x1, x2, value, n)
    else:
      y1, y2 = heads(proj(name='sa1')(y)), heads(proj(name='sa2')(y))
      x1, x2 = heads(proj(name='se1')(x)), heads(proj(name='se2')(x))
      # (B, heads, N, hd): (C_spa x1) * (y1 C_spe).
      out = self._spatial(y1, y2, x1, n) * self._spectral(x1, x2, y1, n)
    out = out.transpose(0, 2, 1, 3).reshape(b, n, inner)
    return dense(dim, inner, dtype=self.dtype, name='to_out')(out)

  def _spectral(self, x1, x2, value, n):
    """value C_spe, C_spe = softmax(x1^T x2 / sqrt(hd) / (N / hd)) (the official scaling)."""
    f32 = jnp.float32
    logits = jnp.einsum('bhnd,bhne->bhde', x1, x2, preferred_element_type=f32)
    logits = logits / math.sqrt(self.head_dim) / (n / self.head_dim)
    p = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum('bhnd,bhde->bhne', value, p)

  def _spatial(self, q, k, v, n):
    """C_spa v for q, k, v (B, heads, N, hd) in the form `attention` selects."""
    kind = self.attention
    if kind not in ATTENTION_KINDS:
      raise ValueError(f'attention must be one of {ATTENTION_KINDS}, got {kind!r}')
    if kind == 'auto':
      kind = 'direct' if n <= AUTO_DIRECT_MAX_TOKENS else 'blockwise'
    if kind == 'direct':
      return spatial_attention_direct(q, k, v)
    if kind == 'cudnn':
      return spatial_attention_cudnn(q, k, v)
    return spatial_attention_blockwise(q, k, v, self.block_size)


class MLP(nn.Module):
  """Official `FeedForward`: Linear d -> hidden, LReLU, Linear hidden -> d (dropout 0)."""

  hidden: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = leaky_relu(dense(self.hidden, dim, dtype=self.dtype, name='fc1')(x))
    return dense(dim, self.hidden, dtype=self.dtype, name='fc2')(h)


class S2Block(nn.Module):
  """Spatial-spectral integration block (paper Sec. 3.3, Fig. 4), official form.

  x <- x + A(LN(x), LN(y)) with ONE LayerNorm applied to both x and y (the official PreNorm), then
  x <- x + MLP(LN2(x)). Only x is updated; y passes through unchanged.
  """

  head_dim: int = 16
  mlp_ratio: float = 0.5
  attention: str = 'auto'
  block_size: int = 128
  dtype: str = 'float32'
  mode: str = 'full'  # S2Attention's mode (ablations V3/V4).
  value_projection: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """x, y: (B, H, W, d) -> (B, H, W, d)."""
    b, hh, ww, dim = x.shape
    xt, yt = x.reshape(b, hh * ww, dim), y.reshape(b, hh * ww, dim)
    # LayerNorm statistics are float32 in either mode (Flax promotes them); outputs in `dtype`.
    dt = compute_dtype(self.dtype)
    norm = LayerNorm(dtype=dt, name='attn_norm')
    xt = xt + S2Attention(
      heads=dim // self.head_dim,
      head_dim=self.head_dim,
      attention=self.attention,
      block_size=self.block_size,
      dtype=self.dtype,
      mode=self.mode,
      value_projection=self.value_projection,
      name='attention',
    )(norm(xt), norm(yt))
    mlp = MLP(int(dim * self.mlp_ratio), dtype=self.dtype, name='mlp')
    xt = xt + mlp(LayerNorm(dtype=dt, name='mlp_norm')(xt))
    return xt.reshape(b, hh, ww, dim)


class ConcatFusion(nn.Module):
  """Ablation V2's replacement of the S2Block: concatenate x and y, project back to d channels.

  x <- W [x, y] + b (a 1x1 convolution 2d -> d); with `residual`, x <- x + W [x, y] + b.
  """

  residual: bool = False
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    fused = dense(dim, 2 * dim, dtype=self.dtype, name='proj')(jnp.concatenate([x, y], -1))
    return x + fused if self.residual else fused


VARIANTS = (
  'u2net',
  'v1_single_branch',
  'v2_concat',
  'v3_spatial_only',
  'v4_spectral_only',
  'u2net_l',
)


class U2Net(nn.Module):
  """The double U-Net (paper Fig. 3) exactly as the official `U2Net`, and the paper's variants.

  `variant` (paper Sec. 4.4-4.5; where the text leaves a choice open, the reading below is ours
  and the alternative is one attribute away):
    'u2net': the official network (bit-compatible with the released weights).
    'v1_single_branch' (V1): ONE U-shaped branch: the learned upsampled MS and the guide are
      concatenated and enter one 3x3 conv; every level keeps the S2Block structure, applied to the
      branch with itself (S2Block(z, z)), followed at levels 0-3 by the ResBlock
      (`single_branch_resblock=False` drops it); shared Down/Up and skips as in the official net.
    'v2_concat' (V2): the double U-Net with each S2Block replaced by `ConcatFusion` (concatenate,
      1x1 projection back to the level's width; `concat_residual=True` adds x back).
    'v3_spatial_only' (V3) / 'v4_spectral_only' (V4): S2Blocks whose attention forms only the
      spatial (resp. spectral) self-correlation matrices, merged with the spectral (resp. spatial)
      feature map without projecting it (`value_projection=True` projects it).
    'u2net_l': the official structure at a lightweight width; `configs/ablation.py:u2net_l` sets
      width 12 and head width 6 (heads 2/4/8 as the official model's): 85,658 parameters for 8
      bands, under the paper's 1e5 class boundary. The paper's exact widths are in its
      supplement, which is not public: this is our reconstruction.

  Attributes:
    spectral_bands: C, bands of the MS/HS input and of the output.
    guide_bands: c, bands of the guide (1 PAN, 3 RGB).
    width: S, the base width; stages have widths S, 2S, 4S, 2S, S.
    head_dim: S', the S2Block head width (heads = stage width / head_dim).
    mlp_ratio: S2Block MLP hidden width / stage width.
    resblock_ratio: ResBlock hidden width / stage width.
    scale: spatial ratio between guide and MS (4).
    attention: spatial attention form: 'direct', 'blockwise', 'cudnn' or 'auto'
      (`ATTENTION_KINDS`).
    attention_block_size: query block of the blockwise form.
    dtype: compute dtype, 'float32' (default, exact) or 'bfloat16' (for TPU/GPU: convolutions,
      projections and attention products in bfloat16 with float32 softmax and LayerNorm
      statistics). Parameters stay float32 and the output is float32 in either mode.
    variant: one of `VARIANTS` (above).
    single_branch_resblock, concat_residual, value_projection: the alternative readings of the
      V1, V2 and V3/V4 ablations (above).
  """

  spectral_bands: int = 8
  guide_bands: int = 1
  width: int = 32
  head_dim: int = 16
  mlp_ratio: float = 0.5
  resblock_ratio: float = 0.5
  scale: int = 4
  attention: str = 'auto'
  attention_block_size: int = 128
  dtype: str = 'float32'
  variant: str = 'u2net'
  single_branch_resblock: bool = True
  concat_residual: bool = False
  value_projection: bool = False

  def _check_inputs(self, ms: jax.Array, guide: jax.Array) -> None:
    if ms.ndim != 4 or guide.ndim != 4:
      raise ValueError(
        f'U2Net expects NHWC arrays: ms (B, h, w, {self.spectral_bands}) and guide '
        f'(B, {self.scale}h, {self.scale}w, {self.guide_bands}); got ms {ms.shape}, '
        f'guide {guide.shape}'
      )
    b, h, w, c = ms.shape
    expected_guide = (b, self.scale * h, self.scale * w, self.guide_bands)
    if c != self.spectral_bands:
      raise ValueError(
        f'ms has {c} bands (shape {ms.shape}) but the model is configured for '
        f'spectral_bands={self.spectral_bands}'
      )
    if tuple(guide.shape) != expected_guide:
      raise ValueError(
        f'guide has shape {guide.shape}; expected {expected_guide}: {self.scale}x the ms '
        f'size {(h, w)} with guide_bands={self.guide_bands}'
      )

  def _fusion_blocks(self) -> list[nn.Module]:
    """The five level fusions: S2Blocks (official, V1, V3, V4) or `ConcatFusion` (V2)."""
    if self.variant == 'v2_concat':
      return [
        ConcatFusion(self.concat_residual, dtype=self.dtype, name=f's2block{i}') for i in range(5)
      ]
    mode = {'v3_spatial_only': 'spatial_only', 'v4_spectral_only': 'spectral_only'}
    return [
      S2Block(
        self.head_dim,
        self.mlp_ratio,
        self.attention,
        self.attention_block_size,
        dtype=self.dtype,
        mode=mode.get(self.variant, 'full'),
        value_projection=self.value_projection,
        name=f's2block{i}',
      )
      for i in range(5)
    ]

  @nn.compact
  def __call__(self, ms: jax.Array, guide: jax.Array) -> jax.Array:
    """Fuses `ms` (B, h, w, C) with `guide` (B, 4h, 4w, c) into (B, 4h, 4w, C)."""
    if self.variant not in VARIANTS:
      raise ValueError(f'variant {self.variant!r}; expected one of {VARIANTS}')
    self._check_inputs(ms, guide)
    s, dt = self.width, self.dtype
    ms, guide = ms.astype(compute_dtype(dt)), guide.astype(compute_dtype(dt))
    dims = (s, 2 * s, 4 * s, 2 * s, s)
    s2 = self._fusion_blocks()
    res = [ResBlock(self.resblock_ratio, dtype=dt, name=f'resblock{i}') for i in range(4)]
    down0, down1 = Down(dims[1], dtype=dt, name='down0'), Down(dims[2], dtype=dt, name='down1')
    up0, up1 = Up(dims[3], dtype=dt, name='up0'), Up(dims[4], dtype=dt, name='up1')

    x = Upsample(self.scale, dtype=dt, name='upsample')(ms)
    skip_out = x  # The learned upsampled MS is the global skip.
    if self.variant == 'v1_single_branch':
      x = self._single_branch(x, guide, s2, res, (down0, down1), (up0, up1))
    else:
      x = self._double_branch(x, guide, s2, res, (down0, down1), (up0, up1))
    x = leaky_relu(conv(s, s, dtype=dt, name='to_hrms0')(x))
    out = conv(self.spectral_bands, s, dtype=dt, name='to_hrms1')(x)
    return out.astype(jnp.float32) + skip_out.astype(jnp.float32)

  def _double_branch(self, up_ms, guide, s2, res, downs, ups):
    """The official double U-Net: spectral branch x, spatial branch y, fused by the S2Blocks."""
    s, dt = self.width, self.dtype
    (down0, down1), (up0, up1) = downs, ups
    x = leaky_relu(conv(s, self.spectral_bands, dtype=dt, name='raise_ms_dim')(up_ms))
    y = leaky_relu(conv(s, self.guide_bands, dtype=dt, name='raise_guide_dim')(guide))

    # Levels 0 and 1: the SAME Down module (one set of weights) serves both branches.
    x = s2[0](x, y)
    skip_x0 = x
    x = down0(x)
    y = res[0](y)
    skip_y0 = y
    y = down0(y)

    x = s2[1](x, y)
    skip_x1 = x
    x = down1(x)
    y = res[1](y)
    skip_y1 = y
    y = down1(y)

    # Levels 2 and 3: the SAME Up module serves both branches.
    x = up0(s2[2](x, y), skip_x1)
    y = up0(res[2](y), skip_y1)

    x = up1(s2[3](x, y), skip_x0)
    y = up1(res[3](y), skip_y0)

    return s2[4](x, y)  # Level 4 has no ResBlock; y is not used further.

  def _single_branch(self, up_ms, guide, s2, res, downs, ups):
    """Ablation V1: one U-shaped branch z over the concatenated inputs, S2Block(z, z) per level."""
    s, dt = self.width, self.dtype
    (down0, down1), (up0, up1) = downs, ups
    z = jnp.concatenate([up_ms, guide], axis=-1)
    z = leaky_relu(conv(s, self.spectral_bands + self.guide_bands, dtype=dt, name='raise_dim')(z))

    def level(i, z):
      z = s2[i](z, z)
      return res[i](z) if self.single_branch_resblock else z

    skip0 = level(0, z)
    skip1 = level(1, down0(skip0))
    z = up0(level(2, down1(skip1)), skip1)
    z = up1(level(3, z), skip0)
    return s2[4](z, z)


def create_model(model_config) -> U2Net:
  """The U2Net a config's `model` section describes (`U2Net(**config.model)`)."""
  return U2Net(**dict(model_config))


def abstract_params(model: U2Net) -> dict:
  """The parameter tree's shapes and dtypes (`jax.ShapeDtypeStruct`s), computing nothing."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0), ms_size=4))


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def init_params(model: U2Net, rng: jax.Array, ms_size: int = 16) -> dict:
  """Initialises `model` (PyTorch's default scheme); returns the 'params' collection.

  Runs one jitted `model.init` on a (1, ms_size, ms_size, C) input. The non-partitionable
  threefry lowering is used because it compiles ~3x faster on CPU for the ~150 small random
  draws of this model; the parameters are a deterministic function of `rng` either way.
  """
  ms = jnp.zeros((1, ms_size, ms_size, model.spectral_bands), jnp.float32)
  guide = jnp.zeros(
    (1, model.scale * ms_size, model.scale * ms_size, model.guide_bands), jnp.float32
  )
  with jax.threefry_partitionable(False):
    return jax.jit(model.init)(rng, ms, guide)['params']
