"""APNN / PNN+ (Scarpa, Vitale, Cozzolino, IEEE TGRS 2018), target-adaptive, as the toolbox runs it.

The network is PNN's (three VALID convolutions 9x9, 5x5, 5x5; `APNN/model_wv3.py`) made
residual: the toolbox's test (`APNN/main_test_wv3.py:70-83, 341-363`) pads `cat([lms, pan])` by
8 with replicated borders and adds the unpadded `lms` channels to the output; both happen here
inside `__call__`. The first layer's width is 48 in the WV3 release and 64 in the WV2, QB and
WV4 ones (`model_*.py` all say 48; take it from the weights: `--config.model.width=48` for WV3).

The released WV3, WV2 and QB networks are degenerate: on real inputs every ReLU after `conv2` is
zero, so their output is `conv3.bias`, one constant per band; only the WV4 network is alive.

Test-time adaptation (`finetune`): the test scripts fine-tune the weights on each test image
before fusing it (`main_test_wv3.py:136-154, 201-346`): the image is degraded by Wald's protocol
(`wald_input`), the network learns to restore its MS from it (SGD with momentum 0.9, `conv3` at a
tenth of the learning rate), and the weights after the step of the epoch with the lowest
pre-step loss are kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from u2net_jax import toolbox
from u2net_jax.models import dlpan_layers as L
from u2net_jax.models import pnn, registry


class APNN(pnn.PNN):
  """APNN (PNN+); `__call__(lms, guide)` -> the fused (B, H, W, C) image.

  Attributes: those of `pnn.PNN`; `width` 64 by default (48 for the WV3 release).
  """

  def __call__(self, lms: jax.Array, guide: jax.Array) -> jax.Array:
    dt = L.compute_dtype(self.dtype)
    lms = lms.astype(dt)
    x = L.replicate_pad(jnp.concatenate([lms, guide.astype(dt)], axis=-1), pnn.BORDER)
    return self.net(x) + lms  # main_test_wv3.py:356-358: out + x[:, :-1, 8:-8, 8:-8].


# ----------------------------------------------------------------------------------------------
# Test-time fine-tuning.


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
  """One test script's fine-tuning settings (`APNN/main_test_<sensor>.py`).

  Attributes:
    loss: 'l1' or 'mse'.
    lr: the learning rate of conv1 and conv2 (`conv3` gets lr / 10).
    epochs: fine-tuning steps (one full-batch step per epoch).
    degraded_ms: the input's MS channels are the Wald-degraded MS (False for WV3, whose script
      feeds the undegraded MS, main_test_wv3.py:152, so its target residual is exactly 0).
  """

  loss: str
  lr: float
  epochs: int
  degraded_ms: bool = True


# main_test_{wv3,wv2,qb,wv4}.py. WV3's script also loads the checkpoint's SGD state, whose
# learning rates (0.2312 / 0.02312) and momentum buffers replace lr 1e-4 (259-262): pass them to
# `finetune` as `lr` and `momentum_init`.
FINETUNE_RECIPES = {
  'WV3': FinetuneRecipe('mse', 0.2312, 50, degraded_ms=False),
  'WV2': FinetuneRecipe('l1', 1e-6, 200),
  'QB': FinetuneRecipe('l1', 2e-4, 50),
  'WV4': FinetuneRecipe('l1', 1e-4, 50),
}

# The Nyquist gains the fine-tuning's degradation uses (APNN/wald_utilities.py `MTF`): WV4 shares
# GeoEye-1's.
WALD_GAINS = {
  'WV3': [0.325, 0.355, 0.360, 0.350, 0.365, 0.360, 0.335, 0.315],
  'WV2': [0.35] * 7 + [0.27],
  'QB': [0.34, 0.32, 0.30, 0.22],
  'IKONOS': [0.26, 0.28, 0.29, 0.28],
  'WV4': [0.23] * 4,
  'GeoEye1': [0.23] * 4,
}

# PyTorch's bicubic (a = -0.75, align_corners=False, no antialias) at scale 1/4: output pixel i
# samples input 4i + 1.5, i.e. taps 4i .. 4i+3 with these weights (never past a border).
_BICUBIC_QUARTER = np.array([-0.09375, 0.59375, 0.59375, -0.09375])


def nyquist_kernel(gnyq: float, ratio: int = 4, size: int = 41) -> np.ndarray:
  """The MTF kernel of the fine-tuning's degradation (wald_utilities.py `NyquistFilterGenerator`).

  A Gaussian whose peak-normalised response is `gnyq` at the MS Nyquist frequency, read as a
  frequency response and sampled by an inverse FFT, times a 1-D Kaiser window (beta 0.5) along
  the columns (not MATLAB's circular window), negative taps set to 0, normalised to unit sum.
  """
  alpha = np.sqrt(((size - 1) * (1 / ratio) / 2) ** 2 / (-2 * np.log(gnyq)))
  m = (size - 1) / 2
  y, x = np.ogrid[-m : m + 1, -m : m + 1]
  g = np.exp(-(x * x + y * y) / (2 * alpha * alpha))
  g[g < np.finfo(g.dtype).eps * g.max()] = 0
  g = g / g.sum()
  hd = g / g.max()
  hd = np.rot90(np.fft.fftshift(np.rot90(hd, 2)), 2)
  h = np.rot90(np.fft.fftshift(np.fft.ifft2(hd)), 2).real * np.kaiser(size, 0.5)
  h = np.clip(h, 0, h.max())
  return h / h.sum()


def wald_input(ms: np.ndarray, pan: np.ndarray, sensor: str, degraded_ms: bool = True):
  """The fine-tuning input and target of one image (`Tester(mode='ft')`, main_test_wv3.py:149-154).

  The MS through the sensor's 41x41 MTF kernel (replicate borders), PyTorch-bicubic /4, then the
  23-tap interpolator x4 (`wald_protocol`, wald_utilities.py:154-185); the PAN only bicubic /4
  (no MTF); `cat([ms_in, pan_lr])` reflect-padded by 8. Computed in float64 (the script: float32;
  the difference is ~1e-7).

  Args:
    ms: (h, w, C) on the [0, 1] scale, h and w divisible by 4.
    pan: (4h, 4w) or (4h, 4w, 1).
    sensor: a key of `WALD_GAINS`.
    degraded_ms: feed the degraded MS (False: the MS itself, as WV3's script does).

  Returns:
    (x, target): x (1, h + 16, w + 16, C + 1), the residual target (1, h, w, C) = ms - ms_in.
  """
  ms = np.asarray(ms, np.float64)
  pan = np.asarray(pan, np.float64).reshape(ms.shape[0] * 4, ms.shape[1] * 4, 1)
  h, w, c = ms.shape
  if h % 4 or w % 4:
    raise ValueError(f'wald_input: the MS sides must be divisible by 4, got {h}x{w}')
  gains = WALD_GAINS[sensor]
  blurred = np.stack(
    [ndimage.correlate(ms[..., b], nyquist_kernel(gains[b]), mode='nearest') for b in range(c)], -1
  )

  def quarter(a):
    for axis in (0, 1):
      n = a.shape[axis] // 4
      taps = [np.take(a, np.arange(n) * 4 + k, axis=axis) for k in range(4)]
      a = sum(wt * t for wt, t in zip(_BICUBIC_QUARTER, taps, strict=True))
    return a

  ms_lr = toolbox.interp23tap(quarter(blurred), 4)
  ms_in = ms_lr if degraded_ms else ms
  x = np.concatenate([ms_in, quarter(pan)], -1)
  x = np.pad(x, ((8, 8), (8, 8), (0, 0)), mode='reflect')
  return x[None], (ms - ms_in)[None]


def finetune(
  model: APNN,
  params: Mapping,
  x: jax.Array,
  target: jax.Array,
  recipe: FinetuneRecipe,
  momentum_init: Mapping | None = None,
) -> dict:
  """APNN's test-time fine-tuning (main_test_wv3.py:252-324) on a prepared input.

  SGD with momentum 0.9 (PyTorch's: buffer = 0.9 buffer + grad, the first step's buffer = grad
  unless `momentum_init`), `conv3` at lr / 10, the loss between `model.net(x)` and `target` each
  epoch (the script's extra L2 term is built from `.data` and changes no gradient). The weights
  kept are those after the step of the epoch with the lowest pre-step loss (311-322).

  Args:
    model: the APNN module (its `dtype` is the compute dtype).
    params: its parameters.
    x: (B, h + 16, w + 16, C + 1) from `wald_input`.
    target: (B, h, w, C) residual target.
    recipe: a `FinetuneRecipe`.
    momentum_init: initial momentum buffers (the params' tree), e.g. WV3's checkpoint's.

  Returns:
    {'params': the kept parameters, 'losses': (epochs,) pre-step losses, 'best_epoch': int}.
  """
  if recipe.loss not in ('l1', 'mse'):
    raise ValueError(f'loss must be l1 or mse, got {recipe.loss!r}')
  dt = L.compute_dtype(model.dtype)
  x, target = jnp.asarray(x, dt), jnp.asarray(target, dt)
  params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dt), params)

  def loss_fn(p):
    diff = model.apply({'params': p}, x, method=APNN.net) - target
    return jnp.mean(jnp.abs(diff)) if recipe.loss == 'l1' else jnp.mean(diff * diff)

  lrs = {k: recipe.lr / 10 if k == 'conv3' else recipe.lr for k in params}

  @jax.jit
  def step(p, buf, first):
    loss, g = jax.value_and_grad(loss_fn)(p)
    buf = {
      k: jax.tree_util.tree_map(lambda b, gi: jnp.where(first, gi, 0.9 * b + gi), buf[k], g[k])
      for k in g
    }
    p = {k: jax.tree_util.tree_map(lambda w, b, k=k: w - lrs[k] * b, p[k], buf[k]) for k in p}
    return p, buf, loss

  if momentum_init is None:
    buf, first = jax.tree_util.tree_map(jnp.zeros_like, params), True
  else:
    buf = jax.tree_util.tree_map(lambda b: jnp.asarray(b, dt), dict(momentum_init))
    first = False
  losses, best, best_epoch = np.zeros(recipe.epochs), None, -1
  for epoch in range(recipe.epochs):
    params, buf, loss = step(params, buf, jnp.asarray(first))
    first = False
    losses[epoch] = float(loss)
    if best is None or losses[epoch] < losses[:epoch].min(initial=np.inf):
      best, best_epoch = params, epoch
  return {'params': best, 'losses': losses, 'best_epoch': best_epoch}


registry.register(
  registry.ModelSpec(
    name='apnn',
    module=APNN,
    inputs=('lms', 'guide'),
    resolve=L.make_resolve(APNN),
    weights=pnn.WEIGHTS,
    # main_pre_train_trainData_*.py: L1 on the residual, cropped by 8; SGD momentum 0.9, lr
    # 1e-4 * 17^2 * C with conv3 at lr / 10; batch 64 (WV3: 128); 10000 epochs; no schedule.
    recipe={
      'train.loss': 'l1',
      'train.loss_border': pnn.BORDER,
      'optimizer.name': 'sgd',
      'optimizer.momentum': 0.9,
      'optimizer.learning_rate': L.PerBand(1e-4 * 17 * 17),
      'optimizer.last_layer': 'conv3',
      'optimizer.last_layer_lr_factor': 0.1,
      'optimizer.decay_factor': 1.0,
      'train.batch_size': 64,
      'train.num_epochs': 10000,
    },
    eval_mode='whole',
    paper='Scarpa et al.: Target-adaptive CNN-based pansharpening (PNN+), TGRS 2018',
  )
)
