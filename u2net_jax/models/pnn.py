"""PNN (Masi, Cozzolino, Verdoliva, Scarpa, Remote Sensing 2016) as the DLPan-Toolbox runs it.

Three VALID convolutions 9x9 (C+1 -> 64), ReLU, 5x5 (-> 32), ReLU, 5x5 (-> C)
(`PNN/model_pnn.py:17-32`). The network shrinks its input by 16 pixels; the toolbox's test undoes
that by padding `cat([lms, pan])` by 8 with replicated borders (`PNN/model_pnn.py:51-59`, `blk =
8` from `pnn_main.py:88-95`), which happens here inside `__call__`. The output is the image
itself (no `lms` added). Training (`model_pnn.py:34-49`) feeds the unpadded input and crops the
target by 8: the centre of this module's output is exactly that (`train.loss_border=8`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import registry

# Half the receptive field of the three VALID convolutions (pnn_main.py:88-95): (8 + 4 + 4) / 2.
BORDER = 8


class PNN(nn.Module):
  """PNN; `__call__(lms, guide)` -> the fused (B, H, W, C) image.

  Attributes:
    spectral_bands: C.
    guide_bands: 1 (PAN).
    scale: the resolution ratio (unused: the input is the upsampled `lms`).
    width: channels of the first layer (64; APNN's released weights use 48 or 64).
    dtype: compute dtype, 'float32' or 'float64' (reference mode, under `jax.enable_x64`).
  """

  spectral_bands: int = 8
  guide_bands: int = 1
  scale: int = 4
  width: int = 64
  dtype: str = 'float32'

  @nn.compact
  def net(self, x: jax.Array) -> jax.Array:
    """The bare network on an already padded (B, H+16, W+16, C+1) input -> (B, H, W, C)."""
    c = self.spectral_bands
    x = nn.relu(L.conv(self.width, c + 1, 9, 'conv1', padding=0, dtype=self.dtype)(x))
    x = nn.relu(L.conv(32, self.width, 5, 'conv2', padding=0, dtype=self.dtype)(x))
    return L.conv(c, 32, 5, 'conv3', padding=0, dtype=self.dtype)(x)

  def __call__(self, lms: jax.Array, guide: jax.Array) -> jax.Array:
    dt = L.compute_dtype(self.dtype)
    x = jnp.concatenate([lms.astype(dt), guide.astype(dt)], axis=-1)  # PAN last (model_pnn.py:55).
    return self.net(L.replicate_pad(x, BORDER))


WEIGHTS = torch_weights.WeightTable(rules=[(r'(conv[123])/(kernel|bias)', '{0}.{p}')])

registry.register(
  registry.ModelSpec(
    name='pnn',
    module=PNN,
    inputs=('lms', 'guide'),
    resolve=L.make_resolve(PNN),
    weights=WEIGHTS,
    # configs/option_pnn.py, PNN/pnn_main.py:64-97 (see configs/baseline.py for the choices).
    recipe={
      'train.loss': 'mse',
      'train.loss_border': BORDER,
      'optimizer.name': 'sgd',
      'optimizer.momentum': 0.9,
      'optimizer.learning_rate': L.PerBand(1e-4 * 17 * 17),  # pnn_main.py:70: 1e-4 * 17^2 * C.
      'optimizer.last_layer': 'conv3',
      'optimizer.last_layer_lr_factor': 0.1,  # pnn_main.py:83-84 (built, unused: literal 1.0).
      'optimizer.decay_factor': 1.0,  # No schedule (pnn_main.py:64).
      'train.batch_size': 64,
      'train.num_epochs': 12000,
    },
    eval_mode='whole',
    paper='Masi et al.: Pansharpening by convolutional neural networks, Remote Sensing 2016',
  )
)
