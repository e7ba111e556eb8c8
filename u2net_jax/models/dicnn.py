"""DiCNN1 (He, Liu, Ouyang, Zhang, Li, IEEE JSTARS 2019) as the DLPan-Toolbox runs it.

`cat([lms, pan])` -> 3x3 conv 64, ReLU, 3x3 conv 64, ReLU, 3x3 conv C, plus `lms` inside the
network (`DiCNN/model_dicnn.py:31-56`); the test calls it on (lms, pan) (70-76).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import registry


class DiCNN(nn.Module):
  """DiCNN1; `__call__(lms, guide)` -> the fused (B, H, W, C) image.

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
    x = jnp.concatenate([lms, guide.astype(dt)], axis=-1)
    # model_dicnn.py:45: init_weights (variance scaling, zero biases).
    x = nn.relu(L.toolbox_conv(64, c + 1, 3, 'conv1', dtype=self.dtype)(x))
    x = nn.relu(L.toolbox_conv(64, 64, 3, 'conv2', dtype=self.dtype)(x))
    return lms + L.toolbox_conv(c, 64, 3, 'conv3', dtype=self.dtype)(x)  # model_dicnn.py:54.


WEIGHTS = torch_weights.WeightTable(rules=[(r'(conv[123])/(kernel|bias)', '{0}.{p}')])

registry.register(
  registry.ModelSpec(
    name='dicnn',
    module=DiCNN,
    inputs=('lms', 'guide'),
    resolve=L.make_resolve(DiCNN),
    weights=WEIGHTS,
    # configs/option_dicnn.py, DiCNN/dicnn_main.py:73-80: MSE, Adam 2e-4, batch 64, 5000 epochs,
    # StepLR(1500, gamma 0.5) (the runner applies gamma 0.1: configs/baseline.py's 'literal').
    recipe={
      'train.loss': 'mse',
      'optimizer.learning_rate': 2e-4,
      'optimizer.decay_every_epochs': 1500,
      'optimizer.decay_factor': 0.5,
      'train.batch_size': 64,
      'train.num_epochs': 5000,
    },
    eval_mode='whole',
    paper='He et al.: Pansharpening via detail injection based CNN (DiCNN1), JSTARS 2019',
  )
)
