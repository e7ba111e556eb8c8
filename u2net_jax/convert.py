"""The authors' PyTorch checkpoints -> Flax parameters, without torch.

`load_torch_state_dict` (`pth_reader`) reads `.pth` files (the zip format of torch >= 1.6 and the
legacy format) with a restricted unpickler that rebuilds tensors and ordered dicts and nothing
else, and validates every tensor against the bytes present (see `pth_reader`).

`torch_to_flax` maps the official state-dict (`PSRben/U2Net`, `model/u2net.py`) onto the Flax
parameter tree of `models.create_model(config.model)` through a table of rules, checking a
one-to-one match of names and shapes. The same mapping converts gradients (they have the
state-dict's keys).

CLI (writes an orbax checkpoint and `config.json` in the layout training uses; any config field
can be overridden, e.g. `--config.model.attention=direct`; a workdir that already holds files is
refused unless `--overwrite`, which replaces it as a whole; NaN/infinite weights are refused
unless `--allow_non_finite`):

  python -m u2net_jax.convert --checkpoint=u2net_wv3_200000_iter.pth \
      --config=configs/wv3.py --workdir=workdirs/official_wv3
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from u2net_jax import checkpointing, config_utils, fileio, models
from u2net_jax.pth_reader import (  # noqa: F401 (re-exported: the reader's public API)
  CheckpointFormatError,
  UnsafeCheckpointError,
  load_torch_state_dict,
)

# --------------------------------------------------------------------------------------------
# Official state-dict <-> Flax parameters.


# Layout changes, as the axes argument of `np.transpose(torch_array, axes)` giving the Flax array
# (None: unchanged). Conv kernels OIHW -> HWIO (depth-wise (C, 1, 3, 3) -> (3, 3, 1, C) by the
# same rule), transposed convolutions IOHW -> HWIO, Linear (out, in) -> (in, out).
CONV = (2, 3, 1, 0)
CONV_TRANSPOSE = (2, 3, 0, 1)
LINEAR = (1, 0)


# (regex on the Flax path 'a/b/c', template of the torch key). Order matters: first match wins.
# A LayerNorm's `weight` is Flax's `scale`.
_RULES: list[tuple[str, str]] = [
  (r'upsample/conv/kernel', 'upsample.upsamle.0.weight'),  # The official key's typo.
  (r'raise_ms_dim/(kernel|bias)', 'raise_ms_dim.0.{p}'),
  (r'raise_guide_dim/(kernel|bias)', 'raise_pan_dim.0.{p}'),
  (r'to_hrms0/(kernel|bias)', 'to_hrms.0.{p}'),
  (r'to_hrms1/(kernel|bias)', 'to_hrms.2.{p}'),
  (r's2block(\d)/attn_norm/(scale|bias)', 's2block{0}.layers.0.0.fn.norm.{p}'),
  (r's2block(\d)/attention/(sa1|sa2|se1|se2)/kernel', 's2block{0}.layers.0.0.fn.fn.{1}.weight'),
  (r's2block(\d)/attention/to_out/(kernel|bias)', 's2block{0}.layers.0.0.fn.fn.to_out.0.{p}'),
  (r's2block(\d)/mlp_norm/(scale|bias)', 's2block{0}.layers.0.1.fn.norm.{p}'),
  (r's2block(\d)/mlp/fc1/(kernel|bias)', 's2block{0}.layers.0.1.fn.fn.net.0.{p}'),
  (r's2block(\d)/mlp/fc2/(kernel|bias)', 's2block{0}.layers.0.1.fn.fn.net.3.{p}'),
  (r'down(\d)/conv0/(kernel|bias)', 'down{0}.conv.0.{p}'),
  (r'down(\d)/conv1/(kernel|bias)', 'down{0}.conv.2.{p}'),
  (r'down(\d)/conv2/(kernel|bias)', 'down{0}.conv.3.{p}'),
  (r'resblock(\d)/(conv0|conv1)/(kernel|bias)', 'resblock{0}.{1}.{p}'),
  # The level-2/3 Up modules are `up0`/`up1`; inside each, the branch used is also `up1`.
  (r'up(\d)/up/(kernel|bias)', 'up{0}.up1.0.{p}'),
  (r'up(\d)/conv/(kernel|bias)', 'up{0}.conv.{p}'),
]

# Tensors of modules the official model builds but never calls.
UNUSED_PATTERNS = (r'down\d\.maxpool_conv\.', r'up\d\.up0\.')

_TORCH_PARAM_NAME = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def torch_key(flax_path: str) -> tuple[str, tuple[int, ...] | None]:
  """The official state-dict key of a Flax parameter path, and the layout change.

  Args:
    flax_path: e.g. 's2block0/attention/sa1/kernel'.

  Returns:
    (torch key, axes): the Flax array is `np.transpose(torch_array, axes)` (`CONV`,
    `CONV_TRANSPOSE`, `LINEAR`), or the torch array itself when axes is None.

  Raises:
    KeyError: no rule matches the path.
  """
  for pattern, template in _RULES:
    m = re.fullmatch(pattern, flax_path)
    if m:
      leaf = flax_path.rsplit('/', 1)[1]
      key = template.format(*m.groups(), p=_TORCH_PARAM_NAME[leaf])
      if leaf != 'kernel':
        return key, None
      if '/up/' in flax_path:
        return key, CONV_TRANSPOSE
      if '/attention/' in flax_path or '/mlp/' in flax_path:
        return key, LINEAR
      return key, CONV
  raise KeyError(f'no conversion rule for Flax parameter {flax_path!r}')


def param_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """Flat Flax parameter path 'a/b/c' -> shape for `models.create_model(model_config)`.

  No computation: the shapes come from `models.abstract_params`.
  """
  abstract = models.abstract_params(models.create_model(model_config))
  flat = traverse_util.flatten_dict(abstract, sep='/')
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def torch_to_flax(state_dict: Mapping[str, np.ndarray], model_config) -> dict:
  """Maps an official U2Net state-dict (or a dict of its gradients) onto Flax parameters.

  Args:
    state_dict: official key -> array, e.g. from `load_torch_state_dict`.
    model_config: `config.model` (a ConfigDict or mapping of `models.U2Net` fields).

  Returns:
    The nested Flax 'params' tree (float32 numpy arrays).

  Raises:
    ValueError: a tensor is missing, has the wrong shape, or is neither used nor a known unused
      tensor; the message names the tensor, the expected and the found shape.
  """
  shapes = param_shapes(model_config)
  flat, used, errors = {}, set(), []
  for path, shape in shapes.items():
    key, axes = torch_key(path)
    if key not in state_dict:
      errors.append(f'missing tensor {key!r} (for {path}, Flax shape {shape})')
      continue
    value = np.asarray(state_dict[key])
    value = value if axes is None else np.transpose(value, axes)
    if tuple(value.shape) != shape:
      # The torch layout of the expected shape: the inverse permutation of `axes`.
      expected = shape if axes is None else tuple(shape[i] for i in np.argsort(axes))
      errors.append(
        f'tensor {key!r} has shape {tuple(np.shape(state_dict[key]))}; the model config expects '
        f'{expected} (Flax {path} {shape})'
      )
      continue
    flat[path] = np.asarray(value, np.float32)
    used.add(key)
  unknown = [
    k for k in state_dict if k not in used and not any(re.match(p, k) for p in UNUSED_PATTERNS)
  ]
  if unknown:
    errors.append(f'unexpected tensors not used by the model: {unknown}')
  if errors:
    raise ValueError(
      'the checkpoint does not match the model config '
      f'{dict(model_config)}:\n  ' + '\n  '.join(errors)
    )
  return traverse_util.unflatten_dict(flat, sep='/')


def unused_keys(state_dict: Mapping[str, np.ndarray]) -> list[str]:
  """The official tensors that the forward pass never uses (`maxpool_conv`, `up0`)."""
  return [k for k in state_dict if any(re.match(p, k) for p in UNUSED_PATTERNS)]


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
    # A training run's lock (`u2net_jax.workdir`): never pull a workdir from under a live run.
    raise fileio.OutputError(
      f'workdir {workdir} is locked by a run ({workdir / ".lock"}); wait for it to end (if '
      'that run is dead, delete the lock file)'
    )
  state_dict = load_torch_state_dict(checkpoint, allow_non_finite=allow_non_finite)
  params = torch_to_flax(state_dict, config.model)
  with fileio.atomic_dir(workdir) as tmp:
    config_utils.save_config(config, tmp)
    checkpointing.save_params(tmp, params, meta={'converted_from': str(Path(checkpoint).resolve())})
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
    load_torch_state_dict(args.checkpoint, allow_non_finite=args.allow_non_finite)
  )
  print(
    f'converted the official weights into {models.count_params(params):,} Flax parameters '
    f'in {args.workdir}'
  )
  print(f'skipped {len(skipped)} tensors the official forward pass never uses: {skipped}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
