"""The training losses and optimizers of the recipes, chosen by name from the config.

U2Net's recipe is the L1 loss and Adam (`config.train.loss='l1'`, `config.optimizer.name='adam'`,
the defaults: the same computation as before these fields existed). The DLPan-Toolbox baselines'
recipes (`models.registry.ModelSpec.recipe`, applied by `configs/baseline.py`) add:

- `train.loss`: 'l1' (mean absolute error) or 'mse' (`nn.MSELoss()`, the toolbox's builders,
  e.g. `PanNet/pannet_main.py`); both on the network's final image, which for PanNet and
  FusionNet already includes `lms` (their `train_step`s compare `lms + net(...)` with `gt`).
- `train.loss_border`: pixels cropped from each side of output and target first (PNN and APNN
  train their VALID network on unpadded inputs against `gt` cropped by 8, `PNN/model_pnn.py:
  34-49`; this module's output pads, and its centre is exactly that unpadded output).
- `train.l2_weight`: `w * sum(kernel**2) / 2` over the convolution kernels added to the loss
  (the toolbox's `l2_regularization`, `Basis/python_sub_class.py:189-205`, PanNet's `cfg.reg`);
  `train.l2_literal=True` adds it as the toolbox does, from `.data`: the logged loss changes, the
  gradients do not (`jax.lax.stop_gradient`).
- `optimizer.name`: 'adam' or 'sgd' (PyTorch's SGD: buffer = momentum * buffer + grad),
  `optimizer.momentum`, `optimizer.weight_decay` (PyTorch's coupled L2: `wd * w` added to the
  gradient before Adam/SGD, as `optim.Adam(weight_decay=...)`), and `optimizer.last_layer` /
  `optimizer.last_layer_lr_factor` (a parameter group at a multiple of the learning rate, e.g.
  PNN's `conv3` at lr / 10).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

LOSSES = ('l1', 'mse')
OPTIMIZERS = ('adam', 'sgd')


def _get(section, field: str, default):
  """A config field, or its default when an older config (config.json) lacks it."""
  return section.get(field, default) if hasattr(section, 'get') else default


def l1_loss(params, apply_fn: Callable, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Mean absolute error between the fused image and `gt` (paper Eq. 4, `nn.L1Loss()`).

  U2Net's loss, and the training step's default.

  Args:
    params: the model's parameters.
    apply_fn: the model's `apply` on a batch dict (`models.BatchApply`).
    batch: 'gt' and the roles the model takes (NHWC in [0, 1]).

  Returns:
    The scalar loss.
  """
  out = apply_fn({'params': params}, batch)
  return jnp.mean(jnp.abs(out - batch['gt']))


def l2_penalty(params) -> jax.Array:
  """sum(kernel**2) / 2 over every convolution kernel (the toolbox's conv weights)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  kernels = [v for path, v in leaves if getattr(path[-1], 'key', None) == 'kernel']
  return sum(jnp.sum(jnp.square(k)) for k in kernels) / 2


def make_loss(config) -> Callable:
  """The loss `config.train` names, as `loss(params, apply_fn, batch) -> scalar`.

  Args:
    config: the run's config (`train.loss`, `train.loss_border`, `train.l2_weight`,
      `train.l2_literal`; missing fields take U2Net's: L1, no crop, no L2).

  Returns:
    The loss function: `l1_loss` itself for U2Net's 'l1' without crop or L2.

  Raises:
    ValueError: an unknown loss name or a negative border / weight.
  """
  train = config.train
  name = _get(train, 'loss', 'l1')
  border = int(_get(train, 'loss_border', 0))
  l2_weight = float(_get(train, 'l2_weight', 0.0))
  literal = bool(_get(train, 'l2_literal', False))
  if name not in LOSSES:
    raise ValueError(f'train.loss={name!r}; expected one of {LOSSES}')
  if border < 0 or l2_weight < 0:
    raise ValueError(f'train.loss_border={border} and train.l2_weight={l2_weight} must be >= 0')
  if name == 'l1' and not border and not l2_weight:
    return l1_loss  # The default: U2Net's loss, the very same function.

  def loss(params, apply_fn: Callable, batch: Mapping[str, jax.Array]) -> jax.Array:
    out, gt = apply_fn({'params': params}, batch), batch['gt']
    if border:
      out = out[:, border:-border, border:-border]
      gt = gt[:, border:-border, border:-border]
    value = jnp.mean(jnp.abs(out - gt)) if name == 'l1' else jnp.mean(jnp.square(out - gt))
    if l2_weight:
      term = l2_weight * l2_penalty(params)
      value = value + (jax.lax.stop_gradient(term) if literal else term)
    return value

  return loss


def _scale_group(prefix: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of the parameters under top-level module `prefix` by `factor`."""

  def update(updates, state, params=None):
    del params
    scaled = {k: (jax.tree_util.tree_map(lambda u: u * factor, v) if k == prefix else v)
              for k, v in updates.items()}  # fmt: skip
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer `config.optimizer` names, with the learning-rate `schedule`.

  Args:
    config: the run's config (`optimizer.name`, `b1`, `b2`, `eps`, `momentum`, `weight_decay`,
      `last_layer`, `last_layer_lr_factor`; missing fields take U2Net's: plain Adam).
    schedule: the learning rate as a function of the step.

  Returns:
    The optax transformation; for U2Net's config exactly `optax.adam(schedule, b1, b2, eps)`.

  Raises:
    ValueError: an unknown optimizer name.
  """
  opt = config.optimizer
  name = _get(opt, 'name', 'adam')
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name={name!r}; expected one of {OPTIMIZERS}')
  if name == 'adam':
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:
    tx = optax.sgd(schedule, momentum=float(_get(opt, 'momentum', 0.9)) or None)
  weight_decay = float(_get(opt, 'weight_decay', 0.0))
  last_layer = _get(opt, 'last_layer', '')
  factor = float(_get(opt, 'last_layer_lr_factor', 1.0))
  if not weight_decay and not (last_layer and factor != 1.0):
    return tx
  parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  parts.append(tx)
  if last_layer and factor != 1.0:
    # Adam's and SGD's updates are proportional to the learning rate: scaling a group's updates
    # is PyTorch's parameter group at lr * factor (pnn_main.py:83-84).
    parts.append(_scale_group(last_layer, factor))
  return optax.chain(*parts)
