"""Checkpoints of a workdir: orbax `CheckpointManager` in `workdir/checkpoints`.

One layout for training runs and for converted official weights:

  workdir/config.json              the run's config (`config_utils.save_config`)
  workdir/checkpoints/<step>/      items: 'params' (always), 'opt_state' (training runs),
                                   'meta' (JSON: step, epoch, data position, seed, origin)

Orbax writes each step into a temporary directory and renames it when complete, so a crash or a
kill never leaves a corrupt checkpoint behind: the latest *complete* step is restored. Kept: the
last `keep` checkpoints plus the best one by validation loss (saved with `metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

BEST_METRIC = 'valid_loss'


def checkpoint_dir(workdir: str | Path) -> Path:
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
  """Saves a step (asynchronously if the manager is async)."""
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
  """Synchronously saves a params-only checkpoint (e.g. converted official weights)."""
  manager = create_manager(workdir, async_save=False)
  save(manager, step, params=params, meta=dict(meta or {}, step=step))
  manager.wait_until_finished()
  manager.close()


def select_step(workdir: str | Path, step: int | None = None, which: str = 'best') -> int:
  """The checkpoint step to evaluate: `step` if given, else the best one (or the latest).

  Raises:
    FileNotFoundError: the workdir has no (complete) checkpoint, or not that step.
  """
  directory = checkpoint_dir(workdir)
  manager = create_manager(workdir, read_only=True) if directory.is_dir() else None
  steps = manager.all_steps() if manager else []
  if not steps:
    raise FileNotFoundError(
      f'no checkpoint in {directory}: train with train.py or convert official weights with '
      '`python -m u2net_jax.convert` first'
    )
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f'{directory} has no step {step}; available: {sorted(steps)}')
    return step
  best = manager.best_step() if which == 'best' else None
  return best if best is not None else manager.latest_step()


def restore_params(workdir: str | Path, model_config, step: int | None = None, which='best'):
  """Restores a workdir's params for `models.U2Net(**model_config)`.

  Returns:
    (params, step, meta).
  """
  from u2net_jax import models

  step = select_step(workdir, step, which)
  model = models.U2Net(**dict(model_config))
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), ms_size=4))
  manager = create_manager(workdir, read_only=True)
  restored = restore(manager, step, abstract_params=abstract)
  manager.close()
  return restored['params'], step, restored['meta']
