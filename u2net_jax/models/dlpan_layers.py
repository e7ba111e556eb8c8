"""Building blocks shared by the DLPan-Toolbox deep baselines (PNN, PanNet, DiCNN, DRPNN, ...).

The toolbox (liangjiandeng/DLPan-Toolbox, `01-DL-toolbox(Pytorch)/UDL/pansharpening/models/`)
builds every network from biased `nn.Conv2d`s, ReLUs and a few residual blocks; this module gives
the NHWC Flax equivalents with PyTorch's default initialisation (the toolbox's constructors for
these networks keep it, BDPN excepted) and the helpers each network's test-time input preparation
needs (replicate padding, PanNet's high-pass filter). Parameters are float32; `dtype` is the
compute dtype ('float32', or 'float64' reference precision under `jax.enable_x64`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from u2net_jax.models import u2net

# The compute dtypes of the baselines: float32, or float64 reference precision (CPU, x64).
DTYPES = ('float32', 'float64')


def compute_dtype(name: str) -> jnp.dtype:
  """The jnp dtype of a baseline's `dtype` field (one of `DTYPES`)."""
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {name!r}')
  return u2net.compute_dtype(name)


def conv(
  features: int,
  in_features: int,
  kernel: int,
  name: str,
  padding: int | None = None,
  dtype: str = 'float32',
  kernel_init: Callable | None = None,
  bias_init: Callable | None = None,
) -> nn.Conv:
  """PyTorch `Conv2d(in, out, kernel, padding=padding, bias=True)` in NHWC (zero padding).

  Args:
    features: output channels.
    in_features: input channels (the fan-in of PyTorch's default initialisation).
    kernel: the square kernel size.
    name: the sub-module name (the PyTorch attribute name).
    padding: zero padding on each side; None: `kernel // 2` ('same'); 0: VALID.
    dtype: the compute dtype.
    kernel_init: the kernel initialiser (default: PyTorch's).
    bias_init: the bias initialiser (default: PyTorch's).

  Returns:
    The `nn.Conv`.
  """
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(
    features,
    (kernel, kernel),
    padding=((pad, pad), (pad, pad)),
    kernel_init=kernel_init or u2net.torch_kernel_init,
    bias_init=bias_init or u2net.torch_bias_init(in_features * kernel * kernel),
    dtype=compute_dtype(dtype),
    param_dtype=jnp.float32,
    name=name,
  )


def replicate_pad(x: jax.Array, pad: int) -> jax.Array:
  """`F.pad(x, (pad,) * 4, mode='replicate')` (= `np.pad(mode='edge')`) on NHWC's H and W."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='edge')


def high_pass(x: jax.Array) -> jax.Array:
  """The toolbox's `get_edge` (evaluation/ps_evaluate.py:31-43): x minus its 5x5 box mean.

  `cv2.boxFilter(x, -1, (5, 5))` per 2-D slice, normalised, border `BORDER_REFLECT_101` (numpy's
  'reflect'). Computed in `x`'s dtype (the toolbox: float64 at test time, float32 at training
  time, dataset_hp.py:13-48).

  Args:
    x: (B, H, W, C), H and W at least 3.

  Returns:
    (B, H, W, C) high-pass image.
  """
  padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  total = jax.lax.reduce_window(
    padded, jnp.zeros((), x.dtype), jax.lax.add, (1, 5, 5, 1), (1, 1, 1, 1), 'VALID'
  )
  return x - total / 25.0


class ResBlock(nn.Module):
  """PanNet's / FusionNet's `Resblock` (model_pannet.py:38-50): conv20, ReLU, conv21, + input.

  No activation after the addition. `toolbox_init`: the toolbox's `init_weights` (PanNet) rather
  than PyTorch's default (FusionNet, whose call is commented out, model_fusionnet.py:104-105).
  """

  channels: int = 32
  toolbox_init: bool = False
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.channels
    make = toolbox_conv if self.toolbox_init else conv
    h = nn.relu(make(c, c, 3, 'conv20', dtype=self.dtype)(x))
    return x + make(c, c, 3, 'conv21', dtype=self.dtype)(h)


def make_resolve(
  module: type[nn.Module], scale: int | None = None, guide_bands: int | None = 1
) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """A `ModelSpec.resolve` for a baseline: known fields only, unset fields at their defaults.

  Args:
    module: the Flax module class.
    scale: the only scale the network supports (None: any; its input is the upsampled `lms`).
    guide_bands: the only guide band count it supports (1: a PAN).

  Returns:
    fields -> the module's complete fields; raises ValueError naming the field.
  """
  known = [f.name for f in dataclasses.fields(module) if f.name not in ('parent', 'name')]
  defaults = {f.name: f.default for f in dataclasses.fields(module) if f.name in known}

  def resolve(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(known))
    if unknown:
      raise ValueError(f'unknown model field(s) {unknown}; {module.__name__} takes {known}')
    resolved = {**defaults, **{k: v for k, v in fields.items() if v is not None}}
    compute_dtype(resolved['dtype'])  # Raises for an unknown dtype.
    if scale is not None and resolved['scale'] != scale:
      raise ValueError(f'{module.__name__} supports only scale {scale}, got {resolved["scale"]}')
    if guide_bands is not None and resolved['guide_bands'] != guide_bands:
      raise ValueError(
        f'{module.__name__} takes a {guide_bands}-band guide (a PAN), got {resolved["guide_bands"]}'
      )
    return resolved

  return resolve


def torch_uniform(bound: float) -> Callable:
  """U(-bound, bound), PyTorch's default initialisation for a given fan-in's bound."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def default_bound(fan_in: int) -> float:
  """1 / sqrt(fan_in): PyTorch's default weight (kaiming_uniform, a=sqrt(5)) and bias bound."""
  return 1.0 / math.sqrt(fan_in)


@dataclasses.dataclass(frozen=True)
class PerBand:
  """A recipe value proportional to the band count (PNN's lr = 1e-4 * 17^2 * C, pnn_main.py:70).

  `configs/baseline.py` multiplies `value` by the sensor's spectral bands.
  """

  value: float

  def __call__(self, bands: int) -> float:
    return self.value * bands


def toolbox_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """The toolbox's `variance_scaling_initializer` (UDL/Basis/variance_sacling_initializer.py).

  TensorFlow 1's variance scaling, factor 2, fan-in: a normal truncated at +-2 standard
  deviations, stddev sqrt(1.3 * 2 / fan_in), fan_in = kh * kw * in (HWIO kernel). The toolbox's
  `init_weights` applies it, with zero biases, to the Conv2d layers of DiCNN, PanNet and BDPN.
  """
  fan_in = math.prod(shape[:-1])
  stddev = math.sqrt(1.3 * 2.0 / fan_in)
  return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * stddev


def toolbox_conv(*args, **kwargs) -> nn.Conv:
  """`conv` with the toolbox's `init_weights` initialisation (variance scaling, zero bias)."""
  return conv(*args, kernel_init=toolbox_kernel_init, bias_init=nn.initializers.zeros, **kwargs)
