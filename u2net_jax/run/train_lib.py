"""Training: the paper's recipe, data-parallel over every device and host, resumable.

`train_and_evaluate(config, workdir)` is the whole job (callable from a Colab cell); `train.py`
is its command-line entry point. The pieces:

- `create_learning_rate_fn`: Adam's learning rate, halved every `decay_every_epochs` (a staircase
  `optax.exponential_decay`, durations converted from epochs to steps once, in `Plan`).
- `create_train_state`: `models.create_model(config.model)` with PyTorch's default initialisation
  (what the official training starts from) and `optax.adam` (PyTorch's Adam: eps outside the
  sqrt).
- `train_step` / `eval_step`: pure functions of (state, batch); the L1 loss (mean) of Eq. 4.

Parallelism is decided in `u2net_jax.run.sharding` (one 'data' mesh, batch sharded, state
replicated); `compile_steps` hands those shardings to `jax.jit`. XLA inserts the gradient
all-reduce, the same code runs on 1 CPU, 8 GPUs or a TPU pod, and the state buffers are donated.
On several hosts each one feeds only its share of every global batch.

Resumption: the data order is a pure function of (seed, step) (`input_pipeline`), and a
checkpoint holds params, the optimizer state and the step, so re-running the same command after a
kill continues the run exactly from the newest intact checkpoint (`checkpointing.restore_intact`:
a damaged step is reported and skipped, never a silent restart). On SIGTERM (preemption) the run
saves at a step every process agrees on and stops (`distributed.PreemptionWatch`). The workdir is
locked, checked to be shared by all hosts and to hold the same config (`workdir`) before anything
is written.

Divergence: each step also returns the global norms of the gradients and of the new parameters;
a non-finite loss, norm or validation figure stops the run before the next checkpoint, and
`checkpointing.save` refuses non-finite parameters in any case.

Size: a little over 500 lines: the state, steps and loop; logging and the NaN guard live in
`train_log`, workdir safety in `workdir`, launch in `distributed`, checkpoints in
`checkpointing`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
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

from u2net_jax import errors, metrics, models
from u2net_jax.data import input_pipeline
from u2net_jax.io import fileio
from u2net_jax.run import (
  checkpointing,
  config_utils,
  distributed,
  losses,
  sharding,
  summaries,
  train_log,
)
from u2net_jax.run import workdir as workdir_lib

TrainState = train_state.TrainState
Batch = Mapping[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Recipe.


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """lr(step) = lr0 * decay_factor ** floor(step / (decay_every_epochs * steps_per_epoch)).

  The official code halves the learning rate every 100 epochs (pansharpening) or 50 (HISR).

  Args:
    config: the run's config (`config.optimizer`).
    steps_per_epoch: steps in one epoch.

  Returns:
    The schedule, a function of the (0-based) step.
  """
  opt = config.optimizer
  return optax.exponential_decay(
    init_value=opt.learning_rate,
    transition_steps=opt.decay_every_epochs * steps_per_epoch,
    decay_rate=opt.decay_factor,
    staircase=True,
  )


def create_train_state(
  config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int, params=None
) -> TrainState:
  """A fresh training state (or one starting from given `params`, e.g. for fine-tuning).

  Args:
    config: the run's config.
    rng: a PRNG key for the initialisation (unused when `params` is given).
    steps_per_epoch: steps in one epoch (for the learning-rate schedule).
    params: optional initial parameters (same tree as the model's).

  Returns:
    A `TrainState` with step 0.
  """
  model = models.create_model(config.model)
  if params is None:
    params = models.init_params(model, rng)
  # Adam unless the config names another (`losses.make_optimizer`: the baselines' recipes).
  tx = losses.make_optimizer(config, create_learning_rate_fn(config, steps_per_epoch))
  return TrainState.create(apply_fn=models.BatchApply(model), params=params, tx=tx)


def train_step(
  state: TrainState, batch: Batch, loss_fn: Callable = losses.l1_loss
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the loss of `batch` (roles 'gt' and the model's; NHWC in [0, 1]).

  `loss_fn` is L1 unless the config names another (`losses.make_loss`, `compile_steps`).

  Returns:
    (the new state, {'loss': the batch's loss before the step, 'grad_norm': the gradients'
    global norm, 'param_norm': the new parameters' global norm}); the norms feed the NaN guard.
  """
  loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, batch)
  state = state.apply_gradients(grads=grads)
  return state, {
    'loss': loss,
    'grad_norm': optax.global_norm(grads),
    'param_norm': optax.global_norm(state.params),
  }


def eval_step(params, batch: Batch, *, apply_fn: Callable, ratio: int = 4) -> dict[str, jax.Array]:
  """Per-example validation figures for one (possibly padded) batch.

  Returns:
    'loss' (B,) mean |out - gt| per example on the raw output; 'psnr', 'sam', 'ergas' (B,) on the
    output clamped to [0, 1] as the official test does; 'mask' (B,) True for real examples.
  """
  out = apply_fn({'params': params}, batch)
  gt = batch['gt']
  clamped = jnp.clip(out, 0.0, 1.0)
  return {
    'loss': jnp.mean(jnp.abs(out - gt), axis=(1, 2, 3)),
    'psnr': metrics.psnr_jax(gt, clamped, data_range=1.0),
    'sam': metrics.sam_jax(gt, clamped),
    'ergas': metrics.ergas_jax(gt, clamped, ratio=ratio),
    'mask': batch['mask'],
  }


def compile_steps(
  mesh: jax.sharding.Mesh, apply_fn: Callable, ratio: int = 4, loss_fn: Callable = losses.l1_loss
):
  """`train_step` (on `loss_fn`) and `eval_step` jitted over `mesh`: batch sharded, state
  replicated, donated.

  Returns:
    (p_train_step(state, batch), p_eval_step(params, batch)).
  """
  replicated = sharding.replicated(mesh)
  batch_sharded = sharding.batch_sharding(mesh)
  p_train = jax.jit(
    functools.partial(train_step, loss_fn=loss_fn),
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


# ----------------------------------------------------------------------------------------------
# The run's step counts.


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run's durations in steps, converted once from the config's epochs."""

  steps_per_epoch: int
  total_steps: int
  eval_every: int
  ckpt_every: int
  log_every: int

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> Plan:
    """The plan of `config.train` for an epoch of `steps_per_epoch` steps."""
    train = config.train
    return cls(
      steps_per_epoch=steps_per_epoch,
      total_steps=train.num_epochs * steps_per_epoch,
      eval_every=max(1, train.eval_every_epochs * steps_per_epoch),
      ckpt_every=max(1, train.checkpoint_every_epochs * steps_per_epoch),
      log_every=train.log_every_steps,
    )

  def at_eval(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def at_ckpt(self, step: int) -> bool:
    return step % self.ckpt_every == 0 or step == self.total_steps

  def at_log(self, step: int) -> bool:
    return step % self.log_every == 0 or self.at_eval(step) or self.at_ckpt(step)


# ----------------------------------------------------------------------------------------------
# Validation and checkpoints.


def _evaluate(p_eval, params, config, source, mesh) -> dict[str, float]:
  """{'valid_loss', 'valid_psnr', 'valid_sam', 'valid_ergas'}: means over every example."""
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


class _Checkpoints:
  """Saves the run's checkpoints and keeps track of the best validation loss."""

  def __init__(self, manager, config, plan: Plan, meta: Mapping[str, Any]):
    self._manager, self._config, self._plan = manager, config, plan
    self.best = float(meta.get('best_valid_loss', math.inf))
    self.valid: dict[str, float] = dict(meta.get('valid', {}))

  def after_step(
    self, state: TrainState, step: int, valid: dict[str, float] | None, force: bool = False
  ) -> None:
    """Saves `step` when it validated better than before, is a checkpoint step or `force`.

    Args:
      state: the state after `step`.
      step: the step just done.
      valid: this step's validation figures, None when it did not validate.
      force: save in any case (the run is about to stop: preemption).
    """
    if valid is not None:
      self.valid = valid
      if valid['valid_loss'] < self.best:
        self.best = valid['valid_loss']
        self._save(state, step, self.best)
        return
    if force or self._plan.at_ckpt(step):
      # A checkpoint without a fresh validation never counts as the best one.
      self._save(state, step, math.inf if valid is None else valid['valid_loss'])

  def _save(self, state: TrainState, step: int, metric: float) -> None:
    checkpointing.save(
      self._manager,
      step,
      params=state.params,
      opt_state=state.opt_state,
      meta={
        'step': step,
        'epoch': step / self._plan.steps_per_epoch,
        # Stream position of the next batch.
        'data_position': step * self._config.train.batch_size,
        'seed': self._config.seed,
        'best_valid_loss': self.best,
        'valid': self.valid,
      },
      metrics={checkpointing.BEST_METRIC: metric},
    )


def _abstract_state(config, steps_per_epoch: int, replicated) -> TrainState:
  """The training state's shapes, dtypes and (replicated) shardings, computing nothing."""
  abstract = jax.eval_shape(
    lambda params: create_train_state(config, None, steps_per_epoch, params=params),
    models.abstract_params(models.create_model(config.model)),
  )
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
  )


def _restore_or_init(config, workdir: Path, manager, steps_per_epoch: int, mesh):
  """The newest intact checkpoint of this run, else `config.init_from`'s weights, else a fresh init.

  A damaged step (unreadable, incomplete, failing its checksum) is skipped with a WARNING and,
  on process 0, moved aside to `workdir/damaged_checkpoints/` so that the step can be saved again;
  no intact step at all is an error, never a silent restart.

  Returns:
    (state, meta) with `state` placed (replicated) on the mesh and `meta` the restored
    checkpoint's facts ({} when the run starts at step 0).
  """
  replicated = sharding.replicated(mesh)
  steps = sorted(manager.all_steps(), reverse=True)
  if steps:
    # Restore into the state's shapes and this run's mesh without computing an initialisation.
    abstract = _abstract_state(config, steps_per_epoch, replicated)

    def restore_one(step):
      if checkpointing.is_training_step(manager, step):
        return checkpointing.restore(
          manager, step, abstract_params=abstract.params, abstract_opt_state=abstract.opt_state
        )
      return checkpointing.restore(manager, step, abstract_params=abstract.params)

    step, restored, damage = checkpointing.restore_intact(manager, steps, restore_one)
    if damage:
      _move_aside(manager, workdir, [s for s in steps if s > step])
    if 'opt_state' in restored:
      meta = restored['meta']
      state = abstract.replace(
        step=jax.device_put(jnp.asarray(meta['step'], jnp.int32), replicated),
        params=restored['params'],
        opt_state=restored['opt_state'],
      )
      logging.info('Resumed from %s step %d (epoch %.2f).', workdir, meta['step'], meta['epoch'])
      return state, meta
    # A params-only checkpoint in the workdir itself (converted weights) is a starting point.
    params = restored['params']
    logging.info('Initialised the weights from %s (checkpoint step %d).', workdir, step)
  elif config.init_from:
    config_utils.check_init_from(config)  # Another model's weights: a clear error, not a shape one.
    # Read by each process onto its own devices, then placed on the mesh from host memory like
    # a fresh init (a device-to-device copy across processes is not possible on every backend).
    params, step, _ = checkpointing.restore_params(config.init_from, config.model, which='best')
    params = jax.device_get(params)
    logging.info('Initialised the weights from %s (checkpoint step %d).', config.init_from, step)
  else:
    params = None
  state = create_train_state(config, jax.random.key(config.seed), steps_per_epoch, params=params)
  return jax.device_put(state, replicated), {}


def _move_aside(manager, workdir: Path, steps: list[int]) -> None:
  """Moves damaged steps out of `checkpoints/` (process 0) so that they can be saved again."""
  if steps and jax.process_index() == 0:
    aside = workdir / 'damaged_checkpoints'
    aside.mkdir(exist_ok=True)
    for step in steps:
      target = aside / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
      shutil.move(str(Path(manager.directory) / str(step)), target)
      logging.warning('Moved the damaged checkpoint step %d to %s.', step, target)
  if steps:
    if jax.process_count() > 1:
      distributed.all_processes_agree(True)  # The others wait until the folders are moved.
    manager.reload()


# ----------------------------------------------------------------------------------------------
# The job.


def _prepare(config, workdir: Path):
  """Checks the workdir and the devices, opens the data; everything that can fail fast.

  Returns:
    (mesh, train_source, valid_source, plan).
  """
  mesh = sharding.create_mesh()
  try:
    sharding.check_batch_divides(config.train.batch_size, mesh, 'config.train.batch_size')
  except ValueError as e:  # A config value the user fixes: reported as a config error.
    raise config_utils.ConfigError(str(e)) from None
  train_source = input_pipeline.get_source(config, 'train')
  valid_source = input_pipeline.get_source(config, 'valid')
  plan = Plan.create(config, input_pipeline.steps_per_epoch(config, train_source))
  logging.info(
    '%d training / %d validation examples; %d steps per epoch; %d steps (%d epochs); '
    'global batch %d over %d devices on %d hosts.',
    len(train_source), len(valid_source), plan.steps_per_epoch, plan.total_steps,
    config.train.num_epochs, config.train.batch_size, mesh.size, jax.process_count(),
  )  # fmt: skip
  return mesh, train_source, valid_source, plan


def _validate(
  p_eval, state, config, source, mesh, writer: train_log.MetricWriter, step: int
) -> dict:
  valid = _evaluate(p_eval, state.params, config, source, mesh)
  bad = {k: v for k, v in valid.items() if not math.isfinite(v)}
  if bad:
    # A NaN loss would never be "better", but an infinite PSNR (an empty or all-zero
    # validation set) must not pass for a result either.
    raise errors.DivergedError(
      f'validation at step {step} gave non-finite figures {bad}: this step is not saved. Check '
      f'the validation data ({config.data.get("valid_file", "")}) and the learning rate.'
    )
  writer.write(step, valid)
  if writer.enabled:
    figures = ', '.join(f'{k} {v:.5f}' for k, v in valid.items())
    logging.info('validation at step %d: %s', step, figures)
  return valid


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  allow_config_change: bool = False,
  shared_wait_s: float = workdir_lib.SHARED_WAIT_S,
) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`, validating and checkpointing as configured.

  Args:
    config: the run's config (see `configs/default.py`); finalized here if it is not yet.
    workdir: where checkpoints, `config.json`, `metrics.jsonl` and TensorBoard logs go; with
      several processes, one folder that all of them share.
    allow_config_change: resume even when the config differs from the stored one in fields
      that define the run (model, data, seed, optimizer); the differences are logged.
    shared_wait_s: how long the other processes wait to see process 0's marker in the workdir.

  Returns:
    The final state's summary: {'step', 'epoch', 'params', 'last_metrics', 'valid': {...}}.

  Raises:
    config_utils.ConfigError: an invalid config, or a global batch that does not split over
      the devices.
    fileio.OutputError: the workdir cannot be written.
    errors.WorkdirError: the workdir is in use, not shared by all hosts, or holds another config.
    errors.CheckpointError: the workdir's checkpoints are all damaged.
    DataError: the data are missing or invalid.
    errors.DivergedError: the loss, a norm or a validation figure became NaN or infinite (the
      checkpoints, all finite, are kept).
    errors.Preempted: SIGTERM; a checkpoint was saved at the step every process agreed on.
  """
  # Idempotent: train.py's config is finalized already, a notebook's may not be.
  config = config_utils.finalize(config)
  workdir = Path(workdir).resolve()
  fileio.ensure_writable_dir(workdir, 'workdir')
  with workdir_lib.claim(workdir, shared_wait_s):
    # Before anything is written: config.json must keep describing the checkpoints beside it.
    if checkpointing.has_training_steps(workdir):
      workdir_lib.check_config(workdir, config, allow_changes=allow_config_change)
    mesh, train_source, valid_source, plan = _prepare(config, workdir)
    if jax.process_index() == 0:
      config_utils.save_config(config, workdir)
    return _train(config, workdir, mesh, train_source, valid_source, plan)


def _train(config, workdir: Path, mesh, train_source, valid_source, plan: Plan) -> dict[str, Any]:
  """The training loop of `train_and_evaluate`, from the restored (or initial) state."""
  is_main = jax.process_index() == 0
  manager = checkpointing.create_manager(workdir, keep=config.train.keep_checkpoints)
  state, meta = _restore_or_init(config, workdir, manager, plan.steps_per_epoch, mesh)
  p_train, p_eval = compile_steps(
    mesh, state.apply_fn, config.model.scale, loss_fn=losses.make_loss(config)
  )
  p_train = summaries.log_first_call(p_train, 'the train step')  # Says it compiles, and how long.
  writer = train_log.MetricWriter(workdir, enabled=is_main)
  log = train_log.TrainLog(
    config, plan, writer, workdir, create_learning_rate_fn(config, plan.steps_per_epoch)
  )
  checkpoints = _Checkpoints(manager, config, plan, meta)
  images = summaries.ValidationImages(config, valid_source, workdir)  # TensorBoard previews.
  start_step = int(meta.get('step', 0))
  batches = input_pipeline.train_batches(config, train_source, mesh=mesh, start_step=start_step)
  preempted_at = None
  try:
    with distributed.PreemptionWatch() as watch:
      for step in range(start_step + 1, plan.total_steps + 1):
        state, step_metrics = p_train(state, next(batches))
        log.add(step_metrics)
        stop = watch.reached(step)
        if plan.at_log(step) or stop:
          log.flush(step)  # Before any save: a diverged state is never written.
        valid = None
        if plan.at_eval(step):
          valid = _validate(p_eval, state, config, valid_source, mesh, writer, step)
          images.write(state, step)
        checkpoints.after_step(state, step, valid, force=stop)
        if stop:
          preempted_at = step
          break
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    images.close()
  if preempted_at is not None:
    raise errors.Preempted(
      f'stopped by {watch.signal_name} at step {preempted_at}/{plan.total_steps}: checkpoint '
      f'saved in {workdir / "checkpoints"}; re-run the same command to resume'
    )
  final_step = int(jax.device_get(state.step))
  summaries.closing_summary(config, workdir, valid_source, step=final_step)
  return {
    'step': final_step,
    'epoch': final_step / plan.steps_per_epoch,
    'params': state.params,
    'last_metrics': log.last,
    'valid': checkpoints.valid,
  }
