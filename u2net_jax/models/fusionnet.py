"""FusionNet (Deng, Vivone, Jin, Huang, IEEE TGRS 2021) as the DLPan-Toolbox runs it.

The input is the PAN repeated over the C bands minus `lms` (no concatenation); 3x3 conv -> 32,
ReLU, four residual blocks, 3x3 conv -> C (`FusionNet/model_fusionnet.py:77-115`); the test adds
`lms` (`model_fusionnet.py:130-137`), here inside `__call__`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import registry


class FusionNet(nn.Module):
  """FusionNet; `__call__(lms, guide)` -> the fused (B, H, W, C) image.

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
    lms = lms.astype(dt)
    x = jnp.repeat(guide.astype(dt), c, axis=-1) - lms  # model_fusionnet.py:109-110.
    x = nn.relu(L.conv(32, c, 3, 'conv1', dtype=self.dtype)(x))
    for i in range(1, 5):
      x = L.ResBlock(32, dtype=self.dtype, name=f'res{i}')(x)
    return lms + L.conv(c, 32, 3, 'conv3', dtype=self.dtype)(x)


WEIGHTS = torch_weights.WeightTable(
  rules=[
    (r'(conv1|conv3)/(kernel|bias)', '{0}.{p}'),
    (r'(res\d)/(conv20|conv21)/(kernel|bias)', '{0}.{1}.{p}'),
  ],
  # The residual blocks are registered a second time as `backbone.{0..3}` (model_fusionnet.py).
  unused=(r'backbone\.',),
)

registry.register(
  registry.ModelSpec(
    name='fusionnet',
    module=FusionNet,
    inputs=('lms', 'guide'),
    resolve=L.make_resolve(FusionNet),
    weights=WEIGHTS,
    # configs/option_fusionnet.py, FusionNet/fusionnet_main.py:63-77: MSE on lms + net, Adam 3e-4,
    # batch 32, 400 epochs, no schedule.
    recipe={
      'train.loss': 'mse',
      'optimizer.learning_rate': 3e-4,
      'optimizer.decay_factor': 1.0,
      'train.batch_size': 32,
      'train.num_epochs': 400,
    },
    eval_mode='whole',
    paper='Deng et al.: Detail injection-based deep CNNs for pansharpening (FusionNet), TGRS 2021',
  )
)
