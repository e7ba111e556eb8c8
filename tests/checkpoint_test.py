"""Checkpoint integrity: checksums, damaged steps (bit flip, truncation, deletion, missing items,
empty folders) and the fall back to the newest intact step; restores onto any topology."""

import logging
import shutil

import jax
import numpy as np
import pytest
from conftest import load_config

from u2net_jax import errors, models
from u2net_jax.run import checkpointing, sharding, train_lib


def _params(config, value: float):
  shapes = models.abstract_params(models.create_model(config.model))
  rng = np.random.default_rng(int(value))
  return jax.tree_util.tree_map(
    lambda s: (value + rng.standard_normal(s.shape)).astype(s.dtype), shapes
  )


def _save_training_steps(workdir, config, steps=(4, 8)):
  """Training-like checkpoints (params, Adam state, meta) without compiling anything."""
  manager = checkpointing.create_manager(workdir, keep=5, async_save=False)
  saved = {}
  for step in steps:
    params = _params(config, step)
    opt_state = train_lib.create_train_state(config, None, 4, params=params).opt_state
    meta = {'step': step, 'epoch': step / 4, 'data_position': step * 4, 'seed': 1}
    checkpointing.save(manager, step, params=params, opt_state=opt_state, meta=meta)
    saved[step] = params
  manager.wait_until_finished()
  manager.close()
  return saved


def _largest_data_file(workdir, step, item='params'):
  files = [p for p in (workdir / 'checkpoints' / str(step) / item).rglob('d/*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _flip_bit(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
  'bit_flip': lambda wd, step: _flip_bit(_largest_data_file(wd, step)),
  'truncation': lambda wd, step: _truncate(_largest_data_file(wd, step)),
  'deleted_data': lambda wd, step: _largest_data_file(wd, step).unlink(),
  'deleted_params': lambda wd, step: shutil.rmtree(wd / 'checkpoints' / str(step) / 'params'),
  'broken_meta': lambda wd, step: next(
    (wd / 'checkpoints' / str(step) / 'meta').glob('*metadata*')
  ).write_bytes(b'\xff\xfe{not json'),
}


def _same(a, b) -> bool:
  pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def _fast_first(cases, fast):
  # One case of each test stays in the quick subset; the others are slow-marked.
  return [c if c == fast else pytest.param(c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.parametrize('damage', _fast_first(sorted(DAMAGE), 'bit_flip'))
def test_evaluation_restore_falls_back_from_a_damaged_latest_step(tmp_path, damage, caplog):
  config = load_config()
  saved = _save_training_steps(tmp_path, config)
  DAMAGE[damage](tmp_path, 8)
  with caplog.at_level(logging.WARNING):
    params, step, meta = checkpointing.restore_params(tmp_path, config.model, which='latest')
  assert step == 4 and meta['step'] == 4 and 'checksums' not in meta
  assert _same(params, saved[4])
  assert 'Checkpoint step 8 is damaged' in caplog.text and str(tmp_path) in caplog.text
  # An explicit step is not replaced silently: the damage is named.
  with pytest.raises(errors.CheckpointError, match=r'checkpoints/8'):
    checkpointing.restore_params(tmp_path, config.model, step=8, fallback=False)


def test_bit_flip_is_caught_by_the_checksum(tmp_path):
  config = load_config()
  _save_training_steps(tmp_path, config, steps=(8,))
  DAMAGE['bit_flip'](tmp_path, 8)
  with pytest.raises(errors.CheckpointError, match=r"'params' arrays do not match their checksum"):
    checkpointing.restore_params(tmp_path, config.model, which='latest')


def test_no_intact_step_is_an_error_naming_each_damage(tmp_path):
  config = load_config()
  _save_training_steps(tmp_path, config)
  DAMAGE['bit_flip'](tmp_path, 8)
  DAMAGE['deleted_params'](tmp_path, 4)
  with pytest.raises(errors.CheckpointError, match='no intact checkpoint') as info:
    checkpointing.restore_params(tmp_path, config.model, which='latest')
  assert 'checkpoints/8' in str(info.value) and 'checkpoints/4' in str(info.value)
  assert isinstance(info.value, FileNotFoundError)  # What callers of restore_params expect.


def _resume(workdir, config):
  mesh = sharding.create_mesh()
  manager = checkpointing.create_manager(workdir, keep=5)
  try:
    return train_lib._restore_or_init(config, workdir, manager, 4, mesh)
  finally:
    manager.close()


@pytest.mark.parametrize(
  'damage',
  _fast_first(['bit_flip', 'truncation', 'missing_opt_state', 'empty_folder'], 'missing_opt_state'),
)
def test_resume_continues_from_the_previous_intact_step(tmp_path, damage, caplog):
  config = load_config()
  saved = _save_training_steps(tmp_path, config)
  latest, intact = 8, 4
  if damage == 'missing_opt_state':
    shutil.rmtree(tmp_path / 'checkpoints' / '8' / 'opt_state')
  elif damage == 'empty_folder':
    latest, intact = 12, 8
    (tmp_path / 'checkpoints' / '12').mkdir()
  else:
    DAMAGE[damage](tmp_path, 8)
  with caplog.at_level(logging.WARNING):
    state, meta = _resume(tmp_path, config)
  # Never step 0, never a fresh Adam state: the newest intact step.
  assert meta['step'] == intact and int(state.step) == intact
  assert _same(state.params, saved[intact])
  assert f'Checkpoint step {latest} is damaged' in caplog.text
  # Moved aside so that the step can be saved again by the resumed run.
  assert not (tmp_path / 'checkpoints' / str(latest)).exists()
  assert len(list((tmp_path / 'damaged_checkpoints').glob(f'{latest}-*'))) == 1


def test_resume_with_every_step_damaged_stops(tmp_path):
  config = load_config()
  _save_training_steps(tmp_path, config, steps=(4,))
  shutil.rmtree(tmp_path / 'checkpoints' / '4' / 'opt_state')
  with pytest.raises(
    errors.CheckpointError, match=r"(?s)no intact checkpoint.*'opt_state' is missing"
  ):
    _resume(tmp_path, config)


def test_converted_params_only_checkpoint_is_a_starting_point(tmp_path):
  config = load_config()
  params = _params(config, 3)
  checkpointing.save_params(tmp_path, params, step=0, meta={'converted_from': 'x.pth'})
  state, meta = _resume(tmp_path, config)
  assert meta == {} and int(state.step) == 0
  assert _same(state.params, params)


def test_non_finite_parameters_are_never_saved(tmp_path):
  config = load_config()
  params = _params(config, 1)
  leaves, tree = jax.tree_util.tree_flatten(params)
  leaves[3] = leaves[3].copy()
  leaves[3].flat[0] = np.nan
  manager = checkpointing.create_manager(tmp_path, async_save=False)
  with pytest.raises(errors.DivergedError, match='refusing to save step 5'):
    checkpointing.save(manager, 5, params=jax.tree_util.tree_unflatten(tree, leaves))
  manager.close()
  assert not (tmp_path / 'checkpoints' / '5').exists()


def test_restore_places_params_on_the_requested_devices(tmp_path):
  config = load_config()
  saved = _save_training_steps(tmp_path, config, steps=(4,))
  device = jax.local_devices()[-1]
  placement = jax.sharding.SingleDeviceSharding(device)
  params, _, _ = checkpointing.restore_params(tmp_path, config.model, placement=placement)
  assert all(x.devices() == {device} for x in jax.tree_util.tree_leaves(params))
  assert _same(params, saved[4])
