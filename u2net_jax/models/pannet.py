"""PanNet (Yang, Fu, Hu, Huang, Ding, Paisley, ICCV 2017) as the DLPan-Toolbox runs it.

The network sees only high-pass inputs: `ms_hp = get_edge(ms)`, `pan_hp = get_edge(pan)` (the
image minus its 5x5 box mean, `evaluation/ps_evaluate.py:31-43`, computed here inside
`__call__`); `ConvTranspose2d(C, C, 8, stride 4, padding 2)` brings `ms_hp` to the PAN grid, then
`cat([up, pan_hp])` (PAN last), 3x3 conv -> 32, ReLU, four residual blocks, 3x3 conv -> C
(`PanNet/model_pannet.py:54-94`); the test adds `lms` (`model_pannet.py:107-113`), here too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.io import torch_weights
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import registry


class TransposedConv(nn.Module):
  """PyTorch `ConvTranspose2d(C, C, kernel, stride, padding, bias=True)` in NHWC.

  Computed as PyTorch defines it: a stride-1 convolution of the input dilated by `stride`, zero
  padded by `kernel - 1 - padding` on each side, with the kernel flipped in both spatial axes.
  The parameter keeps PyTorch's (in, out, kH, kW) weight as (kH, kW, in, out), unflipped.
  """

  features: int
  kernel: int = 8
  stride: int = 4
  padding: int = 2
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, cin = self.kernel, x.shape[-1]
    # PyTorch takes a ConvTranspose2d's fan-in from its weight's dim 1 (out * kH * kW).
    bound = L.default_bound(self.features * k * k)
    kernel = self.param('kernel', L.torch_uniform(bound), (k, k, cin, self.features), jnp.float32)
    bias = self.param('bias', L.torch_uniform(bound), (self.features,), jnp.float32)
    dt = L.compute_dtype(self.dtype)
    pad = k - 1 - self.padding
    y = jax.lax.conv_general_dilated(
      x.astype(dt),
      kernel[::-1, ::-1].astype(dt),
      window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      lhs_dilation=(self.stride, self.stride),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    return y + bias.astype(dt)


class PanNet(nn.Module):
  """PanNet; `__call__(ms, guide, lms)` -> the fused (B, 4h, 4w, C) image.

  Attributes:
    spectral_bands: C.
    guide_bands: 1 (PAN).
    scale: 4 (the transposed convolution's fixed stride).
    dtype: compute dtype, 'float32' or 'float64' (reference mode, under `jax.enable_x64`).
  """

  spectral_bands: int = 8
  guide_bands: int = 1
  scale: int = 4
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, ms: jax.Array, guide: jax.Array, lms: jax.Array) -> jax.Array:
    dt = L.compute_dtype(self.dtype)
    c = self.spectral_bands
    ms_hp, pan_hp = L.high_pass(ms.astype(dt)), L.high_pass(guide.astype(dt))
    up = TransposedConv(c, dtype=self.dtype, name='deconv')(ms_hp)
    x = jnp.concatenate([up, pan_hp], axis=-1)  # model_pannet.py:89: PAN last.
    x = nn.relu(L.toolbox_conv(32, c + 1, 3, 'conv1', dtype=self.dtype)(x))
    for i in range(1, 5):
      x = L.ResBlock(32, toolbox_init=True, dtype=self.dtype, name=f'res{i}')(x)
    return lms.astype(dt) + L.toolbox_conv(c, 32, 3, 'conv3', dtype=self.dtype)(x)


WEIGHTS = torch_weights.WeightTable(
  rules=[
    (r'(deconv|conv1|conv3)/(kernel|bias)', '{0}.{p}'),
    (r'(res\d)/(conv20|conv21)/(kernel|bias)', '{0}.{1}.{p}'),
  ],
  kernel_axes=lambda path: (
    torch_weights.CONV_TRANSPOSE if path.startswith('deconv/') else torch_weights.CONV
  ),
  # The residual blocks are registered a second time as `backbone.{0..3}` (model_pannet.py:75-80).
  unused=(r'backbone\.',),
)

registry.register(
  registry.ModelSpec(
    name='pannet',
    module=PanNet,
    inputs=('ms', 'guide', 'lms'),
    resolve=L.make_resolve(PanNet, scale=4),
    weights=WEIGHTS,
    # configs/option_pannet.py, PanNet/pannet_main.py: MSE on lms + net (model_pannet.py:96-105),
    # Adam 1e-3, batch 32, 450 epochs, no schedule; cfg.reg (option_pannet.py:60): the L2 term.
    recipe={
      'train.loss': 'mse',
      'optimizer.learning_rate': 1e-3,
      'optimizer.decay_factor': 1.0,
      'train.l2_weight': 1e-5,
      'train.batch_size': 32,
      'train.num_epochs': 450,
    },
    eval_mode='whole',
    paper='Yang et al.: PanNet, ICCV 2017',
  )
)
