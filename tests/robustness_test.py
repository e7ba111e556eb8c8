"""Hostile input and damaged state (issue 15): a catalogue of bad inputs, each refused clearly.

Every case asserts (1) the outcome (the project's own error type in-process, or the exit code of
a command line), (2) a message naming the culprit (the file, the tensor, the field or the flag,
and what was expected), and (3) that nothing was written or lost (no output, no temporary file,
an existing workdir untouched). Most cases run in-process (library calls and the CLIs' `main`);
a handful run the real command lines in subprocesses (slow). The `.pth` fuzz test flips bits in
and truncates the authors' real checkpoint: never a crash, never a success with other weights.
"""

import collections
import io
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, load_config, run_script, shared_path
from convert_test import _FakeTorch

from u2net_jax import convert
from u2net_jax.data import DataError, pancollection, prepare_cave, prepare_pansharpening
from u2net_jax.io import fileio, pth_reader
from u2net_jax.run import config_utils

WV3_PTH = ('official', 'u2net_wv3_200000_iter.pth')


def _files(folder: Path) -> list[str]:
  """Every file under `folder` (relative paths, sorted), for 'nothing was written' checks."""
  if not folder.exists():
    return []
  return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


# ----------------------------------------------------------------------------------------------
# Crafted .pth files: any storage / tensor geometry, as torch.save writes them.


def _pth(path, tensors, storages, *, legacy=False, byteorder=None, storage_bytes=None):
  """Writes a .pth whose pickle declares exactly the given geometry.

  Args:
    path: the output file.
    tensors: name -> (storage key, offset, size, stride).
    storages: key -> (storage type name, numel, data bytes).
    legacy: the pre-1.6 format instead of zip.
    byteorder: the zip's `byteorder` entry (None: absent).
    storage_bytes: key -> bytes actually stored (default: the declared data).
  """
  with _FakeTorch() as fake:
    torch = __import__('sys').modules['torch']
    for kind, _, _ in storages.values():
      if not hasattr(torch, kind):
        cls = type(kind, (), {'__module__': 'torch', '__qualname__': kind})
        setattr(torch, kind, cls)
        fake.storage_types[kind] = cls

    class Storage:
      def __init__(self, key):
        self.key = key

    class Tensor:
      def __init__(self, key, offset, size, stride):
        self.args = (Storage(key), offset, size, stride)

      def __reduce__(self):
        return (fake.rebuild, (*self.args, False, collections.OrderedDict()))

    def persistent_id(obj):
      if isinstance(obj, Storage):
        kind, numel, _ = storages[obj.key]
        return ('storage', fake.storage_types[kind], obj.key, 'cpu', numel)
      return None

    state = collections.OrderedDict((k, Tensor(*v)) for k, v in tensors.items())
    body = io.BytesIO()
    pickler = pickle.Pickler(body, protocol=2)
    pickler.persistent_id = persistent_id
    pickler.dump(state)
  data = {k: (storage_bytes or {}).get(k, v[2]) for k, v in storages.items()}
  if legacy:
    with open(path, 'wb') as f:
      for header in (0x1950A86A20F9469CFC6C, 1001, {'little_endian': byteorder != 'big'}):
        pickle.dump(header, f, protocol=2)
      f.write(body.getvalue())
      pickle.dump(list(storages), f, protocol=2)
      for k, (_, numel, _) in storages.items():
        f.write(np.array(numel, '>i8' if byteorder == 'big' else '<i8').tobytes())
        f.write(data[k])
    return path
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', body.getvalue())
    if byteorder is not None:
      zf.writestr('archive/byteorder', byteorder)
    for k, raw in data.items():
      zf.writestr(f'archive/data/{k}', raw)
  return path


_W = np.arange(12, dtype=np.float32)


def _one(offset=0, size=(3, 4), stride=(4, 1), numel=12, data=None, kind='FloatStorage', **kw):
  return (
    {'w': ('0', offset, size, stride)},
    {'0': (kind, numel, _W.tobytes() if data is None else data)},
    kw,
  )


# (id, tensors/storages/options, expected message). Each is refused with CheckpointFormatError.
PTH_CASES = [
  ('offset_beyond', _one(offset=5), r"reach element 16, beyond the storage's 12 elements"),
  ('size_beyond', _one(size=(4, 4)), r'size \(4, 4\).*beyond the storage'),
  ('stride_beyond', _one(stride=(5, 1)), r'stride \(5, 1\).*beyond the storage'),
  ('negative_offset', _one(offset=-1), r'negative offset -1'),
  ('negative_stride', _one(stride=(-4, 1)), r'negative offset 0, size \(3, 4\) or stride'),
  ('rank_mismatch', _one(stride=(4,)), r'size \(3, 4\) and stride \(4,\) do not match'),
  ('float_size', _one(size=(3.0, 4)), r'a size is 3.0, not an integer'),
  ('string_offset', _one(offset='0'), r"storage offset is '0', not an integer"),
  ('short_storage', _one(numel=12, data=_W[:6].tobytes()), r'holds 24 bytes; .* declares 48'),
  ('numel_lies_small', _one(numel=6, size=(2, 3), stride=(3, 1)), r'holds 48 bytes; .*24'),
  ('numel_lies_large', _one(numel=24, size=(2, 3), stride=(3, 1)), r'holds 48 bytes; .*96'),
  ('negative_numel', _one(numel=-1), r'has -1 elements'),
  ('bad_byteorder', _one(byteorder='middle'), r"byteorder says 'middle', not 'little' or 'big'"),
  ('complex_dtype', _one(kind='ComplexFloatStorage'), r'torch.ComplexFloatStorage are not supp'),
  (
    'huge_expanded',
    _one(size=(2**20, 2**20), stride=(0, 0)),
    r'declare 4,398,046,511,104 bytes',
  ),
  (
    'huge_declared',
    _one(numel=2**40, size=(2**20, 2**20), stride=(2**20, 1)),
    r'declare 4,398,046,511,104 bytes',
  ),
]


@pytest.mark.parametrize('case', PTH_CASES, ids=[c[0] for c in PTH_CASES])
def test_crafted_pth_is_refused_naming_the_tensor(tmp_path, case):
  _, (tensors, storages, kw), message = case
  path = _pth(tmp_path / 'w.pth', tensors, storages, **kw)
  with pytest.raises(pth_reader.CheckpointFormatError, match=message) as e:
    convert.load_torch_state_dict(path)
  assert str(path) in str(e.value)


@pytest.mark.parametrize('legacy', [False, True])
def test_big_endian_files_are_read_in_their_byte_order(tmp_path, legacy):
  data = _W.astype('>f4').tobytes()
  tensors, storages, _ = _one(data=data)
  path = _pth(tmp_path / 'w.pth', tensors, storages, legacy=legacy, byteorder='big')
  np.testing.assert_array_equal(convert.load_torch_state_dict(path)['w'], _W.reshape(3, 4))


def test_transposed_and_expanded_views_are_gathered_within_bounds(tmp_path):
  tensors = {'t': ('0', 1, (4, 2), (1, 4)), 'e': ('0', 11, (2, 3), (0, 0))}
  path = _pth(tmp_path / 'w.pth', tensors, {'0': ('FloatStorage', 12, _W.tobytes())})
  loaded = convert.load_torch_state_dict(path)
  np.testing.assert_array_equal(loaded['t'], _W[1:].reshape(-1)[np.add.outer(range(4), [0, 4])])
  np.testing.assert_array_equal(loaded['e'], np.full((2, 3), 11.0))


@pytest.mark.parametrize(
  'legacy,cut,message',
  [
    (True, 20, r'truncated|storage'),
    (True, 200, r'malformed pickle|not a PyTorch'),
    (False, 200, r'not a PyTorch|damaged'),
  ],
)
def test_truncated_pth_is_refused(tmp_path, legacy, cut, message):
  tensors, storages, _ = _one()
  path = _pth(tmp_path / 'w.pth', tensors, storages, legacy=legacy)
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) - cut] if cut < 100 else raw[:cut])
  with pytest.raises(pth_reader.CheckpointFormatError, match=message):
    convert.load_torch_state_dict(path)


def test_legacy_storage_count_that_lies_is_refused(tmp_path):
  tensors, storages, _ = _one()
  path = _pth(tmp_path / 'w.pth', tensors, storages, legacy=True)
  raw = bytearray(path.read_bytes())
  at = raw.rfind(np.int64(12).tobytes())
  raw[at : at + 8] = np.int64(13).tobytes()
  path.write_bytes(bytes(raw))
  with pytest.raises(pth_reader.CheckpointFormatError, match=r'holds 13 elements; .* 12'):
    convert.load_torch_state_dict(path)


@pytest.mark.parametrize(
  'payload,message',
  [
    (b'', r'not a PyTorch checkpoint'),
    (b'hello, I am a text file\n', r'not a PyTorch checkpoint'),
    (pickle.dumps([1, 2, 3], protocol=2), r'not a PyTorch checkpoint'),
    (b'PK\x03\x04' + b'\0' * 40, r'not a PyTorch checkpoint'),
  ],
  ids=['empty', 'text', 'plain_pickle', 'zip_magic_only'],
)
def test_files_that_are_no_checkpoint(tmp_path, payload, message):
  path = tmp_path / 'w.pth'
  path.write_bytes(payload)
  with pytest.raises(pth_reader.CheckpointFormatError, match=message):
    convert.load_torch_state_dict(path)


@pytest.mark.parametrize(
  'pkl,message',
  [
    (
      b'\x80\x02}q\x00',
      r'malformed pickle \(ValueError: pickle exhausted before seeing STOP',
    ),  # Truncated.
    (b'\x80\x02' + b'(' * 50000 + b'.', r'malformed pickle'),  # Only marks.
    (pickle.dumps({'w': 'not a tensor'}, protocol=2), r"entries that are not named tensors: \['w'"),
    (pickle.dumps([1, 2], protocol=2), r'expected a state-dict .* found list'),
    (pickle.dumps(bytearray(b'x'), protocol=5), r'opcode BYTEARRAY8, which a state-dict never'),
    (b'\x80\x02c__builtin__\neval\nq\x00.', r'refusing to load global __builtin__.eval'),
  ],
  ids=['truncated', 'marks', 'not_tensor', 'list', 'bytearray', 'eval'],
)
def test_malformed_pickles_are_one_clear_error(tmp_path, pkl, message):
  path = tmp_path / 'w.pth'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pkl)
  with pytest.raises((pth_reader.CheckpointFormatError, pth_reader.UnsafeCheckpointError)) as e:
    convert.load_torch_state_dict(path)
  assert e.match(message)


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
  path = tmp_path / 'bomb.pth'
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
    zf.writestr('archive/data.pkl', b'\0' * (pth_reader.MAX_PICKLE_BYTES + 1))
  assert path.stat().st_size < 200_000
  with pytest.raises(pth_reader.CheckpointFormatError, match=r'data.pkl declares 67,108,865'):
    convert.load_torch_state_dict(path)
  # A storage that inflates far beyond what the tensors need is refused by its declared size.
  monkeypatch.setattr(pth_reader, 'MAX_UNVIEWED_BYTES', 4096)  # 64 MiB by default.
  tensors, storages, _ = _one(numel=2048, data=b'\0' * 8192)
  with pytest.raises(pth_reader.CheckpointFormatError, match=r'but its tensors use 48'):
    convert.load_torch_state_dict(_pth(tmp_path / 'b2.pth', tensors, storages))


def test_a_flipped_bit_in_tensor_data_is_caught_by_the_zip_crc(tmp_path):
  tensors, storages, _ = _one()
  path = _pth(tmp_path / 'w.pth', tensors, storages)
  raw = bytearray(path.read_bytes())
  at = raw.find(_W.tobytes()) + 17
  raw[at] ^= 0x04  # Still a finite float: only the checksum can tell.
  path.write_bytes(bytes(raw))
  with pytest.raises(pth_reader.CheckpointFormatError, match=r'archive/data/0 is damaged.*CRC'):
    convert.load_torch_state_dict(path)


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
  w = _W.copy()
  w[[3, 7]] = [np.nan, np.inf]
  tensors, storages, _ = _one(data=w.tobytes())
  path = _pth(tmp_path / 'w.pth', tensors, storages)
  with pytest.raises(pth_reader.CheckpointFormatError, match=r'non-finite .* w \(2 of 12\)'):
    convert.load_torch_state_dict(path)
  assert np.isnan(convert.load_torch_state_dict(path, allow_non_finite=True)['w'][0, 3])


@pytest.mark.slow  # Imports torch (seconds).
def test_genuine_half_precision_torch_files_are_read(tmp_path):
  torch = pytest.importorskip('torch', reason='torch is not installed (not a project dependency)')
  w = torch.linspace(-2, 2, 12).reshape(3, 4)
  torch.save({'b': w.to(torch.bfloat16), 'h': w.half(), 't': w.T.contiguous().T}, tmp_path / 'w.pt')
  loaded = convert.load_torch_state_dict(tmp_path / 'w.pt')
  np.testing.assert_array_equal(loaded['b'].astype(np.float32), w.bfloat16().float().numpy())
  np.testing.assert_array_equal(loaded['h'], w.half().numpy())
  np.testing.assert_array_equal(loaded['t'], w.numpy())


def test_a_directory_or_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such checkpoint file'):
    convert.load_torch_state_dict(tmp_path)
  with pytest.raises(FileNotFoundError, match='no such checkpoint file'):
    convert.load_torch_state_dict(tmp_path / 'nope.pth')


# ----------------------------------------------------------------------------------------------
# The .pth fuzz test: the real official checkpoint, bit flips and truncations, in-process.


def _fuzz(raw: bytes, reference: dict, cases: int, seed: int) -> collections.Counter:
  rng = np.random.default_rng(seed)
  outcomes = collections.Counter()
  # Half the flips anywhere, half in the structure (pickle and headers at the start, the
  # central directory at the end), where a reader is most likely to trip.
  head, tail = 20_000, 16_000
  for i in range(cases):
    data = bytearray(raw)
    if i % 4 == 3:  # A truncation.
      data = data[: int(rng.integers(0, len(raw)))]
    else:
      region = i % 4
      lo, hi = [(0, len(raw)), (0, head), (len(raw) - tail, len(raw))][region]
      data[int(rng.integers(lo, hi))] ^= 1 << int(rng.integers(8))
    try:
      loaded = convert.load_torch_state_dict(io.BytesIO(bytes(data)))
    except (pth_reader.CheckpointFormatError, pth_reader.UnsafeCheckpointError) as e:
      assert '<checkpoint>' in str(e) or 'checkpoint' in str(e)
      outcomes['refused'] += 1
      continue
    # Loaded: only where the flip missed everything that defines the weights (zip padding,
    # the local header's copy of the CRC, ...): the weights must be exactly the original ones.
    assert list(loaded) == list(reference), f'case {i}: other tensor names'
    for k, v in reference.items():
      assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v), f'case {i}: {k} altered'
    outcomes['same weights'] += 1
  return outcomes


@pytest.mark.parametrize('cases', [400, pytest.param(2400, marks=pytest.mark.slow)])
def test_pth_fuzz_never_crashes_nor_alters_weights(cases):
  raw = shared_path(*WV3_PTH).read_bytes()
  reference = convert.load_torch_state_dict(io.BytesIO(raw))
  outcomes = _fuzz(raw, reference, cases, seed=cases)
  assert sum(outcomes.values()) == cases
  assert outcomes['refused'] > cases // 2, outcomes


# ----------------------------------------------------------------------------------------------
# convert --workdir: never mixes weights with another run.


def _tiny_pth(tmp_path, config, value: float, name='w.pth'):
  """A state-dict of the tiny config's model, every weight `value`, as a real .pth."""
  from flax import traverse_util
  from torch_layout import flax_to_torch

  shapes = convert.param_shapes(config.model)
  flat = {p: np.full(s, value, np.float32) for p, s in shapes.items()}
  state = flax_to_torch(traverse_util.unflatten_dict(flat, sep='/'))
  from convert_test import _write_pth

  _write_pth(tmp_path / name, state)
  return tmp_path / name


@pytest.mark.slow  # Orbax writes / the torch import: seconds.
def test_convert_refuses_an_existing_run_and_overwrite_replaces_it(tmp_path):
  from u2net_jax.run import checkpointing

  config = load_config('tiny')
  workdir = tmp_path / 'run'
  convert.convert_to_workdir(_tiny_pth(tmp_path, config, 0.25), config, workdir)
  before = {p: (workdir / p).read_bytes() for p in _files(workdir) if (workdir / p).is_file()}
  second = _tiny_pth(tmp_path, config, 0.5, 'second.pth')
  with pytest.raises(fileio.OutputError, match=r'run already holds checkpoints/, config.json'):
    convert.convert_to_workdir(second, config, workdir)
  after = {p: (workdir / p).read_bytes() for p in _files(workdir) if (workdir / p).is_file()}
  assert after == before  # Nothing lost, nothing mixed.
  convert.convert_to_workdir(second, config, workdir, overwrite=True)
  params, step, meta = checkpointing.restore_params(workdir, config.model)
  assert step == 0 and meta['converted_from'].endswith('second.pth')
  assert float(params['to_hrms1']['bias'][0]) == 0.5
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.run')]  # No leftovers.


def test_convert_refuses_a_locked_workdir_and_a_bad_checkpoint_writes_nothing(tmp_path):
  config = load_config('tiny')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / '.lock').write_text('{"host": "h", "pid": 1}')
  good = _tiny_pth(tmp_path, config, 0.25)
  with pytest.raises(fileio.OutputError, match=r'locked by a run'):
    convert.convert_to_workdir(good, config, workdir, overwrite=True)
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(good.read_bytes()[:-100])
  with pytest.raises(pth_reader.CheckpointFormatError):
    convert.convert_to_workdir(bad, config, tmp_path / 'new')
  assert not (tmp_path / 'new').exists()
  assert _files(tmp_path) == ['bad.pth', 'run', 'run/.lock', 'w.pth']


# ----------------------------------------------------------------------------------------------
# Configs: one validation pass at load, naming the field and what it may be.

CONFIG_CASES = [
  ('optimizer.learning_rate', -1.0, r'optimizer.learning_rate=-1 is not a finite number in \(0,'),
  ('optimizer.learning_rate', float('nan'), r'learning_rate=nan is not a finite number'),
  ('optimizer.decay_factor', 0.0, r'decay_factor=0 is not a finite number in \(0, 1\]'),
  ('optimizer.b2', 1.0, r'optimizer.b2=1 is not a finite number in \[0,'),
  ('optimizer.eps', 0.0, r'optimizer.eps=0 is not'),
  ('train.num_epochs', -3, r'train.num_epochs=-3 is not an integer in \[1, 1000000\]'),
  ('train.batch_size', 0, r'train.batch_size=0 is not an integer >= 1'),
  ('train.log_every_steps', 0, r'train.log_every_steps=0 is not an integer >= 1'),
  ('train.eval_every_epochs', 0, r'train.eval_every_epochs=0 is not an integer >= 1'),
  ('train.keep_checkpoints', 0, r'train.keep_checkpoints=0 is not an integer >= 1'),
  ('model.head_dim', 0, r'model.head_dim=0 is not an integer >= 1 \(or unset\)'),
  ('model.width', -8, r'model.width=-8 is not an integer >= 1'),
  ('model.spectral_bands', 0, r'model.spectral_bands=0 disagrees with data.sensor'),
  ('model.mlp_ratio', 0.0, r'model.mlp_ratio=0 is not a finite number in \(0, 64\]'),
  ('model.variant', 'bogus', r"model.variant='bogus' is not one of \('u2net',"),
  ('model.concat_residual', True, r"concat_residual=True does not apply to variant 'u2net'"),
  ('seed', 2**40, r'seed=1099511627776 is not an integer in \[0, 4294967295\]'),
  ('seed', -1, r'seed=-1 is not an integer in \[0,'),
  ('data.check_values', 'bogus', r"data.check_values='bogus' is not one of \('sample', 'full'"),
  ('data.source', 'bogus', r"data.source='bogus' is not one of \('hdf5', 'tfds', 'demo'\)"),
  ('data.read_threads', 0, r'data.read_threads=0 is not an integer in \[1, 256\]'),
  ('data.demo_size', 18, r'data.demo_size=18 is not a multiple of model.scale=4'),
  ('eval.tile_size', 0, r'eval.tile_size=0 is not an integer >= 1'),
  ('eval.tile_size', 66, r'eval.tile_size=66 and eval.tile_pad=4 are not multiples of model'),
  ('eval.mode', 'bogus', r"eval.mode='bogus' is not one of"),
  ('eval.error_max', -0.1, r'eval.error_max=-0.1 is not a finite number'),
]


@pytest.mark.parametrize('field,value,message', CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values_fail_at_load_naming_field_and_range(field, value, message):
  with pytest.raises(config_utils.ConfigError, match=message):
    load_config('tiny', **{field: value})


def test_a_config_arg_a_file_does_not_take_is_refused():
  with pytest.raises(config_utils.ConfigError, match=r'default.py:bogus: default.py takes no :arg'):
    config_utils.load_config_file(REPO / 'configs' / 'default.py:bogus')
  with pytest.raises(config_utils.ConfigError, match=r'takes no :arg'):
    config_utils.check_config_arg(f'{REPO / "configs" / "wv3.py"}:x')


def test_a_config_arg_outside_config_args_is_refused(tmp_path):
  (tmp_path / 'configs').mkdir()
  shutil.copy(REPO / 'configs' / 'tiny.py', tmp_path / 'configs' / 'mine.py')
  with open(tmp_path / 'configs' / 'mine.py', 'a') as f:
    f.write("\nCONFIG_ARGS = ('pansharpening', 'hisr')\n")
  spec = f'{tmp_path / "configs" / "mine.py"}:bogus'
  with pytest.raises(config_utils.ConfigError, match=r"'bogus' is not one of \('pansharpening'"):
    config_utils.check_config_arg(spec)
  config_utils.check_config_arg(spec.replace('bogus', 'hisr'))


def _stored(tmp_path, edit) -> Path:
  workdir = tmp_path / 'run'
  config_utils.save_config(load_config('tiny'), workdir)
  path = workdir / 'config.json'
  raw = json.loads(path.read_text())
  result = edit(raw)
  path.write_text(result if isinstance(result, str) else json.dumps(raw))
  return workdir


STORED_CASES = [
  ('invalid_json', lambda raw: '{"model": {', r'config.json is not valid JSON: .* line 1'),
  ('a_list', lambda raw: '[1, 2]', r'config.json holds a JSON list, not a config object'),
  ('no_model', lambda raw: raw.pop('model'), r"missing section\(s\) \['model'\]"),
  ('bad_variant', lambda raw: raw['model'].update(variant='v9'), r"model.variant='v9' is not"),
  ('tile_size_0', lambda raw: raw['eval'].update(tile_size=0), r'eval.tile_size=0 is not'),
  ('wrong_bands', lambda raw: raw['model'].update(spectral_bands=8), r'spectral_bands=8 disagr'),
  ('string_width', lambda raw: raw['model'].update(width='16'), r"model.width='16' is not an int"),
]


@pytest.mark.parametrize(
  'edit,message', [c[1:] for c in STORED_CASES], ids=[c[0] for c in STORED_CASES]
)
def test_a_broken_stored_config_is_one_clear_error(tmp_path, edit, message):
  workdir = _stored(tmp_path, edit)
  before = _files(workdir)
  with pytest.raises(config_utils.ConfigError, match=message) as e:
    config_utils.load_config(workdir)
  assert 'config.json' in str(e.value)
  assert _files(workdir) == before


def test_not_utf8_config_json(tmp_path):
  workdir = _stored(tmp_path, lambda raw: None)
  (workdir / 'config.json').write_bytes(b'\xff\xfe{')
  with pytest.raises(config_utils.ConfigError, match=r'config.json is not UTF-8'):
    config_utils.load_config(workdir)


def test_init_from_a_different_model_fails_before_any_restore(tmp_path):
  other = load_config('tiny', **{'model.width': 8})
  config_utils.save_config(other, tmp_path / 'other')
  config = load_config('tiny', init_from=str(tmp_path / 'other'))
  with pytest.raises(config_utils.ConfigError, match=r'another model .*model.width: 8 there, 16 h'):
    config_utils.check_init_from(config)
  with pytest.raises(config_utils.ConfigError, match=r"init_from='.*nowhere'.*not a u2net-jax"):
    config_utils.check_init_from(load_config('tiny', init_from=str(tmp_path / 'nowhere')))
  same = load_config('tiny', **{'model.attention': 'direct'})
  config_utils.save_config(same, tmp_path / 'same')
  config_utils.check_init_from(load_config('tiny', init_from=str(tmp_path / 'same')))


# ----------------------------------------------------------------------------------------------
# Data files: declared but unwritten examples, links.


def _h5(path, n_written=2, n_declared=2):
  rng = np.random.default_rng(0)
  with h5py.File(path, 'w') as f:
    for key, shape in (('gt', (4, 16, 16)), ('lms', (4, 16, 16)), ('ms', (4, 4, 4)),
                       ('pan', (1, 16, 16))):  # fmt: skip
      ds = f.create_dataset(key, shape=(n_declared, *shape), dtype=np.float32)
      ds[:n_written] = rng.uniform(10, 2000, (n_written, *shape))
  return path


def _source(path, mode='sample'):
  config = load_config('tiny', **{'data.check_values': mode})
  return pancollection.H5Source(
    path, keys=dict(config.data.h5_keys), spectral_bands=4, guide_bands=1,
    max_value=2047.0, check_values=mode,
  )  # fmt: skip


@pytest.mark.parametrize('mode', ['sample', 'full'])
def test_declared_but_unwritten_examples_are_refused(tmp_path, mode, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  path = _h5(tmp_path / 'part.h5', n_written=2, n_declared=8)
  with pytest.raises(DataError, match=r"part.h5: key '\w+' example [27] of 8 is all zeros"):
    _source(path, mode)
  _source(_h5(tmp_path / 'whole.h5'), mode)  # The complete file passes.


def test_external_and_broken_links_are_named(tmp_path):
  path = _h5(tmp_path / 'a.h5')
  with h5py.File(path, 'a') as f:
    del f['pan']
    f['pan'] = h5py.ExternalLink('elsewhere.h5', '/pan')
  with pytest.raises(DataError, match=r"a.h5: key 'pan' \(role 'guide'\) is an external link"):
    _source(path)
  with h5py.File(path, 'a') as f:
    del f['pan']
    f['pan'] = h5py.SoftLink('/nowhere')
  with pytest.raises(DataError, match=r"key 'pan' \(role 'guide'\) is a broken link"):
    _source(path)


def test_the_writer_refuses_generated_nan_or_blank_rows_and_leaves_nothing(tmp_path):
  for row, message in (
    (np.full((1, 4, 4), np.nan), 'NaN or infinite'),
    (np.zeros((1, 4, 4)), 'all zeros'),
  ):
    with pytest.raises(DataError, match=rf"generated row 1 of dataset 'gt' .*{message}"):
      with pancollection.H5Writer(tmp_path / 'x.h5', {'gt': (2, 1, 4, 4)}, check_values=True) as w:
        w.put(0, {'gt': np.ones((1, 4, 4))})
        w.put(1, {'gt': row})
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Preparers: bad flags and inputs -> status 2, a message naming the flag or file, nothing written.


@pytest.fixture
def pair(tmp_path):
  """A synthetic QB pair (PAN 64 x 64, MS 16 x 16 x 4 on the 11-bit scale) as .npy files."""
  rng = np.random.default_rng(0)
  np.save(tmp_path / 'pan.npy', rng.uniform(50, 2000, (64, 64)))
  np.save(tmp_path / 'ms.npy', rng.uniform(50, 2000, (16, 16, 4)))
  return tmp_path / 'pan.npy', tmp_path / 'ms.npy'


def _pan_main(tmp_path, pan, ms, *extra):
  out = tmp_path / 'out'
  args = ['--pan', str(pan), '--ms', str(ms), '--sensor', 'QB', '--out', str(out)]
  return prepare_pansharpening.main(args + ['--patch', '16', '--stride', '16', *extra]), out


PAN_FLAG_CASES = [
  (['--sensor', 'XYZ'], r"unknown sensor 'XYZ'; valid names are \['CAVE', 'GF2'"),
  (['--sensor', 'CAVE'], r'sensor CAVE is a hyperspectral dataset; use .*prepare_cave'),
  (['--patch', '0'], r'--patch=0 must be a positive multiple of 4'),
  (['--patch', '-8'], r'--patch=-8 must be a positive multiple of 4'),
  (['--stride', '0'], r'--stride=0 must be a positive multiple of 4'),
  (['--valid-fraction', '0'], r'--valid_fraction=0.0 must be strictly between 0 and 1'),
  (['--valid-fraction', '1.0'], r'--valid_fraction=1.0 must be strictly between 0 and 1'),
  (['--outputs', 'bogus'], r"unknown outputs \['bogus'\]"),
  (['--outputs', ''], r'--outputs=\[\] must be some of'),
]


@pytest.mark.parametrize(
  'extra,message', PAN_FLAG_CASES, ids=[' '.join(c[0]) for c in PAN_FLAG_CASES]
)
def test_prepare_pansharpening_bad_flags(tmp_path, pair, capsys, extra, message):
  status, out = _pan_main(tmp_path, *pair, *extra)
  err = capsys.readouterr().err
  assert status == 2 and err.startswith('error: ') and re.search(message, err), err
  assert _files(out) == []


def _bad_inputs(tmp_path):
  np.save(tmp_path / 'empty.npy', np.zeros((0, 4)))
  np.save(tmp_path / 'object.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
  (tmp_path / 'folder.npy').mkdir()
  (tmp_path / 'text.mat').write_text('not matlab')
  return {
    'empty': (tmp_path / 'empty.npy', r'empty.npy: the array is empty'),
    'object': (tmp_path / 'object.npy', r'object.npy: not a plain numeric .npy array'),
    'folder': (tmp_path / 'folder.npy', r'folder.npy: is a folder'),
    'text_mat': (tmp_path / 'text.mat', r'text.mat: not a readable MATLAB file'),
    'missing': (tmp_path / 'missing.npy', r'missing.npy: file not found'),
  }


@pytest.mark.parametrize('which', ['empty', 'object', 'folder', 'text_mat', 'missing'])
@pytest.mark.parametrize('role', ['pan', 'ms'])
def test_prepare_pansharpening_bad_input_files(tmp_path, pair, capsys, which, role):
  bad, message = _bad_inputs(tmp_path)[which]
  pan, ms = (bad, pair[1]) if role == 'pan' else (pair[0], bad)
  status, out = _pan_main(tmp_path, pan, ms)
  err = capsys.readouterr().err
  assert status == 2 and 'Traceback' not in err
  assert re.search(message, err), err
  assert _files(out) == []


def _cave(tmp_path):
  from data_test import _cave_folder

  src, _ = _cave_folder(tmp_path / 'raw')
  srf = shared_path('data', 'mhfnet-nikon-d700-srf', 'response_coefficient.mat')
  return src, srf


CAVE_FLAG_CASES = [
  (['--sigma', '0'], r'--sigma=0.0 must be a positive number'),
  (['--sigma', 'nan'], r'--sigma=nan must be a positive number'),
  (['--kernel-size', '0'], r'--kernel_size=0 must be a positive odd size'),
  (['--patch', '0'], r'--patch=0 must be a positive multiple of 4'),
  (['--stride', '0'], r'--stride=0 must be a positive multiple of 4'),
  (['--valid-fraction', '1.0'], r'--valid_fraction=1.0 must be strictly between'),
  (['--valid-fraction', '0.01'], r'leaves 12 for training and 0 for validation'),
]


@pytest.fixture(scope='module')
def cave_src(tmp_path_factory):
  return _cave(tmp_path_factory.mktemp('cave'))


@pytest.mark.parametrize(
  'extra,message', CAVE_FLAG_CASES, ids=[' '.join(c[0]) for c in CAVE_FLAG_CASES]
)
def test_prepare_cave_bad_flags(tmp_path, cave_src, capsys, extra, message):
  src, srf = cave_src
  out = tmp_path / 'out'
  args = ['--src', str(src), '--srf', str(srf), '--out', str(out), '--test-scenes', 'delta']
  status = prepare_cave.main(args + ['--patch', '32', '--stride', '16', '--grid', '2', *extra])
  err = capsys.readouterr().err
  assert status == 2 and re.search(message, err), err
  assert _files(out) == [] and 'nothing written' in err


def test_prepare_cave_bad_srf_and_truncated_png(tmp_path, cave_src, capsys):
  src, srf = cave_src
  (tmp_path / 'srf.csv').write_text('these,are\nnot,numbers\n')
  (tmp_path / 'srf_dir.npy').mkdir()
  np.save(tmp_path / 'srf0.npy', np.concatenate([np.ones((31, 2)), np.zeros((31, 1))], 1))
  cases = [
    (tmp_path / 'srf.csv', r'srf.csv: not a CSV of numbers'),
    (tmp_path / 'srf_dir.npy', r'srf_dir.npy: SRF is a folder'),
    (tmp_path / 'srf0.npy', r'srf0.npy: an SRF column is all zeros'),
  ]
  for bad, message in cases:
    out = tmp_path / f'out_{bad.stem}'
    args = ['--src', str(src), '--srf', str(bad), '--out', str(out), '--test-scenes', 'delta']
    assert prepare_cave.main(args + ['--patch', '32', '--stride', '16', '--grid', '2']) == 2
    assert re.search(message, capsys.readouterr().err)
    assert _files(out) == []
  broken = tmp_path / 'broken'
  shutil.copytree(src, broken)
  png = sorted((broken / 'bravo_ms').rglob('*.png'))[4]
  png.write_bytes(png.read_bytes()[:200])
  out = tmp_path / 'out_png'
  args = ['--src', str(broken), '--srf', str(srf), '--out', str(out), '--test-scenes', 'delta']
  assert prepare_cave.main(args + ['--patch', '32', '--stride', '16', '--grid', '2']) == 2
  assert re.search(rf'{png.name}: unreadable PNG band', capsys.readouterr().err)
  assert _files(out) == []
  assert not [p for p in tmp_path.rglob('*.tmp*')]


# ----------------------------------------------------------------------------------------------
# The real command lines (subprocesses): exit status, one line, no traceback, nothing written.


@pytest.mark.slow
def test_command_lines_turn_bad_input_into_one_line(tmp_path):
  tensors, storages, _ = _one(offset=5)
  bad_pth = _pth(tmp_path / 'bad.pth', tensors, storages)
  stored = _stored(tmp_path, lambda raw: raw['eval'].update(tile_size=0))
  runs = [
    (
      ['-m', 'u2net_jax.convert', f'--checkpoint={bad_pth}', '--config=configs/tiny.py',
       f'--workdir={tmp_path / "conv"}'],
      r'beyond the storage',
    ),
    (
      ['evaluate.py', f'--workdir={stored}'],
      r'eval.tile_size=0 is not an integer >= 1',
    ),
    (
      ['train.py', '--config=configs/tiny.py', '--config.optimizer.learning_rate=-1',
       f'--workdir={tmp_path / "train"}'],
      r'optimizer.learning_rate=-1 is not a finite number',
    ),
  ]  # fmt: skip
  for args, message in runs:
    result = run_script(*args)
    assert result.returncode == 1, (args, result.stderr[-2000:])
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert re.search(message, result.stderr), result.stderr[-2000:]
  assert not (tmp_path / 'conv').exists() and _files(tmp_path / 'train') == []


def test_legacy_format_fuzz_never_crashes(tmp_path):
  """The legacy format has no checksum (a flipped weight cannot be detected): no crash, though."""
  rng = np.random.default_rng(0)
  tensors = {'a': ('0', 0, (3, 4), (4, 1)), 'b': ('1', 2, (2, 2), (1, 2))}
  storages = {'0': ('FloatStorage', 12, _W.tobytes()), '1': ('DoubleStorage', 6, bytes(48))}
  raw = _pth(tmp_path / 'w.pth', tensors, storages, legacy=True).read_bytes()
  for i in range(300):
    data = bytearray(raw)
    if i % 3 == 2:
      data = data[: int(rng.integers(0, len(raw)))]
    else:
      data[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
    try:
      loaded = convert.load_torch_state_dict(io.BytesIO(bytes(data)), allow_non_finite=True)
    except (pth_reader.CheckpointFormatError, pth_reader.UnsafeCheckpointError):
      continue
    assert all(isinstance(v, np.ndarray) for v in loaded.values())
