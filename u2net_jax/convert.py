"""The authors' PyTorch checkpoints -> Flax parameters, without torch.

`load_torch_state_dict` (`pth_reader`) reads `.pth` files (the zip format of torch >= 1.6 and the
legacy format) with a restricted unpickler that rebuilds tensors and ordered dicts and nothing
else, and validates every tensor against the bytes present (see `pth_reader`).

`torch_to_flax` maps the authors' state dict onto the Flax parameter tree of
`models.create_model(config.model)` through the network's table of rules (`ModelSpec.weights`,
e.g. `models.u2net.WEIGHTS` for the official `PSRben/U2Net` layout; `io.torch_weights`), checking
a one-to-one match of names and shapes. The same mapping converts gradients (they have the state
dict's keys).

CLI (writes an orbax checkpoint and `config.json` in the layout training uses; any config field
can be overridden, e.g. `--config.model.attention=direct`; a workdir that already holds files is
refused unless `--overwrite`, which replaces it as a whole; NaN/infinite weights are refused
unless `--allow_non_finite`):

  python -m u2net_jax.convert --checkpoint=u2net_wv3_200000_iter.pth \
      --config=configs/wv3.py --workdir=workdirs/official_wv3
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from u2net_jax import models
from u2net_jax.io import fileio, torch_weights
from u2net_jax.io.pth_reader import (  # noqa: F401 (re-exported: the reader's public API)
  CheckpointFormatError,
  UnsafeCheckpointError,
  load_torch_state_dict,
)
from u2net_jax.run import checkpointing, config_utils

# --------------------------------------------------------------------------------------------
# The authors' state dict <-> Flax parameters, through the network's table (`ModelSpec.weights`).


def _table(model_config) -> torch_weights.WeightTable:
  spec = models.get(dict(model_config or {}).get('name'))
  if spec.weights is None:
    raise ValueError(f'model {spec.name!r} has no PyTorch weight table (no released weights)')
  return spec.weights


def torch_key(flax_path: str, model_config=None) -> tuple[str, tuple[int, ...] | None]:
  """The authors' state-dict key of a Flax parameter path, and the layout change.

  Args:
    flax_path: e.g. 's2block0/attention/sa1/kernel'.
    model_config: `config.model` naming the network (None: U2Net).

  Returns:
    (torch key, axes): the Flax array is `np.transpose(torch_array, axes)`, or the torch array
    itself when axes is None.
  """
  return _table(model_config).torch_key(flax_path)


def param_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """Flat Flax parameter path 'a/b/c' -> shape for `models.create_model(model_config)`.

  No computation: the shapes come from `models.abstract_params`.
  """
  abstract = models.abstract_params(models.create_model(model_config))
  flat = traverse_util.flatten_dict(abstract, sep='/')
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model_config) -> dict:
  """Maps the authors' state dict (or a dict of its gradients) onto Flax parameters.

  Args:
    state_dict: torch key -> array, e.g. from `load_torch_state_dict`.
    model_config: `config.model` (the network `name` and its fields).

  Returns:
    The nested Flax 'params' tree (float32 numpy arrays).

  Raises:
    ValueError: a tensor is missing, has the wrong shape, or is neither used nor a known unused
      tensor; the message names the tensor, the expected and the found shape.
  """
  return torch_weights.torch_to_flax(
    state_dict, _table(model_config), param_shapes(model_config), str(dict(model_config))
  )


def unused_keys(state_dict: Mapping[str, np.ndarray], model_config=None) -> list[str]:
  """The tensors that the network's forward pass never uses (U2Net: `maxpool_conv`, `up0`)."""
  return _table(model_config).unused_keys(state_dict)


# --------------------------------------------------------------------------------------------
# CLI.


def existing_run(workdir: str | Path) -> list[str]:
  """What in `workdir` a conversion would replace: a config, checkpoints, logs (empty: nothing).

  Args:
    workdir: the destination workdir.

  Returns:
    The names found (e.g. ['config.json', 'checkpoints/']), sorted.
  """
  workdir = Path(workdir)
  if not workdir.is_dir():
    return []
  return sorted(p.name + ('/' if p.is_dir() else '') for p in workdir.iterdir())


def convert_to_workdir(
  checkpoint: str | Path,
  config,
  workdir: str | Path,
  *,
  overwrite: bool = False,
  allow_non_finite: bool = False,
) -> dict:
  """Converts `checkpoint` for `config.model` into an orbax checkpoint in `workdir`.

  Writes `workdir/config.json` (`config_utils.save_config`) and a step-0 checkpoint (params only)
  in `workdir/checkpoints`, the layout that training writes, so `evaluate.py --workdir` and
  `--config.init_from` accept it. The workdir is built in a temporary folder beside it and
  renamed into place (`fileio.atomic_dir`): a failure or a kill leaves no half-written workdir.

  Args:
    checkpoint: the official `.pth` state-dict.
    config: the full config (its `model` section must match the checkpoint).
    workdir: the output workdir; it must not exist or be empty, unless `overwrite`.
    overwrite: replace an existing workdir (a training run, other weights) as a whole.
    allow_non_finite: convert NaN or infinite weights instead of refusing them.

  Returns:
    The converted Flax params.

  Raises:
    fileio.OutputError: `workdir` already holds files and `overwrite` is False (nothing is
      read or written), or it cannot be written.
    CheckpointFormatError, UnsafeCheckpointError, ValueError: the checkpoint is unreadable or
      does not match `config.model`; nothing is written.
  """
  workdir = Path(workdir)
  found = existing_run(workdir)
  if found and not overwrite:
    raise fileio.OutputError(
      f'workdir {workdir} already holds {", ".join(found[:6])}: converting would mix these '
      'weights with another run; choose a new --workdir or pass --overwrite to replace it'
    )
  if (workdir / '.lock').exists():
    # A training run's lock (`u2net_jax.run.workdir`): never pull a workdir from under a live run.
    raise fileio.OutputError(
      f'workdir {workdir} is locked by a run ({workdir / ".lock"}); wait for it to end (if '
      'that run is dead, delete the lock file)'
    )
  state_dict = load_torch_state_dict(checkpoint, allow_non_finite=allow_non_finite)
  params = torch_to_flax(state_dict, config.model)
  with fileio.atomic_dir(workdir) as tmp:
    config_utils.save_config(config, tmp)
    checkpointing.save_params(
      tmp,
      params,
      meta={'converted_from': str(Path(checkpoint).resolve())},
      allow_non_finite=allow_non_finite,
    )
  return params


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so that importing defines none)."""
  flags.DEFINE_string('checkpoint', None, 'Official .pth state-dict.')
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/wv3.py.')
  flags.DEFINE_string('workdir', None, 'Output workdir (must not hold a run, unless --overwrite).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing workdir (its runs and weights).')
  flags.DEFINE_bool('allow_non_finite', False, 'Convert NaN/infinite weights instead of refusing.')
  flags.mark_flags_as_required(['checkpoint', 'config', 'workdir'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter; the result is printed below.
  try:
    # The command-line overrides are applied by now: derive and validate the config once.
    config = config_utils.finalize(args.config)
    params = convert_to_workdir(
      args.checkpoint,
      config,
      args.workdir,
      overwrite=args.overwrite,
      allow_non_finite=args.allow_non_finite,
    )
  except (ValueError, OSError, UnsafeCheckpointError) as e:  # One line, no traceback.
    sys.exit(f'error: {e}')
  skipped = unused_keys(
    load_torch_state_dict(args.checkpoint, allow_non_finite=args.allow_non_finite), config.model
  )
  print(
    f'converted the official weights into {models.count_params(params):,} Flax parameters '
    f'in {args.workdir}'
  )
  print(f'skipped {len(skipped)} tensors the official forward pass never uses: {skipped}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
