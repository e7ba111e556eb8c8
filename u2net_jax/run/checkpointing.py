"""Checkpoints of a workdir: orbax `CheckpointManager` in `workdir/checkpoints`.

One layout for training runs and for converted official weights:

  workdir/config.json              the run's config (`config_utils.save_config`)
  workdir/checkpoints/<step>/      items: 'params' (always), 'opt_state' (training runs),
                                   'meta' (JSON: step, epoch, data position, seed, origin)

Orbax writes each step into a temporary directory and renames it when complete, so a crash or a
kill never leaves a half-written checkpoint behind. Kept: the last `keep` checkpoints plus the best
one by validation loss (saved with `metrics`).

Integrity: `save` stores a SHA-256 of every item's arrays (the bytes of each leaf in tree order)
in the step's 'meta', and refuses non-finite parameters; every restore recomputes and compares
them. A step that cannot be read, lacks an item it should hold (a training step without its
optimizer state, an empty folder) or fails its checksum is *damaged*: `restore_intact` falls back
to the newest intact step with a WARNING naming the damage, and raises `errors.CheckpointError`
when none is intact. Nothing ever restarts from scratch silently.

Topology: every restore is given explicit shardings for the current process's devices (the
training mesh, or this process's local devices for evaluation), so a checkpoint saved on N
devices of P processes restores on any M devices of Q processes.

Reading a workdir's weights is two calls, each listing the checkpoints once:
`select_step(workdir, step, which)` picks the step (and fails early, before any data are read),
`restore_params(workdir, model_config, step=that_step)` restores exactly that step.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from u2net_jax import errors, models
from u2net_jax.run import sharding

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


def foreign_folders(workdir: str | Path) -> list[str]:
  """Folders of `workdir/checkpoints` that are not steps (a renamed or copied-in step).

  Orbax lists only folders named by an integer; a step renamed `1200_good` or `best` would be
  ignored without a word, and a run whose steps are all renamed would start afresh.
  """
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(
    p.name
    for p in directory.iterdir()
    if p.is_dir() and not p.name.isdigit() and '.orbax-checkpoint-tmp' not in p.name
  )


def _check_foreign(workdir: str | Path, steps: Sequence[int]) -> None:
  """Refuses a checkpoint folder whose every step-like folder is foreign; warns otherwise."""
  foreign = foreign_folders(workdir)
  if not foreign:
    return
  what = (
    f'{checkpoint_dir(workdir)} holds folders that are not steps (not named by an integer): '
    f'{foreign}'
  )
  if not steps:
    raise errors.CheckpointError(
      f'{what} and no step: rename each back to its step number (e.g. 1200), or move them out '
      'of checkpoints/ to start afresh'
    )
  logging.warning('%s; they are ignored (steps: %s).', what, sorted(steps))


def create_manager(
  workdir: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager: keeps the last `keep` steps and the best one.

  Args:
    workdir: the run's directory; checkpoints go to `workdir/checkpoints`.
    keep: how many of the most recent checkpoints to keep (the best is kept in addition).
    async_save: write in a background thread (call `wait_until_finished()` before exit).
    read_only: open an existing directory for restoring only. Such a manager involves this
      process alone (no barrier with the others), so that one process can read a checkpoint
      while the others do something else, and each process restores onto its own devices.

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
    save_root_metadata=not read_only,
    multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=jax.process_index(), active_processes={jax.process_index()}
    )
    if read_only and jax.process_count() > 1
    else ocp.options.MultiprocessingOptions(),
  )
  manager = ocp.CheckpointManager(
    checkpoint_dir(workdir), item_names=('params', 'opt_state', 'meta'), options=options
  )
  try:
    _check_foreign(workdir, manager.all_steps())
  except errors.CheckpointError:
    manager.close()
    raise
  return manager


def _host_leaves(tree: Any) -> list[np.ndarray]:
  """The leaves of `tree` as host arrays (a replicated array's local copy, on any process)."""
  leaves = []
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)  # Replicated: every process holds the whole array.
    leaves.append(np.asarray(jax.device_get(leaf)))
  return leaves


def tree_checksum(tree: Any) -> str:
  """SHA-256 (hex) over the shapes, dtypes and bytes of `tree`'s leaves, in tree order."""
  digest = hashlib.sha256()
  for leaf in _host_leaves(tree):
    digest.update(f'{leaf.shape}{leaf.dtype.str};'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _check_finite(tree: Any, step: int) -> None:
  for k, leaf in enumerate(_host_leaves(tree)):
    if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
      raise errors.DivergedError(
        f'refusing to save step {step}: parameter array {k} (shape {leaf.shape}) holds '
        f'{int((~np.isfinite(leaf)).sum())} non-finite values; the earlier checkpoints are kept'
      )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  *,
  params: Any,
  opt_state: Any = None,
  meta: dict | None = None,
  metrics: dict | None = None,
  allow_non_finite: bool = False,
) -> None:
  """Saves a step (asynchronously if the manager is async) with the checksums of its items.

  Args:
    manager: from `create_manager`.
    step: the step number (the checkpoint's folder name).
    params: the parameter tree (must be finite).
    opt_state: the optimizer state (training runs); None for a params-only checkpoint.
    meta: JSON-serialisable facts about the step (epoch, data position, origin, ...).
    metrics: {BEST_METRIC: value} for the keep-the-best policy.
    allow_non_finite: save NaN or infinite parameters (converted weights said to be wanted so;
      training never saves them).

  Raises:
    errors.DivergedError: `params` holds NaN or infinite values (nothing is written).
  """
  if not allow_non_finite:
    _check_finite(params, step)
  checksums = {'params': tree_checksum(params)}
  items = {'params': ocp.args.StandardSave(params)}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
    checksums['opt_state'] = tree_checksum(opt_state)
  items['meta'] = ocp.args.JsonSave(dict(meta or {}, checksums=checksums))
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  *,
  abstract_params: Any,
  abstract_opt_state: Any = None,
) -> dict:
  """Restores a step into the given abstract targets and verifies its checksums.

  Args:
    manager: from `create_manager`.
    step: an existing step.
    abstract_params: `jax.ShapeDtypeStruct` tree of the params, with the shardings to place
      them on (the current topology, whatever the saving one was).
    abstract_opt_state: the same for the optimizer state; None restores no optimizer state.

  Returns:
    dict with 'params', 'meta', and 'opt_state' if `abstract_opt_state` is given.

  Raises:
    errors.CheckpointError: the step is damaged (unreadable item, missing item, checksum).
  """
  directory = Path(manager.directory) / str(step)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # noqa: BLE001 (whatever orbax raises, the step is unreadable)
    raise errors.CheckpointError(f'{directory}: meta unreadable ({_brief(e)})') from e
  if not isinstance(meta, dict):
    raise errors.CheckpointError(f'{directory}: meta is not a JSON object')
  _check_meta(meta, step, directory)
  wanted = ['params'] + (['opt_state'] if abstract_opt_state is not None else [])
  for name in wanted:
    if not (directory / name).is_dir():
      raise errors.CheckpointError(f'{directory}: the item {name!r} is missing')
  items = {'params': ocp.args.StandardRestore(abstract_params)}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:
    if 'do not match' in str(e) or 'shape' in str(e).lower():
      # Not damage: another model or optimizer than the one that saved it.
      raise errors.CheckpointMismatchError(
        f'{directory} does not fit the config (model / optimizer): {_brief(e)}'
      ) from e
    raise errors.CheckpointError(f'{directory}: data unreadable ({_brief(e)})') from e
  except Exception as e:  # noqa: BLE001 (tensorstore, orbax and asyncio errors alike)
    raise errors.CheckpointError(f'{directory}: data unreadable ({_brief(e)})') from e
  result = {k: restored[k] for k in items}
  expected = meta.get('checksums')
  if not isinstance(expected, dict) or not set(items) <= set(expected):
    # Every step this project writes records its items' checksums.
    raise errors.CheckpointError(f'{directory}: no checksums for {sorted(items)} (damaged meta)')
  for name in items:
    if tree_checksum(result[name]) != expected[name]:
      raise errors.CheckpointError(
        f'{directory}: the {name!r} arrays do not match their checksum (damaged data)'
      )
  result['meta'] = {k: v for k, v in meta.items() if k != 'checksums'}
  return result


def _check_meta(meta: dict, step: int, directory: Path) -> None:
  """Refuses the facts a resume relies on when they are not what `save` writes (damaged meta)."""
  recorded = meta.get('step', step)
  if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded != step:
    raise errors.CheckpointError(
      f"{directory}: meta records step {recorded!r}, not the folder's integer step {step} "
      '(damaged meta)'
    )
  for name in ('epoch', 'data_position'):
    value = meta.get(name, 0)
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
      raise errors.CheckpointError(
        f'{directory}: meta records {name} {value!r}, not a number >= 0 (damaged meta)'
      )


def _vanished(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step`'s folder is gone: removed by the run that writes the workdir (it keeps the
  last few steps), not damaged."""
  return not (Path(manager.directory) / str(step)).exists()


def _brief(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:200] if text else ""}'


def is_training_step(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` was written by training (it should hold an optimizer state).

  A step folder with an 'opt_state' item, or whose meta records a data position, is one; a
  converted checkpoint (params only) is not. An unreadable step counts as a training step, so
  that its damage is reported rather than taken for a params-only start.
  """
  directory = Path(manager.directory) / str(step)
  if (directory / 'opt_state').exists():
    return True
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception:  # noqa: BLE001
    return True
  return not isinstance(meta, dict) or 'data_position' in meta


def has_training_steps(workdir: str | Path) -> bool:
  """Whether the workdir's checkpoints include a training run's (a step with an opt_state)."""
  directory = checkpoint_dir(workdir)
  return directory.is_dir() and any(p.is_dir() for p in directory.glob('*/opt_state'))


def restore_intact(
  manager: ocp.CheckpointManager,
  steps: Sequence[int],
  restore_one,
) -> tuple[int, Any, list[str]]:
  """`restore_one(step)` for the first of `steps` that is intact, warning about the others.

  Args:
    manager: the workdir's manager (for messages).
    steps: the candidates, in order of preference (e.g. newest first).
    restore_one: step -> restored value; raises `errors.CheckpointError` on a damaged step.

  A step whose folder disappears while it is read was removed by a training run writing the
  workdir (it keeps only the last few): the steps are listed again and the newest untried ones
  tried, and it is not called damaged.

  Returns:
    (the step restored, its value, the damage found in the steps tried before it).

  Raises:
    errors.CheckpointError: no candidate is intact; the message lists each one's damage.
  """
  damage, tried = [], set()
  pending = list(steps)
  while pending:
    step = pending.pop(0)
    tried.add(step)
    try:
      value = restore_one(step)
    except errors.CheckpointError as e:
      if _vanished(manager, step):
        logging.info('Checkpoint step %d was removed while being read; listing again.', step)
        manager.reload()
        pending = sorted((s for s in manager.all_steps() if s not in tried), reverse=True)
        continue
      damage.append(str(e))
      logging.warning('Checkpoint step %d is damaged: %s', step, e)
      continue
    if damage:
      logging.warning(
        'Using step %d, the newest intact checkpoint, instead of the damaged: %s',
        step,
        '; '.join(damage),
      )
    return step, value, damage
  raise errors.CheckpointError(
    f'no intact checkpoint in {manager.directory}:\n  '
    + '\n  '.join(damage or ['(no checkpoint at all)'])
  )


def save_params(
  workdir: str | Path,
  params: Any,
  *,
  step: int = 0,
  meta: dict | None = None,
  allow_non_finite: bool = False,
):
  """Synchronously saves a params-only checkpoint (e.g. converted official weights).

  Args:
    workdir: the workdir; the checkpoint goes to `workdir/checkpoints/<step>`.
    params: the parameter tree.
    step: the step number to save it as.
    meta: extra JSON facts (e.g. 'converted_from'); 'step' is added.
    allow_non_finite: save NaN or infinite parameters (`convert --allow_non_finite`).
  """
  manager = create_manager(workdir, async_save=False)
  save(
    manager,
    step,
    params=params,
    meta=dict(meta or {}, step=step),
    allow_non_finite=allow_non_finite,
  )
  manager.wait_until_finished()
  manager.close()


@contextlib.contextmanager
def _read_only(workdir: str | Path) -> Iterator[ocp.CheckpointManager]:
  """A read-only manager over a workdir that has at least one complete checkpoint."""
  directory = checkpoint_dir(workdir)
  manager = create_manager(workdir, read_only=True) if directory.is_dir() else None
  try:
    if manager is None or not manager.all_steps():
      raise errors.CheckpointError(
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
      raise errors.CheckpointError(
        f'{manager.directory} has no step {step}; available: {sorted(steps)}'
      )
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
    errors.CheckpointError (a FileNotFoundError): no (complete) checkpoint, or not that step.
  """
  with _read_only(workdir) as manager:
    return _choose(manager, step, which)


def abstract_params(model_config, placement: jax.sharding.Sharding | None = None) -> Any:
  """The params' shapes and dtypes for `model_config`, placed by `placement`.

  Args:
    model_config: a `config.model` section.
    placement: where the restored arrays go; default: replicated over this process's devices.
  """
  if placement is None:
    placement = sharding.replicated(sharding.local_mesh())
  abstract = models.abstract_params(models.create_model(model_config))
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), abstract
  )


def restore_params(
  workdir: str | Path,
  model_config,
  step: int | None = None,
  which: str = 'best',
  *,
  placement: jax.sharding.Sharding | None = None,
  fallback: bool = True,
  chosen_by_select: bool = False,
) -> Restored:
  """Restores a workdir's params for `models.create_model(model_config)` on this topology.

  Args:
    workdir: the workdir.
    model_config: the `config.model` section the checkpoint was trained with.
    step: the step to restore, typically already chosen by `select_step`; None chooses by
      `which`.
    which: 'best' or 'latest', as in `select_step`, when `step` is None.
    placement: the sharding of the restored arrays (default: replicated over this process's
      devices; training passes its mesh's). Any saving topology restores onto it.
    fallback: when the chosen step is damaged, use the newest intact other step (with a
      WARNING) instead of failing.
    chosen_by_select: `step` was chosen by `select_step` (not asked for by the user): if a running
      training has rotated it away since, the steps are listed again and the newest is used. An
      explicit step that does not exist stays an error.

  Returns:
    `Restored(params, step, meta)` (a named tuple: `params, step, meta = restore_params(...)`);
    `step` is the step actually restored.

  Raises:
    errors.CheckpointError (a FileNotFoundError): no checkpoint, not that step, or no intact one.
  """
  with _read_only(workdir) as manager:
    if step is not None and chosen_by_select and step not in manager.all_steps():
      # Chosen by `select_step`, then rotated away by the training writing this workdir.
      logging.info('Checkpoint step %d is gone (a running training removed it); newest used.', step)
      step = None
      which = 'latest'
    chosen = _choose(manager, step, which)  # Fails before the model is traced.
    abstract = abstract_params(model_config, placement)
    others = sorted((s for s in manager.all_steps() if s != chosen), reverse=True)
    candidates = [chosen] + (others if fallback else [])
    got, restored, _ = restore_intact(
      manager, candidates, lambda s: restore(manager, s, abstract_params=abstract)
    )
  return Restored(restored['params'], got, restored['meta'])
