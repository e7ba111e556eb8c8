"""U2Net: the spatial-spectral-integrated double U-Net (Peng et al., ACM MM 2023) in Flax Linen.

The modules compute exactly what the authors' official PyTorch code (PSRben/U2Net) computes, so
that the released weights run here (see `u2net_jax.convert`). Where the official code and the
paper differ, the code is followed and the comment says so. Layout is NHWC throughout:

  ms:    (B, h, w, C)     low-resolution multi/hyperspectral image
  guide: (B, 4h, 4w, c)   PAN (c = 1) or RGB (c = 3)
  out:   (B, 4h, 4w, C)

Sub-module names mirror the official state-dict names (`s2block0`, `down0`, `up1`, `to_hrms`,
...) so that the converter is a readable table of rules. The attention kernels live in
`u2net_jax.models.attention`; `create_model(config.model)` builds the network or one of the paper's
variants (`VARIANTS`).

Size: ~650 lines, kept in one file on purpose: the official network's modules and the paper's
four ablations plus U2Net-L share every building block, and the variant table and factory must
sit beside the attributes they resolve; the kernels are elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import attention as attention_lib
from u2net_jax.models import registry

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


# Compute dtypes of the `dtype` attribute (parameters always stay float32). 'float64' is reference
# precision for tests and analysis on CPU (it needs `jax.enable_x64`).
DTYPES = ('float32', 'bfloat16', 'float64')


def compute_dtype(name: str) -> jnp.dtype:
  """The jnp dtype for a `dtype` attribute (one of `DTYPES`)."""
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {name!r}')
  if name == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError("dtype='float64' needs 64-bit JAX: run it inside `with jax.enable_x64(True):`")
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


# S2Attention's forms: the official one, and ablations V3 and V4.
S2_MODES = ('full', 'spatial_only', 'spectral_only')


class S2Attention(nn.Module):
  """The S2Block's attention A(x, y): spatial and spectral self-correlation (paper Eqs. 1-3).

  x (spectral feature) and y (spatial feature) are token arrays (B, N, d) with N = H*W.
  Four bias-free projections d -> d, split into heads of width `head_dim`:
    y1 = sa1(y), y2 = sa2(y)  (spatial);  x1 = se1(x), x2 = se2(x)  (spectral).
  Spatial matrix:  C_spa = softmax(y1 y2^T / sqrt(head_dim)), (N x N) per head.
  Spectral matrix: C_spe = softmax(x1^T x2 / sqrt(head_dim) / (N / head_dim)), (hd x hd) per head.
    The extra 1/(N/head_dim) is the official code's scaling, not the paper's Eq. 2; the released
    weights need it, and it makes the function depend on the input size (tiled != whole image).
  Output: to_out(merge((C_spa x1) * (y1 C_spe))). The two products are
  `attention_lib.spatial_attention` (in the form `attention` selects) and `spectral_attention`.

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
  mode: str = 'full'  # One of S2_MODES.
  value_projection: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    b, n, dim = x.shape
    inner = self.heads * self.head_dim
    proj = functools.partial(dense, inner, dim, use_bias=False, dtype=self.dtype)
    # (B, N, heads * hd) -> (B, N, heads, hd): channel head * hd + j, the official einops split.
    heads = lambda t: t.reshape(b, n, self.heads, self.head_dim)
    spatial = functools.partial(
      attention_lib.spatial_attention, kind=self.attention, block_size=self.block_size
    )
    spectral = attention_lib.spectral_attention
    if self.mode not in S2_MODES:
      raise ValueError(f'S2Attention mode {self.mode!r}; expected one of {S2_MODES}')
    if self.mode == 'spatial_only':
      y1, y2 = heads(proj(name='sa1')(y)), heads(proj(name='sa2')(y))
      out = spatial(y1, y2, heads(proj(name='se1')(x) if self.value_projection else x))
    elif self.mode == 'spectral_only':
      x1, x2 = heads(proj(name='se1')(x)), heads(proj(name='se2')(x))
      out = spectral(x1, x2, heads(proj(name='sa1')(y) if self.value_projection else y))
    else:
      y1, y2 = heads(proj(name='sa1')(y)), heads(proj(name='sa2')(y))
      x1, x2 = heads(proj(name='se1')(x)), heads(proj(name='se2')(x))
      out = spatial(y1, y2, x1) * spectral(x1, x2, y1)  # (C_spa x1) * (y1 C_spe).
    return dense(dim, inner, dtype=self.dtype, name='to_out')(out.reshape(b, n, inner))


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


# The paper's network and its variants (Secs. 4.4-4.5; `U2Net` describes each), with the model
# fields each one sets when a config leaves them unset (None). A switch (`VARIANT_SWITCHES`) is
# listed, with its default reading, under the variants it applies to, and only there.
VARIANTS: dict[str, dict[str, Any]] = {
  'u2net': {},
  'v1_single_branch': {'single_branch_resblock': True},
  'v2_concat': {'concat_residual': False},
  'v3_spatial_only': {'value_projection': False},
  'v4_spectral_only': {'value_projection': False},
  # U2Net-L: the official structure at width 12 with head width 6, i.e. the official model's
  # 2/4/8 heads per level: 85,658 parameters for 8 bands, under the paper's 1e5-parameter class
  # boundary. The paper's exact widths are in its supplement, which is not public: this is our
  # reconstruction.
  'u2net_l': {'width': 12, 'head_dim': 6},
}
VARIANT_SWITCHES = ('single_branch_resblock', 'concat_residual', 'value_projection')

# The official base width S of an unset `width` (variants other than u2net_l), by the guide the
# task uses: 32 for pansharpening (a 1-band PAN guide, paper Sec. 4.1), 64 for HISR (a 3-band RGB
# guide, Sec. 5.1). Both use head width S' = 16, `U2Net.head_dim`'s default.
OFFICIAL_WIDTHS = {1: 32, 3: 64}


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
    'u2net_l': U2Net-L, the official structure at a lightweight width (`VARIANTS`).

  Build it with `create_model(config.model)`, which fills the fields a config leaves unset from
  the variant (`VARIANTS`) and checks that the switches set apply to it; the attributes' defaults
  are the official WV3 network's.

  Attributes:
    spectral_bands: C, bands of the MS/HS input and of the output.
    guide_bands: c, bands of the guide (1 PAN, 3 RGB).
    width: S, the base width; stages have widths S, 2S, 4S, 2S, S.
    head_dim: S', the S2Block head width (heads = stage width / head_dim).
    mlp_ratio: S2Block MLP hidden width / stage width.
    resblock_ratio: ResBlock hidden width / stage width.
    scale: spatial ratio between guide and MS (4).
    attention: spatial attention form: 'direct', 'blockwise', 'cudnn' or 'auto'
      (`u2net_jax.models.attention.ATTENTION_KINDS`).
    attention_block_size: query block of the blockwise form.
    dtype: compute dtype, 'float32' (default, exact) or 'bfloat16' (for TPU/GPU: convolutions,
      projections and attention products in bfloat16 with float32 softmax and LayerNorm
      statistics), or 'float64' (reference precision on CPU, under `jax.enable_x64`).
      Parameters stay float32 (float64 in float64 mode, as given) and the output is float32
      (float64 in float64 mode).
    variant: one of `VARIANTS` (above).
    single_branch_resblock, concat_residual, value_projection: the alternative readings of the
      V1, V2 and V3/V4 ablations (above); ignored by the other variants.
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
    out_dtype = jnp.promote_types(compute_dtype(dt), jnp.float32)  # float32 unless float64 mode.
    return out.astype(out_dtype) + skip_out.astype(out_dtype)

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


def resolve_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
  """The `U2Net` arguments that a config's `model` section means, each unset field resolved.

  maxim's `Model(variant=..., **overrides)` pattern: a field left unset (None; `configs/default.py`
  leaves `width`, `head_dim` and the switches unset) takes the variant's value (`VARIANTS`), else
  the task's official width (`OFFICIAL_WIDTHS`, from `guide_bands`), else `U2Net`'s default; a
  field that is set wins. So `variant='u2net_l'` gives its light widths in any config, and a
  saved `config.json` (unset fields stay null) rebuilds the same model.

  Args:
    fields: `config.model`'s fields (without `name`), overrides applied.

  Returns:
    A dict of every `U2Net` field (except Flax's `parent` and `name`).

  Raises:
    ValueError: an unknown field, variant, attention form or dtype, or a switch set for a variant
      it does not apply to; the message names the field and the variant.
  """
  fields = dict(fields)
  known = [f.name for f in dataclasses.fields(U2Net) if f.name not in ('parent', 'name')]
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise ValueError(f'unknown model field(s) {unknown}; U2Net takes {known}')
  variant = fields.get('variant') or 'u2net'
  if variant not in VARIANTS:
    raise ValueError(f'variant {variant!r}; expected one of {tuple(VARIANTS)}')
  for switch in VARIANT_SWITCHES:
    if fields.get(switch) is not None and switch not in VARIANTS[variant]:
      owners = [v for v, defaults in VARIANTS.items() if switch in defaults]
      raise ValueError(
        f'model.{switch}={fields[switch]!r} does not apply to variant {variant!r}: it is a '
        f'switch of {owners} only (leave it unset)'
      )
  defaults = {f.name: f.default for f in dataclasses.fields(U2Net) if f.name in known}
  explicit = {k: v for k, v in fields.items() if v is not None}
  guide_bands = explicit.get('guide_bands', defaults['guide_bands'])
  resolved = {
    **defaults,
    'width': OFFICIAL_WIDTHS.get(guide_bands, defaults['width']),
    **VARIANTS[variant],
    **explicit,
    'variant': variant,
  }
  if resolved['attention'] not in attention_lib.ATTENTION_KINDS:
    raise ValueError(
      f'attention must be one of {attention_lib.ATTENTION_KINDS}, got {resolved["attention"]!r}'
    )
  compute_dtype(resolved['dtype'])  # Raises for an unknown dtype.
  return resolved


# --------------------------------------------------------------------------------------------
# Registration: the official state dict's names (PSRben/U2Net `model/u2net.py`) and the network.

WEIGHTS = torch_weights.WeightTable(
  rules=[
    (r'upsample/conv/kernel', 'upsample.upsamle.0.weight'),  # The official key's typo.
    (r'raise_ms_dim/(kernel|bias)', 'raise_ms_dim.0.{p}'),
    (r'raise_guide_dim/(kernel|bias)', 'raise_pan_dim.0.{p}'),
    (r'to_hrms0/(kernel|bias)', 'to_hrms.0.{p}'),
    (r'to_hrms1/(kernel|bias)', 'to_hrms.2.{p}'),
    (r's2block(\d)/attn_norm/(scale|bias)', 's2block{0}.layers.0.0.fn.norm.{p}'),
    (r's2block(\d)/attention/(sa1|sa2|se1|se2)/kernel', 's2block{0}.layers.0.0.fn.fn.{1}.weight'),
    (r's2block(\d)/attention/to_out/(kernel|bias)', 's2block{0}.layers.0.0.fn.fn.to_out.0.{p}'),
    (r's2block(\d)/mlp_norm/(scale|bias)', 's2block{0}.layers.0.1.fn.norm.{p}'),
    (r's2block(\d)/mlp/fc1/(kernel|bias)', 's2block{0}.layers.0.1.fn.fn.net.0.{p}'),
    (r's2block(\d)/mlp/fc2/(kernel|bias)', 's2block{0}.layers.0.1.fn.fn.net.3.{p}'),
    (r'down(\d)/conv0/(kernel|bias)', 'down{0}.conv.0.{p}'),
    (r'down(\d)/conv1/(kernel|bias)', 'down{0}.conv.2.{p}'),
    (r'down(\d)/conv2/(kernel|bias)', 'down{0}.conv.3.{p}'),
    (r'resblock(\d)/(conv0|conv1)/(kernel|bias)', 'resblock{0}.{1}.{p}'),
    # The level-2/3 Up modules are `up0`/`up1`; inside each, the branch used is also `up1`.
    (r'up(\d)/up/(kernel|bias)', 'up{0}.up1.0.{p}'),
    (r'up(\d)/conv/(kernel|bias)', 'up{0}.conv.{p}'),
  ],
  kernel_axes=lambda path: (
    torch_weights.CONV_TRANSPOSE
    if '/up/' in path
    else torch_weights.LINEAR
    if '/attention/' in path or '/mlp/' in path
    else torch_weights.CONV
  ),
  # Modules the official model builds but never calls.
  unused=(r'down\d\.maxpool_conv\.', r'up\d\.up0\.'),
)

registry.register(
  registry.ModelSpec(
    name='u2net',
    module=U2Net,
    inputs=('ms', 'guide'),
    resolve=resolve_fields,
    weights=WEIGHTS,
    eval_mode='tiled',
    paper='Peng, Guo, Wu, Deng: U2Net, ACM MM 2023',
  )
)
