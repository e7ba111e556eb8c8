"""Checkpoints of a workdir: orbax `CheckpointManager` in `workdir/checkpoints`.

One layout for training runs and for converted official weights:

  workdir/config.json              the run's config (`config_utils.save_config`)
  workdir/checkpoints/<step>/      items: 'params' (always), 'opt_state' (training runs),
                                   'meta' (JSON: step, epoch, data position, seed, origin)

Orbax writes each step into a temporary directory and renames it when complete, so a crash or a
kill never leaves a corrupt checkpoint behind: the latest *complete* step is restored. Kept: the
last `keep` checkpoints plus the best one by validation loss (saved with `metrics`).

Reading a workdir's weights is two calls, each listing the checkpoints once:
`select_step(workdir, step, which)` picks the step (and fails early, before any data are read),
`restore_params(workdir, model_config, step=that_step)` restores exactly that step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orbax.checkpoint as ocp

from u2net_jax import models

BEST_METRIC = 'valid_loss'
WHICH = ('best', 'latest')


class Restored(NamedTuple):
  """A restored params-only view of a checkpoint: unpacks as `params, step, meta = ...`."""

  params: Any
  step: int
  meta: dict


def checkpoint_dir(workdir: str | Path) -> Path:
  """Where a workdir's checkpoints live (`workdir/checkpoints`, absolute)."""
  return Path(workdir).resolve() / 'checkpoints'


def create_manager(
  workdir: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager: keeps the last `keep` steps and the best one.

  Args:
    workdir: the run's directory; checkpoints go to `workdir/checkpoints`.
    keep: how many of the most recent checkpoints to keep (the best is kept in addition).
    async_save: write in a background thread (call `wait_until_finished()` before exit).
    read_only: open an existing directory for restoring only.

  Returns:
    An orbax `CheckpointManager` over the items 'params', 'opt_state' and 'meta'.
  """
  policies = ocp.checkpoint_managers
  preservation = policies.AnyPreservationPolicy(
    [
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=async_save,
    preservation_policy=preservation,
    best_fn=lambda m: m[BEST_METRIC],
    best_mode='min',
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), item_names=('params', 'opt_state', 'meta'), options=options
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  *,
  params: Any,
  opt_state: Any = None,
  meta: dict | None = None,
  metrics: dict | None = None,
) -> None:
  """Saves a step (asynchronously if the manager is async).

  Args:
    manager: from `create_manager`.
    step: the step number (the checkpoint's folder name).
    params: the parameter tree.
    opt_state: the optimizer state (training runs); None for a params-only checkpoint.
    meta: JSON-serialisable facts about the step (epoch, data position, origin, ...).
    metrics: {BEST_METRIC: value} for the keep-the-best policy.
  """
  items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta or {})}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  *,
  abstract_params: Any,
  abstract_opt_state: Any = None,
) -> dict:
  """Restores a step into the given abstract targets (shapes, dtypes, shardings).

  Args:
    manager: from `create_manager`.
    step: an existing step.
    abstract_params: `jax.ShapeDtypeStruct` tree of the params (with shardings to place them).
    abstract_opt_state: the same for the optimizer state; None restores no optimizer state.

  Returns:
    dict with 'params', 'meta', and 'opt_state' if `abstract_opt_state` is given.
  """
  items = {'params': ocp.args.StandardRestore(abstract_params), 'meta': ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return {k: restored[k] for k in items}


def has_opt_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` holds an optimizer state (training runs) or only params (conversions)."""
  return (Path(manager.directory) / str(step) / 'opt_state').exists()


def save_params(workdir: str | Path, params: Any, *, step: int = 0, meta: dict | None = None):
  """Synchronously saves a params-only checkpoint (e.g. converted official weights).

  Args:
    workdir: the workdir; the checkpoint goes to `workdir/checkpoints/<step>`.
    params: the parameter tree.
    step: the step number to save it as.
    meta: extra JSON facts (e.g. 'converted_from'); 'step' is added.
  """
  manager = create_manager(workdir, async_save=False)
  save(manager, step, params=params, meta=dict(meta or {}, step=step))
  manager.wait_until_finished()
  manager.close()


@contextlib.contextmanager
def _read_only(workdir: str | Path) -> Iterator[ocp.CheckpointManager]:
  """A read-only manager over a workdir that has at least one complete checkpoint."""
  directory = checkpoint_dir(workdir)
  manager = create_manager(workdir, read_only=True) if directory.is_dir() else None
  try:
    if manager is None or not manager.all_steps():
      raise FileNotFoundError(
        f'no checkpoint in {directory}: train with train.py or convert official weights with '
        '`python -m u2net_jax.convert` first'
      )
    yield manager
  finally:
    if manager is not None:
      manager.close()


def _choose(manager: ocp.CheckpointManager, step: int | None, which: str) -> int:
  if which not in WHICH:
    raise ValueError(f'which must be one of {WHICH}, got {which!r}')
  steps = manager.all_steps()
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f'{manager.directory} has no step {step}; available: {sorted(steps)}')
    return step
  best = manager.best_step() if which == 'best' else None
  return best if best is not None else manager.latest_step()


def select_step(workdir: str | Path, step: int | None = None, which: str = 'best') -> int:
  """The checkpoint step to evaluate: `step` if given, else the best one (or the latest).

  Args:
    workdir: the workdir.
    step: a specific step (checked to exist).
    which: without `step`, 'best' (lowest validation loss; the latest when none was validated)
      or 'latest'.

  Returns:
    The step, to pass on as `restore_params(..., step=step)`.

  Raises:
    FileNotFoundError: the workdir has no (complete) checkpoint, or not that step.
  """
  with _read_only(workdir) as manager:
    return _choose(manager, step, which)


def restore_params(
  workdir: str | Path, model_config, step: int | None = None, which: str = 'best'
) -> Restored:
  """Restores a workdir's params for `models.create_model(model_config)`.

  Args:
    workdir: the workdir.
    model_config: the `config.model` section the checkpoint was trained with.
    step: the step to restore, typically already chosen by `select_step` (it is then only
      checked to exist, with the listing this call makes anyway); None chooses by `which`.
    which: 'best' or 'latest', as in `select_step`, when `step` is None.

  Returns:
    `Restored(params, step, meta)` (a named tuple: `params, step, meta = restore_params(...)`).

  Raises:
    FileNotFoundError: the workdir has no (complete) checkpoint, or not that step.
  """
  with _read_only(workdir) as manager:
    step = _choose(manager, step, which)  # Fails before the model is traced.
    abstract = models.abstract_params(models.create_model(model_config))
    restored = restore(manager, step, abstract_params=abstract)
  return Restored(restored['params'], step, restored['meta'])
