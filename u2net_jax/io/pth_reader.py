"""Reads PyTorch `.pth` state-dicts into numpy without torch, trusting nothing in the file.

`load_torch_state_dict` reads the zip format of torch >= 1.6 and the legacy format. A `.pth` is a
pickle that names storages (flat typed buffers, stored separately) and tensors as strided views
of them. The file is treated as hostile:

- the pickle runs through a restricted unpickler that rebuilds ordered dicts, tensors and
  storages and nothing else: a checkpoint that asks for any other global is refused before
  anything runs (`UnsafeCheckpointError`);
- every tensor's geometry (storage offset, size, stride) is checked against its storage's element
  count, and every storage's element count (times the element size of its dtype) against the
  bytes actually present, before any array is built; arrays are built from validated byte ranges
  by numpy indexing (never `as_strided` or unchecked offsets), so no input can read outside a
  buffer;
- what is decompressed is capped by what the state-dict needs: the pickle at `MAX_PICKLE_BYTES`,
  each storage at exactly its declared size (the zip directory, the pickle and the tensors must
  agree), everything together at `max_bytes`;
- every zip entry read is checked against the CRC-32 stored in the zip, so a flipped bit in the
  tensor data or the pickle is an error, not a silently different weight (the legacy format has
  no checksum);
- the byte order is the one the file declares (`byteorder` entry / legacy `little_endian`);
- non-finite floating-point values are refused unless `allow_non_finite=True`.

Every problem raises `CheckpointFormatError` (a `ValueError`) or `UnsafeCheckpointError`, naming
the file and the tensor, storage or entry at fault; malformed pickles (truncated, too deep,
wrong types) are reported the same way instead of as `EOFError` or `RecursionError`.
Supported dtypes: float64/32/16, bfloat16 (via `ml_dtypes`), int64/32/16/8, uint8, bool.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
  'DoubleStorage': np.dtype(np.float64),
  'FloatStorage': np.dtype(np.float32),
  'HalfStorage': np.dtype(np.float16),
  'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
  'LongStorage': np.dtype(np.int64),
  'IntStorage': np.dtype(np.int32),
  'ShortStorage': np.dtype(np.int16),
  'CharStorage': np.dtype(np.int8),
  'ByteStorage': np.dtype(np.uint8),
  'BoolStorage': np.dtype(np.bool_),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# A U2Net state-dict's pickle is ~20 KB; anything near this is not a state-dict.
MAX_PICKLE_BYTES = 64 << 20
# All tensor data together (the official WV3 weights are 2.6 MB, HISR 10 MB).
MAX_BYTES = 1 << 30
# A storage may be larger than what its tensors view (torch saves whole storages), by this much.
MAX_UNVIEWED_BYTES = 64 << 20


class UnsafeCheckpointError(pickle.UnpicklingError):
  """A checkpoint's pickle asked for something other than tensors and ordered dicts."""


class CheckpointFormatError(ValueError):
  """A `.pth` file is malformed, damaged or inconsistent; the message names what and where."""


# What unpickling hostile bytes can raise besides our own errors.
_MALFORMED = (
  pickle.UnpicklingError, EOFError, RecursionError, MemoryError, ValueError, TypeError, KeyError,
  IndexError, AttributeError, OverflowError, UnicodeDecodeError,
)  # fmt: skip


class _Storage:
  """A storage named by the pickle: its dtype and element count (the bytes are read later)."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.viewed = 0  # Elements used by the tensors on it (the largest extent).
    self.data: np.ndarray | None = None


class _Tensor:
  """A validated strided view of a `_Storage`, built once the storage's bytes are read."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def build(self) -> np.ndarray:
    data = self.storage.data
    n = math.prod(self.size)
    if n == 0:
      return np.zeros(self.size, self.storage.dtype)
    c_strides = [math.prod(self.size[i + 1 :]) for i in range(len(self.size))]
    pairs = zip(self.size, self.stride, c_strides, strict=True)
    contiguous = all(st == c for sz, st, c in pairs if sz > 1)
    if contiguous:
      return data[self.offset : self.offset + n].reshape(self.size).copy()
    # Any other geometry (transposed, expanded): gather by explicit, bounds-checked indices.
    index = np.full((), self.offset, np.int64)
    for sz, st in zip(self.size, self.stride, strict=True):
      index = index[..., None] + np.arange(sz, dtype=np.int64) * st
    return data[index]


def _int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise CheckpointFormatError(f'{what} is {value!r}, not an integer')
  return value


# The globals of a checkpoint that pickles a whole `nn.Module` beside its state dict (the
# DLPan-Toolbox's APNN `.pth.tar`: a dict of 'model' (the module), 'model_state', 'loss1',
# 'train_params', 'optim_state'). They are never imported or called: each becomes `_Inert`, whose
# construction and `__setstate__` do nothing, so only the tensors and dicts are rebuilt.
_INERT_GLOBALS = frozenset(
  {
    ('torch.nn.modules.conv', 'Conv2d'),
    ('torch.nn.modules.activation', 'ReLU'),
    ('model_wv3', 'APNN'),  # The pickled class names of the four APNN releases.
    ('model', 'APNN'),
    ('model_qb', 'APNN'),
    ('model_wv4', 'APNN'),
    ('__builtin__', 'set'),
    ('builtins', 'set'),
    ('_codecs', 'encode'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
  }
)


class _Inert:
  """Stands for a pickled object that a state dict does not need: keeps nothing, runs nothing."""

  def __init__(self, *unused, **unused_kw):
    pass

  def __setstate__(self, unused):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a state-dict needs; refuses everything else."""

  def __init__(self, file: IO[bytes], source: str, storages: dict[str, _Storage] | None):
    super().__init__(file)
    self._source = source
    self._storages = storages  # None: no storage may appear (the legacy headers).

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return self._rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return ('storage type', name)
    if (module, name) in _INERT_GLOBALS:
      return _Inert
    if module == 'torch' and name.endswith('Storage'):
      raise CheckpointFormatError(
        f'{self._source}: tensors of type torch.{name} are not supported '
        f'(supported: {", ".join(_STORAGE_DTYPES)})'
      )
    raise UnsafeCheckpointError(
      f'{self._source}: refusing to load global {module}.{name}: a state-dict holds only '
      'tensors and ordered dicts (the file may try to run code; nothing was executed)'
    )

  def persistent_load(self, pid):
    if self._storages is None:
      raise UnsafeCheckpointError(f'{self._source}: a storage outside the checkpoint body')
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
      raise CheckpointFormatError(f'{self._source}: unexpected persistent id {pid!r:.200}')
    _, kind, key, _location, numel = pid[:5]
    if not (isinstance(kind, tuple) and kind[:1] == ('storage type',)):
      raise CheckpointFormatError(f'{self._source}: unexpected storage type {kind!r:.200}')
    if len(pid) > 5 and pid[5] is not None:  # Legacy storage views (torch < 0.4).
      raise CheckpointFormatError(f'{self._source}: storage views are not supported ({pid!r:.200})')
    key = str(key)
    numel = _int(numel, f'{self._source}: the element count of storage {key!r}')
    dtype = _STORAGE_DTYPES[kind[1]]
    if numel < 0:
      raise CheckpointFormatError(f'{self._source}: storage {key!r} has {numel} elements')
    known = self._storages.get(key)
    if known is None:
      known = self._storages[key] = _Storage(key, dtype, numel)
    elif (known.dtype, known.numel) != (dtype, numel):
      raise CheckpointFormatError(
        f'{self._source}: storage {key!r} is declared twice, as {known.numel} x {known.dtype} '
        f'and as {numel} x {dtype}'
      )
    return known

  def _rebuild_tensor(self, storage, offset, size, stride, *unused):
    where = f'{self._source}: a tensor on storage {getattr(storage, "key", "?")!r}'
    if not isinstance(storage, _Storage):
      raise CheckpointFormatError(f'{where}: its storage is {type(storage).__name__}')
    offset = _int(offset, f'{where}: the storage offset')
    if not isinstance(size, tuple | list) or not isinstance(stride, tuple | list):
      raise CheckpointFormatError(f'{where}: size {size!r:.100} / stride {stride!r:.100}')
    size = tuple(_int(s, f'{where}: a size') for s in size)
    stride = tuple(_int(s, f'{where}: a stride') for s in stride)
    if len(size) != len(stride) or len(size) > 32:
      raise CheckpointFormatError(f'{where}: size {size} and stride {stride} do not match')
    if offset < 0 or any(s < 0 for s in size + stride):
      raise CheckpointFormatError(f'{where}: negative offset {offset}, size {size} or stride')
    if math.prod(size) > 0:
      last = offset + sum((sz - 1) * st for sz, st in zip(size, stride, strict=True))
      if last >= storage.numel:
        raise CheckpointFormatError(
          f'{where}: offset {offset}, size {size}, stride {stride} reach element {last}, '
          f"beyond the storage's {storage.numel} elements"
        )
      storage.viewed = max(storage.viewed, last + 1)
    elif offset > storage.numel:
      raise CheckpointFormatError(f'{where}: offset {offset} beyond {storage.numel} elements')
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


# Opcodes a state-dict never uses and that reach odd corners of the C unpickler: protocol 5's
# out-of-band buffers and mutable byte arrays, and the copyreg extension registry.
_REFUSED_OPCODES = {'BYTEARRAY8', 'NEXT_BUFFER', 'READONLY_BUFFER', 'EXT1', 'EXT2', 'EXT4'}


def _check_opcodes(data: bytes, source: str) -> None:
  """Parses the pickle's opcodes (without running them) and refuses the unneeded ones."""
  try:
    for opcode, _, _ in pickletools.genops(data):
      if opcode.name in _REFUSED_OPCODES:
        raise CheckpointFormatError(
          f'{source}: the pickle uses opcode {opcode.name}, which a state-dict never needs'
        )
  except CheckpointFormatError:
    raise
  except _MALFORMED as e:
    raise CheckpointFormatError(
      f'{source}: malformed pickle ({type(e).__name__}: {str(e)[:200]})'
    ) from e


def _unpickle(data: bytes, source: str, storages: dict[str, _Storage] | None) -> Any:
  """Runs the restricted unpickler, reporting every malformed-pickle failure the same way."""
  _check_opcodes(data, source)
  try:
    return _RestrictedUnpickler(io.BytesIO(data), source, storages).load()
  except (UnsafeCheckpointError, CheckpointFormatError):
    raise
  except _MALFORMED as e:
    raise CheckpointFormatError(
      f'{source}: malformed pickle ({type(e).__name__}: {str(e)[:200]})'
    ) from e


def _state_dict(obj: Any, source: str) -> collections.OrderedDict:
  """The key -> `_Tensor` mapping inside the unpickled object.

  Unwraps 'state_dict', 'model' and 'model_state' (the APNN checkpoints keep the state dict there,
  beside a pickled module that `_Inert` stands for).
  """
  if isinstance(obj, Mapping):
    for wrapper in ('state_dict', 'model', 'model_state'):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointFormatError(
      f'{source}: expected a state-dict (a dict of tensors), found {type(obj).__name__}'
    )
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, _Tensor)]
  if bad:
    raise CheckpointFormatError(
      f'{source}: entries that are not named tensors: {[str(k)[:60] for k in bad[:5]]}'
    )
  return collections.OrderedDict(obj)


def _check_sizes(tensors: Mapping[str, _Tensor], source: str, max_bytes: int) -> list[_Storage]:
  """The storages the tensors use, after checking their sizes against the caps."""
  storages = list({id(t.storage): t.storage for t in tensors.values()}.values())
  total = 0
  for s in storages:
    nbytes, viewed = s.numel * s.dtype.itemsize, s.viewed * s.dtype.itemsize
    if nbytes - viewed > MAX_UNVIEWED_BYTES:
      raise CheckpointFormatError(
        f'{source}: storage {s.key!r} declares {nbytes:,} bytes but its tensors use {viewed:,}'
      )
    total += nbytes
  # The arrays built: a stride-0 (expanded) view can be far larger than its storage.
  built = sum(math.prod(t.size) * t.storage.dtype.itemsize for t in tensors.values())
  if max(total, built) > max_bytes:
    raise CheckpointFormatError(
      f'{source}: the tensors declare {max(total, built):,} bytes of data, more than the '
      f'{max_bytes:,} allowed (max_bytes)'
    )
  return storages


def _from_bytes(raw: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
  dtype = storage.dtype
  if dtype.itemsize > 1:
    dtype = dtype.newbyteorder('<' if byteorder == 'little' else '>')
  # The length was checked to be exactly numel * itemsize by the caller.
  return np.frombuffer(raw, dtype=dtype, count=storage.numel).astype(storage.dtype, copy=False)


def _read_entry(zf: zipfile.ZipFile, name: str, size: int, source: str) -> bytes:
  """Reads exactly `size` bytes of entry `name`, with the zip's CRC-32 verified."""
  try:
    info = zf.getinfo(name)
  except KeyError:
    raise CheckpointFormatError(f'{source}: entry {name} is missing') from None
  if info.file_size != size:
    raise CheckpointFormatError(
      f'{source}: entry {name} holds {info.file_size:,} bytes; the state-dict declares {size:,}'
    )
  try:
    with zf.open(info) as f:
      # zipfile yields at most the directory's size, compares the CRC-32 stored in the zip once
      # the entry's end is reached, and fails on a short entry: one read does all three.
      raw = f.read(size + 1)
  # RuntimeError: zipfile's "encrypted, password required" (a flipped flag bit).
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError,
          RuntimeError) as e:  # fmt: skip
    raise CheckpointFormatError(f'{source}: entry {name} is damaged ({e})') from e
  if len(raw) != size:
    raise CheckpointFormatError(f'{source}: entry {name} is not {size:,} bytes long')
  return raw


def _load_zip(zf: zipfile.ZipFile, source: str, max_bytes: int) -> collections.OrderedDict:
  names = zf.namelist()
  pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
  if len(pkl) != 1:
    raise CheckpointFormatError(
      f'{source}: not a PyTorch zip checkpoint (no single data.pkl in {names[:5]})'
    )
  prefix = pkl[0][: -len('data.pkl')]
  byteorder = 'little'
  if f'{prefix}byteorder' in names:
    info = zf.getinfo(f'{prefix}byteorder')
    raw = _read_entry(zf, info.filename, min(info.file_size, 16), source)
    byteorder = raw.decode('ascii', 'replace').strip()
    if byteorder not in ('little', 'big'):
      raise CheckpointFormatError(
        f"{source}: entry {prefix}byteorder says {byteorder!r}, not 'little' or 'big'"
      )
  pkl_size = zf.getinfo(pkl[0]).file_size
  if pkl_size > MAX_PICKLE_BYTES:
    raise CheckpointFormatError(
      f'{source}: {pkl[0]} declares {pkl_size:,} bytes; a state-dict pickle is far smaller'
    )
  storages: dict[str, _Storage] = {}
  obj = _unpickle(_read_entry(zf, pkl[0], pkl_size, source), source, storages)
  tensors = _state_dict(obj, source)
  for s in _check_sizes(tensors, source, max_bytes):
    raw = _read_entry(zf, f'{prefix}data/{s.key}', s.numel * s.dtype.itemsize, source)
    s.data = _from_bytes(raw, s, byteorder)
  return tensors


def _load_legacy(blob: bytes, source: str, max_bytes: int) -> collections.OrderedDict:
  """The pre-1.6 format: magic, protocol, sys info, the pickle, keys, then the raw storages."""
  stream = io.BytesIO(blob)

  def header():
    try:
      _check_opcodes(blob[stream.tell() :], source)
      return _RestrictedUnpickler(stream, source, None).load()
    except UnsafeCheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 (any unpickling failure of a header: not a .pth)
      why = str(e).removeprefix(f'{source}: ') if isinstance(e, CheckpointFormatError) else ''
      raise CheckpointFormatError(
        f'{source}: not a PyTorch checkpoint (neither zip nor legacy format: '
        f'{why or type(e).__name__})'
      ) from e

  if header() != _LEGACY_MAGIC:
    raise CheckpointFormatError(f'{source}: not a PyTorch checkpoint (neither zip nor legacy)')
  header()  # Protocol version.
  info = header()
  little = info.get('little_endian', True) if isinstance(info, dict) else True
  storages: dict[str, _Storage] = {}
  # The body is the rest of the stream: unpickle from there (the unpickler stops at STOP).
  _check_opcodes(blob[stream.tell() :], source)
  body = io.BytesIO(blob)
  body.seek(stream.tell())
  try:
    unpickler = _RestrictedUnpickler(body, source, storages)
    obj = unpickler.load()
  except (UnsafeCheckpointError, CheckpointFormatError):
    raise
  except Exception as e:  # noqa: BLE001 (same classification as `_unpickle`)
    raise CheckpointFormatError(f'{source}: malformed pickle ({type(e).__name__}: {e})') from e
  tensors = _state_dict(obj, source)
  needed = {id(s) for s in _check_sizes(tensors, source, max_bytes)}
  stream.seek(body.tell())
  keys = header()
  if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
    raise CheckpointFormatError(f'{source}: the storage list does not match the pickle')
  byteorder = 'little' if little else 'big'
  for key in map(str, keys):
    s = storages[key]
    head = stream.read(8)
    if len(head) != 8:
      raise CheckpointFormatError(f'{source}: truncated before storage {key!r}')
    count = int.from_bytes(head, byteorder, signed=True)
    if count != s.numel:
      raise CheckpointFormatError(
        f'{source}: storage {key!r} holds {count} elements; the pickle declares {s.numel}'
      )
    nbytes = s.numel * s.dtype.itemsize
    if id(s) not in needed:
      stream.seek(nbytes, io.SEEK_CUR)
      continue
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
      raise CheckpointFormatError(
        f'{source}: storage {key!r} is truncated ({len(raw):,} of {nbytes:,} bytes)'
      )
    s.data = _from_bytes(raw, s, byteorder)
  return tensors


def _check_finite(state: Mapping[str, np.ndarray], source: str) -> None:
  bad = []
  for key, value in state.items():
    if value.dtype == ml_dtypes.bfloat16:
      value = value.astype(np.float32)  # numpy's isfinite does not know bfloat16.
    if np.issubdtype(value.dtype, np.floating):
      count = int(value.size - np.count_nonzero(np.isfinite(value)))
      if count:
        bad.append(f'{key} ({count} of {value.size})')
  if bad:
    raise CheckpointFormatError(
      f'{source}: non-finite weights (NaN or infinite) in {len(bad)} tensors: '
      f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""} '
      '(allow_non_finite / --allow_non_finite to convert them anyway)'
    )


def load_torch_state_dict(
  path: str | Path | IO[bytes],
  *,
  allow_non_finite: bool = False,
  max_bytes: int = MAX_BYTES,
) -> dict[str, np.ndarray]:
  """Reads a PyTorch `state_dict` file into numpy arrays without importing torch.

  Args:
    path: a `.pth` file saved by `torch.save(model.state_dict(), path)` (zip or legacy format),
      or an open binary file. A dict wrapping the state-dict under 'state_dict' or 'model' is
      unwrapped.
    allow_non_finite: accept NaN or infinite floating-point values (refused by default).
    max_bytes: the most tensor data (all storages together) the file may declare.

  Returns:
    An ordered dict: state-dict key -> numpy array (the tensor's dtype and shape; bfloat16 as
    `ml_dtypes.bfloat16`), in native byte order.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle references anything but tensors and ordered dicts.
    CheckpointFormatError: the file is not a PyTorch checkpoint, is damaged (CRC-32, truncation),
      inconsistent (sizes, offsets, strides, element counts) or holds non-finite weights.
  """
  if isinstance(path, str | Path):
    source = str(path)
    if not Path(path).is_file():
      raise FileNotFoundError(f'{path}: no such checkpoint file')
    with open(path, 'rb') as f:
      return load_torch_state_dict(f, allow_non_finite=allow_non_finite, max_bytes=max_bytes)
  source = getattr(path, 'name', None) or '<checkpoint>'
  try:
    is_zip = zipfile.is_zipfile(path)
  except (zipfile.BadZipFile, OSError, ValueError, struct.error) as e:  # A damaged end record.
    raise CheckpointFormatError(f'{source}: damaged zip archive ({e})') from e
  if is_zip:
    path.seek(0)
    try:
      with zipfile.ZipFile(path) as zf:
        tensors = _load_zip(zf, source, max_bytes)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
      raise CheckpointFormatError(f'{source}: damaged zip archive ({e})') from e
    except (ValueError, OSError, OverflowError, struct.error) as e:  # zipfile's header checks.
      if isinstance(e, CheckpointFormatError | FileNotFoundError):
        raise
      raise CheckpointFormatError(f'{source}: damaged zip archive ({e})') from e
  else:
    path.seek(0)
    blob = path.read(max_bytes + MAX_PICKLE_BYTES + 1)
    tensors = _load_legacy(blob, source, max_bytes)
  state = collections.OrderedDict((k, t.build()) for k, t in tensors.items())
  if not allow_non_finite:
    _check_finite(state, source)
  return state
