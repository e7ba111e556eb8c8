"""Training: the paper's recipe, data-parallel over every device and host, resumable.

`train_and_evaluate(config, workdir)` is the whole job (callable from a Colab cell); `train.py`
is its command-line entry point. The pieces:

- `create_learning_rate_fn`: Adam's learning rate, halved every `decay_every_epochs` (a staircase
  `optax.exponential_decay`, durations converted from epochs to steps once).
- `create_train_state`: `models.U2Net(**config.model)` with PyTorch's default initialisation (what
  the official training starts from) and `optax.adam` (PyTorch's Adam: eps outside the sqrt).
- `train_step` / `eval_step`: pure functions of (state, batch); the L1 loss (mean) of Eq. 4.

Parallelism is decided in one place, `compile_steps`: the steps are `jax.jit`-compiled over a
one-axis device mesh ('data') with the batch sharded along it and the state replicated. This is
what `jax.pmap` lowers to in current JAX and is its recommended replacement: XLA inserts the
gradient all-reduce, the same code runs on 1 CPU, 8 GPUs or a TPU pod, and the state buffers are
donated. On several hosts each one feeds only its share of every global batch.

Resumption: the data order is a pure function of (seed, step) (`input_pipeline`), and a
checkpoint holds params, the optimizer state and the step, so re-running the same command after a
kill continues the run exactly from the latest complete checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec

from u2net_jax import checkpointing, config_utils, input_pipeline, metrics, models

TrainState = train_state.TrainState
Batch = Mapping[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Recipe.


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """lr(step) = lr0 * decay_factor ** floor(step / (decay_every_epochs * steps_per_epoch)).

  The official code halves the learning rate every 100 epochs (pansharpening) or 50 (HISR).
  """
  opt = config.optimizer
  return optax.exponential_decay(
    init_value=opt.learning_rate,
    transition_steps=opt.decay_every_epochs * steps_per_epoch,
    decay_rate=opt.decay_factor,
    staircase=True,
  )


def create_model(config: ml_collections.ConfigDict) -> models.U2Net:
  return models.U2Net(**config.model)


def create_train_state(
  config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int, params=None
) -> TrainState:
  """A fresh training state (or one starting from given `params`, e.g. for fine-tuning).

  Args:
    config: the run's config.
    rng: a PRNG key for the initialisation.
    steps_per_epoch: steps in one epoch (for the learning-rate schedule).
    params: optional initial parameters (same tree as the model's).

  Returns:
    A `TrainState` with step 0.
  """
  model = create_model(config)
  if params is None:
    params = models.init_params(model, rng)
  opt = config.optimizer
  tx = optax.adam(
    create_learning_rate_fn(config, steps_per_epoch), b1=opt.b1, b2=opt.b2, eps=opt.eps
  )
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def l1_loss(params, apply_fn: Callable, batch: Batch) -> jax.Array:
  """Mean absolute error between the fused image and `gt` (paper Eq. 4, `nn.L1Loss()`)."""
  out = apply_fn({'params': params}, batch['ms'], batch['guide'])
  return jnp.mean(jnp.abs(out - batch['gt']))


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on the L1 loss of `batch` (roles 'ms', 'guide', 'gt'; NHWC in [0, 1])."""
  loss, grads = jax.value_and_grad(l1_loss)(state.params, state.apply_fn, batch)
  return state.apply_gradients(grads=grads), {'loss': loss}


def eval_step(params, batch: Batch, *, apply_fn: Callable, ratio: int = 4) -> dict[str, jax.Array]:
  """Per-example validation figures for one (possibly padded) batch.

  Returns:
    'loss' (B,) mean |out - gt| per example on the raw output; 'psnr', 'sam', 'ergas' (B,) on the
    output clamped to [0, 1] as the official test does; 'mask' (B,) True for real examples.
  """
  out = apply_fn({'params': params}, batch['ms'], batch['guide'])
  gt = batch['gt']
  clamped = jnp.clip(out, 0.0, 1.0)
  return {
    'loss': jnp.mean(jnp.abs(out - gt), axis=(1, 2, 3)),
    'psnr': metrics.psnr_jax(gt, clamped, data_range=1.0),
    'sam': metrics.sam_jax(gt, clamped),
    'ergas': metrics.ergas_jax(gt, clamped, ratio=ratio),
    'mask': batch['mask'],
  }


# ----------------------------------------------------------------------------------------------
# Devices.


def create_mesh() -> jax.sharding.Mesh:
  """A one-axis mesh over every device of every host; the batch is split along 'data'."""
  # Auto axis type: the compiler propagates shardings (the classic `jit` data parallelism);
  # the model code never mentions devices.
  return jax.make_mesh(
    (jax.device_count(),),
    (input_pipeline.BATCH_AXIS,),
    axis_types=(jax.sharding.AxisType.Auto,),
  )


def compile_steps(mesh: jax.sharding.Mesh, apply_fn: Callable, ratio: int = 4):
  """`train_step` and `eval_step` jitted over `mesh`: batch sharded, state replicated, donated.

  Returns:
    (p_train_step(state, batch), p_eval_step(params, batch)).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharded = input_pipeline.batch_sharding(mesh)
  p_train = jax.jit(
    train_step,
    in_shardings=(replicated, batch_sharded),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  p_eval = jax.jit(
    functools.partial(eval_step, apply_fn=apply_fn, ratio=ratio),
    in_shardings=(replicated, batch_sharded),
    out_shardings=replicated,
  )
  return p_train, p_eval


def check_batch_divides(batch_size: int, num_devices: int) -> None:
  if batch_size % num_devices:
    raise ValueError(
      f'config.train.batch_size={batch_size} does not divide over the {num_devices} devices; '
      f'choose a multiple of {num_devices} (e.g. --config.train.batch_size='
      f'{max(num_devices, batch_size // num_devices * num_devices)})'
    )


# ----------------------------------------------------------------------------------------------
# Logging (host 0 writes; the others stay quiet).


class MetricWriter:
  """Writes scalars as JSON lines (`metrics.jsonl`) and TensorBoard events (tensorboardX)."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    self._tb = None
    if enabled:
      self._jsonl = open(workdir / 'metrics.jsonl', 'a')  # Closed in close().
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------------------------
# The job.


def _check_workdir_writable(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_test_{os.getpid()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise PermissionError(
      f'workdir {workdir} is not writable ({e}); choose another --workdir'
    ) from e


def _restore_or_init(config, workdir: Path, manager, steps_per_epoch: int, replicated):
  """The latest checkpoint of this run, else `config.init_from`'s weights, else a fresh init.

  Returns:
    (state, meta) with `state` placed (replicated) on the mesh.
  """
  new_state = functools.partial(
    create_train_state, config, jax.random.key(config.seed), steps_per_epoch
  )
  latest = manager.latest_step()
  if latest is not None and checkpointing.has_opt_state(manager, latest):
    # Restore into the state's shapes without computing an initialisation.
    abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(new_state),
    )
    restored = checkpointing.restore(
      manager, latest, abstract_params=abstract.params, abstract_opt_state=abstract.opt_state
    )
    meta = restored['meta']
    state = abstract.replace(
      step=jax.device_put(jnp.asarray(meta['step'], jnp.int32), replicated),
      params=restored['params'],
      opt_state=restored['opt_state'],
    )
    logging.info('Resumed from %s step %d (epoch %.2f).', workdir, meta['step'], meta['epoch'])
    return state, meta
  source_dir = config.init_from or (workdir if latest is not None else '')
  params = None
  if source_dir:
    params, step, _ = checkpointing.restore_params(source_dir, config.model)
    logging.info('Initialised the weights from %s (checkpoint step %d).', source_dir, step)
  return jax.device_put(new_state(params=params), replicated), {}


def _evaluate(p_eval, params, config, source, mesh) -> dict[str, float]:
  """Validation loss (L1) and PSNR / SAM / ERGAS, averaged over every example."""
  sums: dict[str, float] = {}
  count = 0
  for batch in input_pipeline.eval_batches(
    config, source, mesh=mesh, batch_size=config.train.batch_size
  ):
    out = jax.device_get(p_eval(params, batch))
    mask = np.asarray(out.pop('mask'), bool)
    count += int(mask.sum())
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(np.asarray(v, np.float64)[mask].sum())
  return {f'valid_{k}': v / max(count, 1) for k, v in sums.items()}


def _check_finite(losses: np.ndarray, step: int, workdir: Path) -> None:
  if not np.isfinite(losses).all():
    raise FloatingPointError(
      f'the training loss became {losses[~np.isfinite(losses)][0]} by step {step}; stopped '
      f'without saving. The last good '
      f'checkpoint in {workdir / "checkpoints"} is intact: lower --config.optimizer.learning_rate '
      'or check the data for extreme values, then re-run to resume from it.'
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`, validating and checkpointing as configured.

  Args:
    config: the run's config (see `configs/default.py`).
    workdir: where checkpoints, `config.json`, `metrics.jsonl` and TensorBoard logs go.

  Returns:
    The final state's summary: {'step', 'epoch', 'params', 'last_metrics', 'valid': {...}}.
  """
  workdir = Path(workdir).resolve()
  is_main = jax.process_index() == 0
  _check_workdir_writable(workdir)
  mesh = create_mesh()
  check_batch_divides(config.train.batch_size, mesh.size)
  train_source = input_pipeline.get_source(config, 'train')
  valid_source = input_pipeline.get_source(config, 'valid')
  steps_per_epoch = input_pipeline.steps_per_epoch(config, train_source)
  total_steps = config.train.num_epochs * steps_per_epoch
  eval_every = max(1, config.train.eval_every_epochs * steps_per_epoch)
  ckpt_every = max(1, config.train.checkpoint_every_epochs * steps_per_epoch)
  if is_main:
    config_utils.save_config(config, workdir)
  logging.info(
    '%d training / %d validation examples; %d steps per epoch; %d steps (%d epochs); '
    'global batch %d over %d devices on %d hosts.',
    len(train_source), len(valid_source), steps_per_epoch, total_steps,
    config.train.num_epochs, config.train.batch_size, mesh.size, jax.process_count(),
  )  # fmt: skip

  replicated = NamedSharding(mesh, PartitionSpec())
  manager = checkpointing.create_manager(workdir, keep=config.train.keep_checkpoints)
  state, meta = _restore_or_init(config, workdir, manager, steps_per_epoch, replicated)
  p_train, p_eval = compile_steps(mesh, state.apply_fn, config.model.scale)
  lr_fn = create_learning_rate_fn(config, steps_per_epoch)
  writer = MetricWriter(workdir, enabled=is_main)
  start_step = int(meta.get('step', 0))
  best = float(meta.get('best_valid_loss', math.inf))
  valid: dict[str, float] = dict(meta.get('valid', {}))
  last: dict[str, float] = {}

  def save(step: int, metrics_: dict | None = None) -> None:
    checkpointing.save(
      manager,
      step,
      params=state.params,
      opt_state=state.opt_state,
      meta={
        'step': step,
        'epoch': step / steps_per_epoch,
        'data_position': step * config.train.batch_size,  # Stream position of the next batch.
        'seed': config.seed,
        'best_valid_loss': best,
        'valid': valid,
      },
      metrics=metrics_,
    )

  batches = input_pipeline.train_batches(config, train_source, mesh=mesh, start_step=start_step)
  pending: list[jax.Array] = []
  t_log, steps_since_log = time.perf_counter(), 0
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, step_metrics = p_train(state, next(batches))
      pending.append(step_metrics['loss'])
      steps_since_log += 1
      at_eval = step % eval_every == 0 or step == total_steps
      at_ckpt = step % ckpt_every == 0 or step == total_steps
      if step % config.train.log_every_steps == 0 or at_eval or at_ckpt:
        losses = np.asarray(jax.device_get(pending), np.float64)
        pending.clear()
        _check_finite(losses, step, workdir)
        elapsed = time.perf_counter() - t_log
        rate = steps_since_log / max(elapsed, 1e-9)
        last = {
          'train_loss': float(losses.mean()),
          'learning_rate': float(lr_fn(step - 1)),
          'steps_per_sec': rate,
          'samples_per_sec': rate * config.train.batch_size,
          'epoch': step / steps_per_epoch,
        }
        writer.write(step, last)
        if is_main:
          logging.info(
            '[%d/%d] epoch %.1f  loss %.5f  lr %.3g  %.2f steps/s  ETA %s',
            step, total_steps, last['epoch'], last['train_loss'], last['learning_rate'], rate,
            _format_eta((total_steps - step) / max(rate, 1e-9)),
          )  # fmt: skip
        t_log, steps_since_log = time.perf_counter(), 0
      if at_eval:
        valid = _evaluate(p_eval, state.params, config, valid_source, mesh)
        writer.write(step, valid)
        if is_main:
          logging.info(
            'validation at step %d: '
            + ', '.join(f'{k} {{{k}:.5f}}'.format(**valid) for k in valid),
            step,
          )
        if valid['valid_loss'] < best:
          best = valid['valid_loss']
          save(step, {checkpointing.BEST_METRIC: best})
          continue
      if at_ckpt:
        # A checkpoint without a fresh validation never counts as the best one.
        save(step, {checkpointing.BEST_METRIC: valid['valid_loss'] if at_eval else math.inf})
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return {
    'step': int(jax.device_get(state.step)),
    'epoch': int(jax.device_get(state.step)) / steps_per_epoch,
    'params': state.params,
    'last_metrics': last,
    'valid': valid,
  }


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when this process is one of several hosts.

  Cloud TPU pods, SLURM and explicit coordinators (JAX_COORDINATOR_ADDRESS) are detected from the
  environment; a single host needs nothing.
  """
  env = os.environ
  multi = (
    'JAX_COORDINATOR_ADDRESS' in env
    or len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
    or int(env.get('SLURM_NTASKS', '1')) > 1
  )
  if multi:
    jax.distributed.initialize()
