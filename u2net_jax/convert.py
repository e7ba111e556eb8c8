"""The authors' PyTorch checkpoints -> Flax parameters, without torch.

`load_torch_state_dict` reads `.pth` files (the zip format of torch >= 1.6 and the legacy
format) with a restricted unpickler that rebuilds tensors and ordered dicts and nothing else:
a checkpoint that tries to run code is refused before anything runs.

`torch_to_flax` maps the official state-dict (`PSRben/U2Net`, `model/u2net.py`) onto the Flax
parameter tree of `models.create_model(config.model)` through a table of rules, checking a
one-to-one match of names and shapes. The same mapping converts gradients (they have the
state-dict's keys).

CLI (writes an orbax checkpoint and `config.json` in the layout training uses; any config field
can be overridden, e.g. `--config.model.attention=direct`):

  python -m u2net_jax.convert --checkpoint=u2net_wv3_200000_iter.pth \
      --config=configs/wv3.py --workdir=workdirs/official_wv3
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from u2net_jax import checkpointing, config_utils, models

# --------------------------------------------------------------------------------------------
# Reading .pth files.

_STORAGE_DTYPES = {
  'DoubleStorage': np.float64,
  'FloatStorage': np.float32,
  'HalfStorage': np.float16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeCheckpointError(pickle.UnpicklingError):
  """A checkpoint's pickle asked for something other than tensors and ordered dicts."""


class _StorageType:
  """Stand-in for `torch.FloatStorage` & co.: only carries the element dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_args):
  """Stand-in for `torch._utils._rebuild_tensor_v2`: a strided view copied into numpy."""
  itemsize = storage.dtype.itemsize
  if not size:
    return np.array(storage[storage_offset], copy=True)
  view = np.lib.stride_tricks.as_strided(
    storage[storage_offset:],
    shape=tuple(size),
    strides=tuple(s * itemsize for s in stride),
    writeable=False,
  )
  return np.array(view, copy=True)


def _rebuild_parameter(data, unused_requires_grad, unused_backward_hooks, *unused):
  return data


_SAFE_GLOBALS = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a state-dict needs; refuses everything else."""

  def __init__(self, file, load_storage, source: str):
    super().__init__(file)
    self._load_storage = load_storage
    self._source = source

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafeCheckpointError(
      f'{self._source}: refusing to load global {module}.{name}: a state-dict holds only '
      'tensors and ordered dicts (the file may try to run code; nothing was executed)'
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise UnsafeCheckpointError(f'{self._source}: unexpected persistent id {pid!r}')
    _, storage_type, key, _location, numel = pid[:5]
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f'{self._source}: unexpected storage type {storage_type!r}')
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def _load_zip(path: Path) -> dict:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl) != 1:
      raise ValueError(f'{path}: not a PyTorch zip checkpoint (no single data.pkl in {names[:5]})')
    prefix = pkl[0][: -len('data.pkl')]
    byteorder = 'little'
    if f'{prefix}byteorder' in names:
      byteorder = zf.read(f'{prefix}byteorder').decode().strip()
    cache: dict[str, np.ndarray] = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        raw = zf.read(f'{prefix}data/{key}')
        dt = dtype.newbyteorder('<' if byteorder == 'little' else '>')
        cache[key] = np.frombuffer(raw, dtype=dt, count=numel).astype(dtype, copy=False)
      return cache[key]

    return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage, str(path)).load()


def _load_legacy(path: Path) -> dict:
  """The pre-1.6 format: magic, protocol, sys info, the pickle, then the raw storages."""
  with open(path, 'rb') as f:
    blob = f.read()
  stream = io.BytesIO(blob)

  def plain_load():
    return _RestrictedUnpickler(stream, _no_storage, str(path)).load()

  if plain_load() != _LEGACY_MAGIC:
    raise ValueError(f'{path}: not a PyTorch checkpoint (neither zip nor legacy magic number)')
  plain_load()  # Protocol version.
  plain_load()  # System info.
  storages: dict[str, tuple[np.dtype, int, np.ndarray | None]] = {}

  def load_storage(key, dtype, numel):
    buf = np.zeros(numel, dtype)  # Filled in place once the raw data is read below.
    storages[key] = (dtype, numel, buf)
    return buf

  # Tensors are views of storages not read yet: rebuild them after filling the buffers.
  pending = []

  def deferred_rebuild(storage, offset, size, stride, *rest):
    pending.append((storage, offset, size, stride))
    return ('__tensor__', len(pending) - 1)

  unpickler = _RestrictedUnpickler(stream, load_storage, str(path))
  unpickler.find_class = lambda m, n: (
    deferred_rebuild
    if (m, n) == ('torch._utils', '_rebuild_tensor_v2')
    else _RestrictedUnpickler.find_class(unpickler, m, n)
  )
  result = unpickler.load()
  keys = plain_load()
  for key in keys:
    dtype, numel, buf = storages[str(key)]
    (count,) = np.frombuffer(stream.read(8), '<i8')
    data = np.frombuffer(stream.read(int(count) * dtype.itemsize), dtype.newbyteorder('<'))
    buf[:] = data[:numel]
  tensors = [_rebuild_tensor_v2(*args) for args in pending]

  def resolve(obj):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == '__tensor__':
      return tensors[obj[1]]
    if isinstance(obj, Mapping):
      return collections.OrderedDict((k, resolve(v)) for k, v in obj.items())
    return obj

  return resolve(result)


def _no_storage(*unused):
  raise UnsafeCheckpointError('storage outside the checkpoint body')


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a PyTorch `state_dict` file into numpy arrays without importing torch.

  Args:
    path: a `.pth` file saved by `torch.save(model.state_dict(), path)` (zip or legacy format).
      A dict wrapping the state-dict under 'state_dict' or 'model' is unwrapped.

  Returns:
    An ordered dict: state-dict key -> numpy array (the tensor's dtype and shape).

  Raises:
    UnsafeCheckpointError: the pickle references anything but tensors and ordered dicts.
    ValueError: the file is not a PyTorch checkpoint or holds no tensors.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  if isinstance(obj, Mapping):
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
  if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ValueError(f'{path}: expected a state-dict of tensors, found {type(obj).__name__}')
  return collections.OrderedDict(obj)


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


def convert_to_workdir(checkpoint: str | Path, config, workdir: str | Path) -> dict:
  """Converts `checkpoint` for `config.model` into an orbax checkpoint in `workdir`.

  Writes `workdir/config.json` (`config_utils.save_config`) and a step-0 checkpoint (params only)
  in `workdir/checkpoints`, the layout that training writes, so `evaluate.py --workdir` and
  `--config.init_from` accept it.

  Args:
    checkpoint: the official `.pth` state-dict.
    config: the full config (its `model` section must match the checkpoint).
    workdir: the output workdir.

  Returns:
    The converted Flax params.
  """
  params = torch_to_flax(load_torch_state_dict(checkpoint), config.model)
  config_utils.save_config(config, workdir)
  checkpointing.save_params(
    workdir, params, meta={'converted_from': str(Path(checkpoint).resolve())}
  )
  return params


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so that importing defines none)."""
  flags.DEFINE_string('checkpoint', None, 'Official .pth state-dict.')
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/wv3.py.')
  flags.DEFINE_string('workdir', None, 'Output workdir.')
  flags.mark_flags_as_required(['checkpoint', 'config', 'workdir'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax's INFO chatter; the result is printed below.
  try:
    # The command-line overrides are applied by now: derive and validate the config once.
    config = config_utils.finalize(args.config)
    skipped = unused_keys(load_torch_state_dict(args.checkpoint))
    params = convert_to_workdir(args.checkpoint, config, args.workdir)
  except (ValueError, OSError, UnsafeCheckpointError) as e:  # One line, no traceback.
    sys.exit(f'error: {e}')
  print(
    f'converted the official weights into {models.count_params(params):,} Flax parameters '
    f'in {args.workdir}'
  )
  print(f'skipped {len(skipped)} tensors the official forward pass never uses: {skipped}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
