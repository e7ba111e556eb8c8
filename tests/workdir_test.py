"""Workdir safety: default names, the lock, the stored-config comparison; and through train.py:
two runs on one workdir, a refused config change, a run whose update makes the parameters
non-finite."""

import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config, run_script, script_env

from u2net_jax import errors
from u2net_jax.run import checkpointing, config_utils, train_lib, workdir


def test_default_workdir_keeps_the_config_argument():
  assert workdir.default_workdir('configs/wv3.py') == 'workdirs/wv3'
  assert workdir.default_workdir('configs/ablation.py:v2_concat') == 'workdirs/ablation_v2_concat'
  assert workdir.default_workdir('configs/tiny.py:hisr') == 'workdirs/tiny_hisr'


def test_lock_names_the_holder_and_is_released(tmp_path):
  first = workdir.WorkdirLock(tmp_path)
  first.acquire()
  with pytest.raises(errors.WorkdirError, match=f'in use by process {os.getpid()} on host'):
    workdir.WorkdirLock(tmp_path).acquire()
  first.release()
  assert not (tmp_path / workdir.LOCK_NAME).exists()
  second = workdir.WorkdirLock(tmp_path)
  second.acquire()
  second.release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], text=True,
                        capture_output=True, check=True)  # fmt: skip
  lock = workdir.WorkdirLock(tmp_path)
  (tmp_path / workdir.LOCK_NAME).write_text(
    json.dumps({'host': lock.holder['host'], 'pid': int(dead.stdout), 'started': 0})
  )
  lock.acquire()  # Its holder is gone: a crash, not a running run.
  assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())['pid'] == os.getpid()
  lock.release()


def test_lock_of_another_host_is_stale_only_without_refreshes(tmp_path):
  path = tmp_path / workdir.LOCK_NAME
  path.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'started': 0}))
  with pytest.raises(errors.WorkdirError, match='process 1 on host elsewhere'):
    workdir.WorkdirLock(tmp_path).acquire()
  old = time.time() - workdir.STALE_AFTER_S - 10
  os.utime(path, (old, old))
  lock = workdir.WorkdirLock(tmp_path)
  lock.acquire()
  lock.release()


def test_config_differences_refuse_the_run_and_allow_the_schedule():
  stored = load_config().to_dict()
  changed = load_config(
    **{'model.width': 8, 'optimizer.learning_rate': 5e-4, 'train.num_epochs': 40, 'seed': 2}
  ).to_dict()
  diffs = workdir.config_differences(stored, changed)
  assert [d.split(':')[0] for d in diffs] == ['model.width', 'optimizer.learning_rate', 'seed']
  assert 'model.width: 16 -> 8' in diffs
  # A field an older config.json lacks counts as its default.
  older = load_config().to_dict()
  del older['optimizer']['eps']
  assert workdir.config_differences(older, stored, defaults=stored) == []
  assert workdir.config_differences(older, stored) == []  # No default known: unchanged.


def test_check_config_refuses_before_anything_is_written(tmp_path):
  config = load_config()
  config_utils.save_config(config, tmp_path)
  before = (tmp_path / 'config.json').read_text()
  with pytest.raises(errors.WorkdirError, match=r'model\.width: 16 -> 8') as info:
    workdir.check_config(tmp_path, load_config(**{'model.width': 8}))
  assert '--allow_config_change' in str(info.value)
  assert (tmp_path / 'config.json').read_text() == before
  diffs = workdir.check_config(tmp_path, load_config(**{'model.width': 8}), allow_changes=True)
  assert diffs == ['model.width: 16 -> 8']
  assert workdir.check_config(tmp_path, load_config(**{'train.num_epochs': 9})) == []


@pytest.mark.slow
def test_second_train_py_on_a_workdir_stops_at_once_naming_the_holder(tmp_path):
  env = script_env(cache_dir=tmp_path / 'jax_cache')
  run_dir = tmp_path / 'run'
  args = ['train.py', '--config=configs/tiny.py', f'--workdir={run_dir}']
  first = run_script(*args, env=env, wait=False, log=tmp_path / 'first.log')
  try:
    deadline = time.time() + 120
    while not (run_dir / workdir.LOCK_NAME).exists() and time.time() < deadline:
      assert first.poll() is None, (tmp_path / 'first.log').read_text()
      time.sleep(0.05)
    start = time.time()
    second = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    elapsed = time.time() - start
  finally:
    first.kill()
    first.wait()
  assert second.returncode != 0 and 'Traceback' not in second.stderr
  assert f'in use by process {first.pid}' in second.stderr
  # From its first log line (imports done) to its error line: the stop itself.
  stamps = [
    datetime.datetime.strptime(line[1:21], '%m%d %H:%M:%S.%f')
    for line in second.stderr.splitlines()
    if line[:1] in 'IWE' and line[1:5].isdigit()
  ]
  assert (stamps[-1] - stamps[0]).total_seconds() < 5, second.stderr
  assert elapsed < 60  # Python and JAX imports included, on a loaded 2-core machine.


@pytest.mark.slow
def test_changed_model_or_learning_rate_is_refused_on_resume(tmp_path):
  run_dir = tmp_path / 'run'
  train_lib.train_and_evaluate(load_config(**{'train.num_epochs': 1}), run_dir)
  stored = (run_dir / 'config.json').read_text()
  args = ['train.py', '--config=configs/tiny.py', f'--workdir={run_dir}']
  for flag, field in (
    ('--config.model.width=8', 'model.width'),
    ('--config.optimizer.learning_rate=0.0005', 'optimizer.learning_rate'),
  ):
    run = run_script(*args, flag, timeout=120)
    assert run.returncode != 0 and 'Traceback' not in run.stderr
    assert field in run.stderr and '--allow_config_change' in run.stderr
    assert (run_dir / 'config.json').read_text() == stored


@pytest.mark.slow
def test_update_to_non_finite_parameters_is_never_saved(tmp_path, monkeypatch):
  # Fault injection: an infinite learning rate from step 5 on makes that update's parameters
  # non-finite while its loss (computed before the update) and its gradients stay finite.
  schedule = train_lib.create_learning_rate_fn
  monkeypatch.setattr(
    train_lib,
    'create_learning_rate_fn',
    lambda config, spe: lambda step: jnp.where(step >= 4, jnp.inf, schedule(config, spe)(step)),
  )
  run_dir = tmp_path / 'run'
  config = load_config(**{'train.num_epochs': 2})  # Checkpoints at steps 4 and 8.
  with pytest.raises(errors.DivergedError, match=r'parameter norm became (nan|inf) at step 5'):
    train_lib.train_and_evaluate(config, run_dir)
  manager = checkpointing.create_manager(run_dir, read_only=True)
  assert manager.all_steps() == [4]
  manager.close()
  params, _, _ = checkpointing.restore_params(run_dir, config.model, which='latest')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
