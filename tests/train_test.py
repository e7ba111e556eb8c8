"""Tests of training: the recipe, resumption after a kill, data parallelism, official gradients."""

import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, run_script, script_env, shared_path
from flax import traverse_util

from u2net_jax import convert, metrics, models
from u2net_jax.data import input_pipeline
from u2net_jax.io import fileio
from u2net_jax.run import checkpointing, config_utils, losses, sharding, train_lib


def _run_train(workdir, *flags, config='configs/tiny.py', **kwargs):
  return run_script('train.py', f'--config={config}', f'--workdir={workdir}', *flags, **kwargs)


def _final_params(workdir):
  config = config_utils.load_config(workdir)
  params, step, _ = checkpointing.restore_params(workdir, config.model, which='latest')
  return params, step


def _jsonl(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _four_device_mesh():
  # The check only reads the mesh's shape: an abstract mesh stands for 4 devices on 1 CPU.
  return jax.sharding.AbstractMesh((4,), (sharding.BATCH_AXIS,))


# ----------------------------------------------------------------------------------------------
# Fast: the recipe, the configs and the errors raised before any compilation.


def test_learning_rate_halves_at_epoch_boundaries():
  config = load_config('wv3')
  lr = train_lib.create_learning_rate_fn(config, steps_per_epoch=7)
  assert float(lr(0)) == pytest.approx(1e-3)
  assert float(lr(100 * 7 - 1)) == pytest.approx(1e-3)
  assert float(lr(100 * 7)) == pytest.approx(5e-4)
  assert float(lr(200 * 7 - 1)) == pytest.approx(5e-4)
  assert float(lr(200 * 7)) == pytest.approx(2.5e-4)
  cave = train_lib.create_learning_rate_fn(load_config('cave'), steps_per_epoch=3)
  assert float(cave(50 * 3 - 1)) == pytest.approx(3e-4)
  assert float(cave(50 * 3)) == pytest.approx(1.5e-4)


def test_paper_recipes_in_configs():
  wv3, cave = load_config('wv3'), load_config('cave')
  assert (wv3.train.batch_size, wv3.train.num_epochs, wv3.optimizer.learning_rate) == (
    16,
    360,
    1e-3,
  )
  assert (wv3.train.eval_every_epochs, wv3.train.checkpoint_every_epochs) == (10, 50)
  assert (cave.train.batch_size, cave.train.num_epochs) == (8, 500)
  assert models.create_model(cave.model).width == 64  # The official width for an RGB guide.
  assert cave.optimizer.learning_rate == 3e-4


def test_plan_converts_epochs_to_steps_once():
  plan = train_lib.Plan.create(load_config('tiny'), steps_per_epoch=4)
  assert (plan.total_steps, plan.eval_every, plan.ckpt_every, plan.log_every) == (16, 8, 4, 1)
  assert [s for s in range(1, 17) if plan.at_eval(s)] == [8, 16]
  assert [s for s in range(1, 17) if plan.at_ckpt(s)] == [4, 8, 12, 16]


def test_unwritable_workdir_fails_before_training(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(fileio.OutputError, match='not writable'):
    train_lib.train_and_evaluate(load_config(), blocker / 'run')


def test_missing_data_says_how_to_prepare_it(tmp_path):
  config = load_config('wv3', **{'data.train_file': str(tmp_path / 'nope.h5')})
  run_dir = tmp_path / 'run'
  with pytest.raises(Exception, match='prepare_pansharpening') as info:
    train_lib.train_and_evaluate(config, run_dir)
  assert str(tmp_path / 'nope.h5') in str(info.value)


def test_train_and_evaluate_finalizes_a_raw_config(tmp_path):
  from configs import tiny  # A notebook's config: get_config() itself, never finalized.

  config = tiny.get_config()
  config.data.max_value = 1023.0  # The tiny config's sensor, QB, is 11-bit (2047).
  with pytest.raises(config_utils.ConfigError, match=r'data.max_value=1023.* disagrees'):
    train_lib.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()  # Rejected before anything is written.


def test_global_batch_must_divide_over_devices():
  mesh = _four_device_mesh()
  with pytest.raises(ValueError, match=r'batch_size=6 does not divide over the 4 devices'):
    sharding.check_batch_divides(6, mesh, 'config.train.batch_size')
  sharding.check_batch_divides(8, mesh, 'config.train.batch_size')


def test_checkpoint_selection_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*convert'):
    checkpointing.select_step(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    checkpointing.restore_params(tmp_path / 'empty', load_config().model)


def test_restore_params_restores_the_step_select_step_chose(tmp_path):
  config = load_config()
  model = models.create_model(config.model)
  # Distinct, recognisable parameters per step without compiling an initialisation.
  shapes = models.abstract_params(model)
  for step in (3, 7):
    params = jax.tree_util.tree_map(lambda s, v=step: np.full(s.shape, v, s.dtype), shapes)
    checkpointing.save_params(tmp_path, params, step=step, meta={'origin': 'test'})
  assert checkpointing.select_step(tmp_path, which='latest') == 7
  assert checkpointing.select_step(tmp_path) == 7  # No validated step: the latest.
  step = checkpointing.select_step(tmp_path, step=3)
  restored = checkpointing.restore_params(tmp_path, config.model, step=step)
  params, got_step, meta = restored  # Unpacks as before the named tuple.
  assert got_step == restored.step == 3 and meta == {'origin': 'test', 'step': 3}
  leaves = jax.tree_util.tree_leaves(params)
  assert len(leaves) == len(jax.tree_util.tree_leaves(shapes))
  assert all(np.all(np.asarray(x) == 3) for x in leaves)
  with pytest.raises(FileNotFoundError, match=r'has no step 5; available: \[3, 7\]'):
    checkpointing.restore_params(tmp_path, config.model, step=5)


# ----------------------------------------------------------------------------------------------
# Slow: official gradients, training runs, subprocesses.


@pytest.mark.slow
def test_training_fidelity_official_loss_and_gradients():
  """At the released weights, loss and gradients equal the official code's on real WV2 tiles.

  The loss is compared in float32, the training precision. The gradients are compared in
  float64: the L1 loss's gradient is sign(out - gt) / n, which float32 rounding (~1e-6 per
  pixel, differently in XLA and PyTorch) flips wherever |out - gt| is that small, moving the
  small-norm gradients of a few tensors by ~5e-4 relative on some CPUs. The reference itself is
  float32 PyTorch, within 6e-6 of PyTorch float64 on every tensor (checked with the official
  code), so float64 here leaves only the reference's own rounding.
  """
  ref = np.load(shared_path('official', 'official_grad_wv3.npz'))
  state_dict = convert.load_torch_state_dict(shared_path('official', 'u2net_wv3_200000_iter.pth'))
  config = load_config('wv3')
  params = convert.torch_to_flax(state_dict, config.model)
  batch = {k: jnp.asarray(ref[k].transpose(0, 2, 3, 1)) for k in ('ms', 'pan', 'gt')}
  batch['guide'] = batch.pop('pan')
  loss_and_grads = jax.jit(jax.value_and_grad(losses.l1_loss), static_argnums=1)
  loss, _ = loss_and_grads(params, models.BatchApply(models.create_model(config.model)), batch)
  assert abs(float(loss) - float(ref['loss'])) <= 1e-6
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    model = models.create_model(config.model, dtype='float64')
    loss64, grads = loss_and_grads(to64(params), models.BatchApply(model), to64(batch))
    grads = jax.device_get(grads)
  assert abs(float(loss64) - float(ref['loss'])) <= 1e-6
  official = {k[len('grad/') :]: ref[k] for k in ref.files if k.startswith('grad/')}
  expected = convert.torch_to_flax(official, config.model)
  flat_ours = traverse_util.flatten_dict(grads, sep='/')
  flat_ref = traverse_util.flatten_dict(expected, sep='/')
  assert flat_ours.keys() == flat_ref.keys()
  worst = max(
    np.linalg.norm(flat_ours[k] - flat_ref[k]) / max(np.linalg.norm(flat_ref[k]), 1e-30)
    for k in flat_ref
  )
  assert worst <= 2e-4, worst


@pytest.mark.slow
def test_train_end_to_end_writes_everything(tmp_path):
  workdir = tmp_path / 'run'
  summary = train_lib.train_and_evaluate(load_config(), workdir)
  assert summary['step'] == 16  # 4 epochs x (16 examples // 4).
  assert (workdir / 'config.json').is_file()
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  rows = _jsonl(workdir)
  assert [r['step'] for r in rows if 'train_loss' in r] == list(range(1, 17))
  assert [r['step'] for r in rows if 'valid_loss' in r] == [8, 16]
  for key in ('valid_psnr', 'valid_sam', 'valid_ergas'):
    assert np.isfinite(rows[-1][key])
  lrs = [r['learning_rate'] for r in rows if 'learning_rate' in r]
  assert lrs[7] == pytest.approx(1e-3) and lrs[8] == pytest.approx(5e-4)  # Halved at epoch 2.
  steps = checkpointing.create_manager(workdir, read_only=True).all_steps()
  assert 16 in steps and len(steps) <= 3  # The last 2 and the best.
  assert checkpointing.select_step(workdir) in (8, 16)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  env = script_env(cache_dir=tmp_path / 'jax_cache')
  flags = ['--config.train.num_epochs=8']
  full = _run_train(tmp_path / 'full', *flags, env=env)
  assert full.returncode == 0, full.stdout + full.stderr

  killed_dir = tmp_path / 'killed'
  proc = _run_train(killed_dir, *flags, env=env, wait=False, log=tmp_path / 'killed.log')
  ckpt = killed_dir / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (ckpt / '12' / 'commit_success.txt').exists() or (ckpt / '12' / 'params').exists():
      break
    time.sleep(0.05)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  interrupted_step = checkpointing.create_manager(killed_dir, read_only=True).latest_step()
  assert interrupted_step is not None and interrupted_step < 32

  resumed = _run_train(killed_dir, *flags, env=env)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert 'Resumed from' in resumed.stdout + resumed.stderr
  (a, step_a), (b, step_b) = _final_params(tmp_path / 'full'), _final_params(killed_dir)
  assert step_a == step_b == 32
  diff = jax.tree_util.tree_map(lambda x, y: float(np.abs(x - y).max()), a, b)
  assert max(jax.tree_util.tree_leaves(diff)) <= 1e-6


@pytest.mark.slow
def test_four_devices_and_one_give_the_same_loss_curve(tmp_path):
  curves = {}
  xla_flags = script_env()['XLA_FLAGS']
  for n in (1, 4):
    env = script_env({'XLA_FLAGS': f'{xla_flags} --xla_force_host_platform_device_count={n}'})
    run = _run_train(tmp_path / f'dev{n}', '--config.train.num_epochs=2', env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f'{n} devices' in run.stderr
    curves[n] = [r['train_loss'] for r in _jsonl(tmp_path / f'dev{n}') if 'train_loss' in r]
  assert len(curves[1]) == 8
  np.testing.assert_allclose(curves[4], curves[1], atol=1e-5, rtol=0)
  # A global batch that does not split over the 4 devices: one line naming the flag, no traceback.
  odd = _run_train(tmp_path / 'odd', '--config.train.batch_size=6', env=env)
  assert odd.returncode != 0
  assert 'batch_size=6 does not divide over the 4 devices' in odd.stderr
  assert 'Traceback' not in odd.stderr


@pytest.mark.slow
def test_fine_tuning_starts_from_converted_weights(tmp_path):
  pth = shared_path('official', 'u2net_wv3_200000_iter.pth')
  official = tmp_path / 'official'
  params = convert.convert_to_workdir(pth, load_config('wv3'), official)
  config = load_config(
    'tiny',
    **{
      'model.spectral_bands': 8,
      'model.width': 32,
      'model.head_dim': 16,
      'data.sensor': 'WV3',
      'train.num_epochs': 1,
      'train.eval_every_epochs': 1,
      'init_from': str(official),
    },
  )
  workdir = tmp_path / 'finetune'
  train_lib.train_and_evaluate(config, workdir)
  source = input_pipeline.get_source(config, 'train')
  mesh = sharding.create_mesh()
  first = next(input_pipeline.train_batches(config, source, mesh=mesh, start_step=0))
  model = models.create_model(config.model)
  expected = float(losses.l1_loss(params, models.BatchApply(model), first))
  assert _jsonl(workdir)[0]['train_loss'] == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_config_errors_stop_train_py(tmp_path):
  run = _run_train(tmp_path / 'typo', '--config.train.num_epoch=3')
  assert run.returncode != 0
  assert 'num_epoch' in run.stderr
  # A known field with a value the sensor contradicts: train.py finalizes the flags' config.
  run = _run_train(tmp_path / 'scale', '--config.data.max_value=1023')
  assert run.returncode != 0 and 'Traceback' not in run.stderr
  assert 'data.max_value=1023' in run.stderr and 'disagrees' in run.stderr
  assert not (tmp_path / 'scale').exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  train_lib.train_and_evaluate(load_config(**{'train.num_epochs': 1}), workdir)
  good, good_step = _final_params(workdir)
  # Fault injection: a loss that is NaN from the resumed run's first step on.
  loss_fn = losses.l1_loss
  monkeypatch.setattr(losses, 'l1_loss', lambda *args: loss_fn(*args) * jnp.nan)
  config = load_config(**{'train.num_epochs': 3})
  with pytest.raises(FloatingPointError, match='training loss became nan at step 5'):
    train_lib.train_and_evaluate(config, workdir)
  after, after_step = _final_params(workdir)
  assert after_step == good_step
  same = jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(x, y)), good, after)
  assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.slow
def test_demo_main_job_beats_the_lms_baseline(tmp_path):
  """The README's main job: `python train.py --config=configs/demo.py` on the SYNTHETIC demo."""
  workdir = tmp_path / 'demo'
  # As a user runs it: fully optimised XLA (the suite's compile-time shortcut would slow it).
  flags = script_env()['XLA_FLAGS'].replace('--xla_backend_optimization_level=0', '')
  env = script_env({'XLA_FLAGS': flags})
  run = _run_train(workdir, config='configs/demo.py', env=env, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'orbax' not in run.stderr  # The console shows our progress lines, not library chatter.
  final = [r for r in _jsonl(workdir) if 'valid_psnr' in r][-1]
  config = config_utils.load_config(workdir)
  valid = input_pipeline.get_source(config, 'valid')
  baseline = np.mean(
    [metrics.psnr(valid[i]['gt'], valid[i]['lms'], data_range=1.0) for i in range(len(valid))]
  )
  assert final['valid_psnr'] >= baseline + 1.0, (final['valid_psnr'], baseline)
