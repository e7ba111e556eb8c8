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


ATTENTION_KINDS = ('direct', 'blockwise', 'auto')
# 'auto' materialises the (HW)x(HW) spatial matrix only up to this many tokens per image.
AUTO_DIRECT_MAX_TOKENS = 1024


def conv(
  features: int,
  in_features: int,
  name: str,
  kernel: int = 3,
  stride: int = 1,
  use_bias: bool = True,
  groups: int = 1,
) -> nn.Conv:
  """PyTorch `Conv2d(in, out, kernel, stride, padding=kernel // 2 if odd else 0)` in NHWC.

  Zero padding 1 for 3x3 kernels, none for 1x1 and the 2x2 stride-2 downsampling convolutions;
  PyTorch's default initialisation (`in_features` gives the fan-in).
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
    name=name,
  )


def dense(features: int, in_features: int, name: str, use_bias: bool = True) -> nn.Dense:
  """PyTorch `Linear(in, out)` with its default initialisation."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    kernel_init=torch_kernel_init,
    bias_init=torch_bias_init(in_features),
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = conv(channels * self.scale**2, channels, use_bias=False, name='conv')(x)
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

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    hidden = int(self.ratio * dim)
    h = leaky_relu(conv(hidden, dim, name='conv0')(x))
    return x + conv(dim, hidden, name='conv1')(h)


class Down(nn.Module):
  """Official `Down(d -> 2d)` (its `conv` branch; `maxpool_conv` is built there but never used).

  2x2 conv stride 2 (d -> d), LReLU, 1x1 conv d -> 2d, depth-wise 3x3 conv, LReLU.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = leaky_relu(conv(dim, dim, kernel=2, stride=2, name='conv0')(x))
    x = conv(self.features, dim, kernel=1, name='conv1')(x)
    f = self.features
    return leaky_relu(conv(f, f, groups=f, name='conv2')(x))


class Up(nn.Module):
  """Official `Up(d -> d/2)` (its `up1` branch; `up0` is built there but never used).

  2x2 transposed conv stride 2 (d -> d/2), LReLU, add the skip, 3x3 conv, LReLU.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    x = leaky_relu(ConvTranspose2x2(self.features, name='up')(x))
    return leaky_relu(conv(self.features, self.features, name='conv')(x + skip))


def _split_heads(t: jax.Array, head_dim: int) -> jax.Array:
  """(B, N, heads*head_dim) -> (B, heads, N, head_dim), channel = head*head_dim + j (einops)."""
  b, n, d = t.shape
  return t.reshape(b, n, d // head_dim, head_dim).transpose(0, 2, 1, 3)


def spatial_attention_direct(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v with the (N x N) matrix materialised (the official computation).

  Args:
    q, k, v: (B, heads, N, d).

  Returns:
    (B, heads, N, d).
  """
  logits = jnp.einsum('bhnd,bhmd->bhnm', q, k) / math.sqrt(q.shape[-1])
  return jnp.einsum('bhnm,bhmd->bhnd', jax.nn.softmax(logits, axis=-1), v)


def spatial_attention_blockwise(
  q: jax.Array, k: jax.Array, v: jax.Array, block_size: int = 512
) -> jax.Array:
  """Exact softmax(q k^T / sqrt(d)) v over query blocks, never forming the N x N matrix.

  Queries are processed `block_size` at a time (the last block zero-padded and cropped); each
  block is rematerialised in the backward pass, so peak memory is O(block_size * N) per head.

  Args:
    q, k, v: (B, heads, N, d).
    block_size: queries per block.

  Returns:
    (B, heads, N, d).
  """
  b, h, n, d = q.shape
  block = min(block_size, n)
  num_blocks = -(-n // block)
  pad = num_blocks * block - n
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
  qb = qp.reshape(b, h, num_blocks, block, d).transpose(2, 0, 1, 3, 4)

  @jax.checkpoint
  def one_block(q_blk):
    return spatial_attention_direct(q_blk, k, v)

  out = jax.lax.map(one_block, qb)  # (num_blocks, B, heads, block, d)
  out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, num_blocks * block, d)
  return out[:, :, :n]


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
  """

  heads: int
  head_dim: int = 16
  attention: str = 'auto'
  block_size: int = 512

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    b, n, dim = x.shape
    inner = self.heads * self.head_dim
    proj = functools.partial(dense, inner, dim, use_bias=False)
    y1, y2 = (_split_heads(proj(name=nm)(y), self.head_dim) for nm in ('sa1', 'sa2'))
    x1, x2 = (_split_heads(proj(name=nm)(x), self.head_dim) for nm in ('se1', 'se2'))

    spatial = self._spatial(y1, y2, x1, n)  # (B, heads, N, hd): C_spa x1

    spectral_logits = jnp.einsum('bhnd,bhne->bhde', x1, x2)
    spectral_logits = spectral_logits / math.sqrt(self.head_dim) / (n / self.head_dim)
    spectral = jnp.einsum('bhnd,bhde->bhne', y1, jax.nn.softmax(spectral_logits, axis=-1))

    out = (spatial * spectral).transpose(0, 2, 1, 3).reshape(b, n, inner)
    return dense(dim, inner, name='to_out')(out)

  def _spatial(self, q, k, v, n):
    kind = self.attention
    if kind not in ATTENTION_KINDS:
      raise ValueError(f'attention must be one of {ATTENTION_KINDS}, got {kind!r}')
    if kind == 'auto':
      kind = 'direct' if n <= AUTO_DIRECT_MAX_TOKENS else 'blockwise'
    if kind == 'direct':
      return spatial_attention_direct(q, k, v)
    return spatial_attention_blockwise(q, k, v, self.block_size)


class MLP(nn.Module):
  """Official `FeedForward`: Linear d -> hidden, LReLU, Linear hidden -> d (dropout 0)."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = leaky_relu(dense(self.hidden, dim, name='fc1')(x))
    return dense(dim, self.hidden, name='fc2')(h)


class S2Block(nn.Module):
  """Spatial-spectral integration block (paper Sec. 3.3, Fig. 4), official form.

  x <- x + A(LN(x), LN(y)) with ONE LayerNorm applied to both x and y (the official PreNorm), then
  x <- x + MLP(LN2(x)). Only x is updated; y passes through unchanged.
  """

  head_dim: int = 16
  mlp_ratio: float = 0.5
  attention: str = 'auto'
  block_size: int = 512

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """x, y: (B, H, W, d) -> (B, H, W, d)."""
    b, hh, ww, dim = x.shape
    xt, yt = x.reshape(b, hh * ww, dim), y.reshape(b, hh * ww, dim)
    norm = LayerNorm(name='attn_norm')
    xt = xt + S2Attention(
      heads=dim // self.head_dim,
      head_dim=self.head_dim,
      attention=self.attention,
      block_size=self.block_size,
      name='attention',
    )(norm(xt), norm(yt))
    xt = xt + MLP(int(dim * self.mlp_ratio), name='mlp')(LayerNorm(name='mlp_norm')(xt))
    return xt.reshape(b, hh, ww, dim)


class U2Net(nn.Module):
  """The double U-Net (paper Fig. 3) exactly as the official `U2Net`.

  Attributes:
    spectral_bands: C, bands of the MS/HS input and of the output.
    guide_bands: c, bands of the guide (1 PAN, 3 RGB).
    width: S, the base width; stages have widths S, 2S, 4S, 2S, S.
    head_dim: S', the S2Block head width (heads = stage width / head_dim).
    mlp_ratio: S2Block MLP hidden width / stage width.
    resblock_ratio: ResBlock hidden width / stage width.
    scale: spatial ratio between guide and MS (4).
    attention: spatial attention form: 'direct', 'blockwise' or 'auto'.
    attention_block_size: query block of the blockwise form.
  """

  spectral_bands: int = 8
  guide_bands: int = 1
  width: int = 32
  head_dim: int = 16
  mlp_ratio: float = 0.5
  resblock_ratio: float = 0.5
  scale: int = 4
  attention: str = 'auto'
  attention_block_size: int = 512

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

  @nn.compact
  def __call__(self, ms: jax.Array, guide: jax.Array) -> jax.Array:
    """Fuses `ms` (B, h, w, C) with `guide` (B, 4h, 4w, c) into (B, 4h, 4w, C)."""
    self._check_inputs(ms, guide)
    s = self.width
    dims = (s, 2 * s, 4 * s, 2 * s, s)
    s2 = [
      S2Block(
        self.head_dim,
        self.mlp_ratio,
        self.attention,
        self.attention_block_size,
        name=f's2block{i}',
      )
      for i in range(5)
    ]
    res = [ResBlock(self.resblock_ratio, name=f'resblock{i}') for i in range(4)]
    down0, down1 = Down(dims[1], name='down0'), Down(dims[2], name='down1')
    up0, up1 = Up(dims[3], name='up0'), Up(dims[4], name='up1')

    x = Upsample(self.scale, name='upsample')(ms)
    skip_out = x  # The learned upsampled MS is the global skip.
    x = leaky_relu(conv(s, self.spectral_bands, name='raise_ms_dim')(x))
    y = leaky_relu(conv(s, self.guide_bands, name='raise_guide_dim')(guide))

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

    x = s2[4](x, y)  # Level 4 has no ResBlock; y is not used further.
    x = leaky_relu(conv(s, s, name='to_hrms0')(x))
    return conv(self.spectral_bands, s, name='to_hrms1')(x) + skip_out


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
