"""DRPNN (Wei, Yuan, Shen, Zhang, IEEE GRSL 2017) as the DLPan-Toolbox runs it.

`x = cat([lms, pan])` (C+1 channels) -> 7x7 conv 32 + ReLU, eight 7x7 conv 32 + ReLU blocks,
7x7 conv -> C+1, plus `x` itself (the PAN channel included), then 7x7 conv (C+1) -> C, no final
activation (`DRPNN/model_drpnn.py:36-71`); zero padding 3 throughout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import registry


class RepeatBlock(nn.Module):
  """`Repeatblock` (model_drpnn.py:20-33): 7x7 conv 32 -> 32, ReLU."""

  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(L.conv(32, 32, 7, 'conv2', dtype=self.dtype)(x))


class DRPNN(nn.Module):
  """DRPNN; `__call__(lms, guide)` -> the fused (B, H, W, C) image.

  Attributes:
    spectral_bands: C.
    guide_bands: 1 (PAN).
    scale: the resolution ratio (unused: the input is the upsampled `lms`).
    dtype: compute dtype, 'float32' or 'float64' (reference mode, under `jax.enable_x64`).
  """

  spectral_bands: int = 8
  guide_bands: int = 1
  scale: int = 4
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, lms: jax.Array, guide: jax.Array) -> jax.Array:
    dt = L.compute_dtype(self.dtype)
    c = self.spectral_bands
    x = jnp.concatenate([lms.astype(dt), guide.astype(dt)], axis=-1)  # model_drpnn.py:62.
    h = nn.relu(L.conv(32, c + 1, 7, 'conv1', dtype=self.dtype)(x))
    for i in range(8):
      h = RepeatBlock(dtype=self.dtype, name=f'backbone_{i}')(h)
    h = x + L.conv(c + 1, 32, 7, 'conv2', dtype=self.dtype)(h)  # model_drpnn.py:67-68.
    return L.conv(c, c + 1, 7, 'conv3', dtype=self.dtype)(h)


WEIGHTS = torch_weights.WeightTable(
  rules=[
    (r'(conv[123])/(kernel|bias)', '{0}.{p}'),
    (r'backbone_(\d)/conv2/(kernel|bias)', 'backbone.{0}.conv2.{p}'),
  ]
)

registry.register(
  registry.ModelSpec(
    name='drpnn',
    module=DRPNN,
    inputs=('lms', 'guide'),
    resolve=L.make_resolve(DRPNN),
    weights=WEIGHTS,
    # configs/option_drpnn.py, DRPNN/drpnn_main.py:73-80: MSE, Adam 2e-4, batch 32, 500 epochs,
    # StepLR(30, gamma 0.5) (the runner applies gamma 0.1: configs/baseline.py's 'literal').
    recipe={
      'train.loss': 'mse',
      'optimizer.learning_rate': 2e-4,
      'optimizer.decay_every_epochs': 30,
      'optimizer.decay_factor': 0.5,
      'train.batch_size': 32,
      'train.num_epochs': 500,
    },
    eval_mode='whole',
    paper='Wei et al.: Boosting the accuracy of multispectral image pansharpening (DRPNN), '
    'GRSL 2017',
  )
)
