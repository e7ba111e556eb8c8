"""MSDCNN (Yuan, Wei, Meng, Shen, Zhang, IEEE JSTARS 2018) as the DLPan-Toolbox runs it.

Two branches on `x = cat([lms, pan])` (`MSDCNN/model_msdcnn.py:18-79`). Deep: 7x7 conv 60, ReLU;
parallel 3x3/5x5/7x7 convs -> 20 each, concatenated in that order, plus the 60-channel input,
ReLU; 3x3 conv 30, ReLU; parallel 3/5/7 -> 10 each, concatenated, plus the input, ReLU; 5x5 conv
-> C. Shallow: 9x9 conv 64, ReLU, 1x1 conv 32, ReLU, 5x5 conv -> C. Output ReLU(deep + shallow):
never negative, not residual.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import registry


class MSDCNN(nn.Module):
  """MSDCNN; `__call__(lms, guide)` -> the fused (B, H, W, C) image.

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
    c, d = self.spectral_bands, self.dtype
    x = jnp.concatenate([lms.astype(dt), guide.astype(dt)], axis=-1)  # model_msdcnn.py:52.
    out1 = nn.relu(L.conv(60, c + 1, 7, 'conv1', dtype=d)(x))
    out2 = jnp.concatenate(
      [L.conv(20, 60, k, f'conv2_{i}', dtype=d)(out1) for i, k in ((1, 3), (2, 5), (3, 7))], -1
    )
    out2 = nn.relu(out2 + out1)  # model_msdcnn.py:60.
    out3 = nn.relu(L.conv(30, 60, 3, 'conv3', dtype=d)(out2))
    out4 = jnp.concatenate(
      [L.conv(10, 30, k, f'conv4_{i}', dtype=d)(out3) for i, k in ((1, 3), (2, 5), (3, 7))], -1
    )
    out4 = nn.relu(out4 + out3)  # model_msdcnn.py:68.
    out5 = L.conv(c, 30, 5, 'conv5', dtype=d)(out4)
    s = nn.relu(L.conv(64, c + 1, 9, 'shallow1', dtype=d)(x))
    s = nn.relu(L.conv(32, 64, 1, 'shallow2', dtype=d)(s))
    s = L.conv(c, 32, 5, 'shallow3', dtype=d)(s)
    return nn.relu(out5 + s)  # model_msdcnn.py:76-77.


WEIGHTS = torch_weights.WeightTable(rules=[(r'(\w+)/(kernel|bias)', '{0}.{p}')])

registry.register(
  registry.ModelSpec(
    name='msdcnn',
    module=MSDCNN,
    inputs=('lms', 'guide'),
    resolve=L.make_resolve(MSDCNN),
    weights=WEIGHTS,
    # configs/option_msdcnn.py, MSDCNN/msdcnn_main.py:74-81: MSE, Adam lr 1e-6 (sic,
    # option_msdcnn.py:23) with weight decay 1e-5, batch 64, 500 epochs, StepLR(40, gamma 0.5)
    # (the runner applies gamma 0.1: configs/baseline.py's 'literal').
    recipe={
      'train.loss': 'mse',
      'optimizer.learning_rate': 1e-6,
      'optimizer.weight_decay': 1e-5,
      'optimizer.decay_every_epochs': 40,
      'optimizer.decay_factor': 0.5,
      'train.batch_size': 64,
      'train.num_epochs': 500,
    },
    eval_mode='whole',
    paper='Yuan et al.: A multiscale and multidepth CNN for pan-sharpening (MSDCNN), JSTARS 2018',
  )
)
