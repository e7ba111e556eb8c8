"""BDPN (Zhang, Liu, Yang, Zhang, TGRS 2019) as the DLPan-Toolbox runs it (no released weights).

A bidirectional pyramid (`BDPN/model_bdpn.py:68-175`). PAN branch: 3x3 conv 1 -> 64 (no
activation), ten residual blocks (conv, PReLU with one shared slope per block, conv, + input),
plus that first conv's output; `conv3` (64 -> C) of it is the full-resolution detail; a 2x2
max-pool, ten more blocks, + their input; the same `conv3` gives the half-resolution detail. MS
branch: 3x3 conv C -> 4C, PixelShuffle(2), + half-resolution detail, 3x3 conv C -> 4C,
PixelShuffle(2), + full-resolution detail. The toolbox's test keeps the first of the two outputs
(`model_bdpn.py:191-197`), the only one returned here. It takes the low-resolution `ms`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import registry, u2net

CHANNELS = 64


class PReLU(nn.Module):
  """`nn.PReLU(num_parameters=1, init=0.2)`: one learned slope for every channel."""

  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param('alpha', nn.initializers.constant(0.2), (1,), jnp.float32)
    return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class ResBlock(nn.Module):
  """BDPN's `Resblock` (model_bdpn.py:46-64): conv20, PReLU, conv21, + input (64 channels)."""

  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = CHANNELS
    h = PReLU(dtype=self.dtype, name='prelu')(
      L.toolbox_conv(c, c, 3, 'conv20', dtype=self.dtype)(x)
    )
    return x + L.toolbox_conv(c, c, 3, 'conv21', dtype=self.dtype)(h)


class BDPN(nn.Module):
  """BDPN; `__call__(ms, guide)` -> the fused (B, 4h, 4w, C) image.

  Attributes:
    spectral_bands: C.
    guide_bands: 1 (PAN).
    scale: 4 (two x2 pixel shuffles).
    dtype: compute dtype, 'float32' or 'float64' (reference mode, under `jax.enable_x64`).
  """

  spectral_bands: int = 8
  guide_bands: int = 1
  scale: int = 4
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, ms: jax.Array, guide: jax.Array) -> jax.Array:
    dt = L.compute_dtype(self.dtype)
    c, d = self.spectral_bands, self.dtype
    # model_bdpn.py:142: init_weights (variance scaling, zero biases) on every conv.
    conv3 = L.toolbox_conv(c, CHANNELS, 3, 'conv3', dtype=d)  # Shared by both levels.
    pan_feature = L.toolbox_conv(CHANNELS, 1, 3, 'conv1', dtype=d)(guide.astype(dt))
    rs = pan_feature
    for i in range(1, 11):
      rs = ResBlock(dtype=d, name=f'res{i}')(rs)
    pan_feature1 = pan_feature + rs  # model_bdpn.py:153.
    level1 = conv3(pan_feature1)
    pooled = nn.max_pool(pan_feature1, (2, 2), strides=(2, 2))
    rs = pooled
    for i in range(1, 11):
      rs = ResBlock(dtype=d, name=f'rres{i}')(rs)
    level2 = conv3(pooled + rs)  # model_bdpn.py:161-162.
    up1 = u2net.pixel_shuffle(L.toolbox_conv(4 * c, c, 3, 'conv4', dtype=d)(ms.astype(dt)), 2)
    ms_level1 = level2 + up1
    up2 = u2net.pixel_shuffle(L.toolbox_conv(4 * c, c, 3, 'conv5', dtype=d)(ms_level1), 2)
    return level1 + up2  # model_bdpn.py:172.


WEIGHTS = torch_weights.WeightTable(
  rules=[
    (r'(conv[1345])/(kernel|bias)', '{0}.{p}'),
    (r'(r?res\d+)/(conv20|conv21)/(kernel|bias)', '{0}.{1}.{p}'),
    (r'(r?res\d+)/prelu/alpha', '{0}.prelu.weight'),
  ],
  # The blocks are registered again as `backbone.*` / `backbone2.*`; the top-level `prelu`
  # (model_bdpn.py:112) is never called.
  unused=(r'backbone2?\.', r'prelu\.weight$'),
)

registry.register(
  registry.ModelSpec(
    name='bdpn',
    module=BDPN,
    inputs=('ms', 'guide'),
    resolve=L.make_resolve(BDPN, scale=4),
    weights=WEIGHTS,
    # configs/option_bdpn.py, BDPN/bdpn_main.py:74-81: MSE on net(ms, pan)[0], Adam 1e-4 with
    # weight decay 1e-5, batch 8, 1000 epochs, StepLR(100, gamma 0.8) (the runner applies gamma
    # 0.1: configs/baseline.py's 'literal').
    recipe={
      'train.loss': 'mse',
      'optimizer.learning_rate': 1e-4,
      'optimizer.weight_decay': 1e-5,
      'optimizer.decay_every_epochs': 100,
      'optimizer.decay_factor': 0.8,
      'train.batch_size': 8,
      'train.num_epochs': 1000,
    },
    eval_mode='whole',
    paper='Zhang et al.: Pan-sharpening using an efficient bidirectional pyramid network (BDPN), '
    'TGRS 2019',
  )
)
