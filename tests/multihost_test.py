"""Real multi-process runs on localhost: `jax.distributed` over gloo, CPU, one device per process.

Each test launches `train.py` (or a small evaluation script) as N processes with the explicit
coordinator settings (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) on a free
port, and compares with one process of N forced devices. Every process has a timeout, so
nothing can hang CI; all tests are slow-marked.
"""

import json
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, run_script, script_env

from u2net_jax.run import checkpointing, config_utils

pytestmark = pytest.mark.slow

TINY = ['--config=configs/tiny.py', '--config.train.num_epochs=2']
TIMEOUT = 480  # Seconds per launch: generous, for a loaded CI machine; a hang still ends.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(tmp_path, devices: int = 1, **extra) -> dict:
  xla = script_env()['XLA_FLAGS']
  return script_env(
    {'XLA_FLAGS': f'{xla} --xla_force_host_platform_device_count={devices}', **extra},
    cache_dir=tmp_path / 'jax_cache',
  )


class Processes:
  """N processes of one command, started with the explicit coordinator settings."""

  def __init__(self, tmp_path, args_per_process, name='run', env_extra=None):
    port = _free_port()
    self.logs = [tmp_path / f'{name}{i}.log' for i in range(len(args_per_process))]
    self.procs = []
    for i, args in enumerate(args_per_process):
      env = _env(
        tmp_path,
        JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
        JAX_NUM_PROCESSES=str(len(args_per_process)),
        JAX_PROCESS_ID=str(i),
        **(env_extra or {}),
      )
      with open(self.logs[i], 'w') as log:
        self.procs.append(
          subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
          )
        )

  def wait(self, timeout=TIMEOUT) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f'timed out after {timeout} s:\n{self.output()[-4000:]}')
    return codes

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def output(self, i=None) -> str:
    logs = self.logs if i is None else [self.logs[i]]
    return '\n'.join(f'== {log.name}\n{log.read_text()}' for log in logs)


def _train_args(workdir, *flags):
  return ['train.py', *TINY, f'--workdir={workdir}', '--heartbeat_timeout=15', *flags]


def _losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [r['train_loss'] for r in map(json.loads, lines) if 'train_loss' in r]


def _params(workdir, step=None):
  config = config_utils.load_config(workdir)
  params, got, _ = checkpointing.restore_params(workdir, config.model, step=step, which='latest')
  return jax.tree_util.tree_leaves(jax.device_get(params)), got


def _max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b, strict=True))


def test_two_processes_train_like_one_process_with_two_devices(tmp_path):
  single = run_script(
    *_train_args(tmp_path / 'single'), env=_env(tmp_path, devices=2), timeout=TIMEOUT
  )
  assert single.returncode == 0, single.stderr[-3000:]
  run = Processes(tmp_path, [_train_args(tmp_path / 'multi')] * 2)
  assert run.wait() == [0, 0], run.output()[-4000:]
  assert '2 devices (1 local) on 2 hosts' in run.output(0)
  np.testing.assert_allclose(_losses(tmp_path / 'multi'), _losses(tmp_path / 'single'), atol=1e-6)
  (a, step_a), (b, step_b) = _params(tmp_path / 'single'), _params(tmp_path / 'multi')
  assert step_a == step_b == 8
  assert _max_diff(a, b) <= 1e-6


def _records(path):
  for line in path.read_text().splitlines():
    try:
      yield json.loads(line)
    except ValueError:  # A line being written.
      continue


def _wait_for_step(workdir, step, procs, timeout=TIMEOUT):
  """Waits until `metrics.jsonl` records a train loss at `step` or later."""
  deadline = time.time() + timeout
  path = workdir / 'metrics.jsonl'
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), 'a process ended early'
    if path.exists() and any(r.get('step', 0) >= step for r in _records(path)):
      return
    time.sleep(0.1)
  pytest.fail(f'no step {step} in {path} after {timeout} s')


def _wait_for_checkpoint(workdir, step, procs, timeout=TIMEOUT):
  """Waits until checkpoint `step` is committed (orbax renames its temporary folder to the step's
  name as the last act of an asynchronous save): a metrics record alone may come first."""
  deadline = time.time() + timeout
  path = checkpointing.checkpoint_dir(workdir) / str(step)
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), 'a process ended early'
    if path.is_dir():
      return
    time.sleep(0.1)
  pytest.fail(f'no committed checkpoint {path} after {timeout} s')


def test_sigkill_and_sigterm_then_resume_end_with_the_same_parameters(tmp_path):
  flags = ['--config.train.num_epochs=4']  # 16 steps; checkpoints every 4.
  reference = run_script(
    *_train_args(tmp_path / 'ref', *flags), env=_env(tmp_path, devices=2), timeout=TIMEOUT
  )
  assert reference.returncode == 0, reference.stderr[-3000:]
  run_dir = tmp_path / 'multi'
  args = [_train_args(run_dir, *flags)] * 2
  # SIGKILL both processes after the first checkpoint: the relaunch resumes from it.
  run = Processes(tmp_path, args, name='killed')
  _wait_for_step(run_dir, 5, run.procs)
  _wait_for_checkpoint(run_dir, 4, run.procs)
  run.kill()
  # SIGTERM (preemption) to both: they agree on a step, save it and stop with status 143.
  run = Processes(tmp_path, args, name='preempted')
  _wait_for_step(run_dir, 9, run.procs)
  for p in run.procs:
    p.send_signal(signal.SIGTERM)
  assert run.wait() == [143, 143], run.output()[-4000:]
  assert 'Resumed from' in run.output(0)
  assert 'checkpoint saved' in run.output(0) and 're-run the same command' in run.output(0)
  _, preempted_step = _params(run_dir)
  assert 9 <= preempted_step < 16
  run = Processes(tmp_path, args, name='resumed')
  assert run.wait() == [0, 0], run.output()[-4000:]
  assert f'step {preempted_step}' in run.output(0)
  (a, step_a), (b, step_b) = _params(tmp_path / 'ref'), _params(run_dir)
  assert step_a == step_b == 16
  assert _max_diff(a, b) <= 1e-6


def test_sigterm_single_process_saves_and_resumes(tmp_path):
  env = _env(tmp_path)
  run_dir = tmp_path / 'run'
  proc = run_script(*_train_args(run_dir), env=env, wait=False, log=tmp_path / 'run.log')
  try:
    _wait_for_step(run_dir, 2, [proc])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 143, (tmp_path / 'run.log').read_text()[-3000:]
  finally:
    proc.kill()
  _, step = _params(run_dir)
  assert 2 <= step < 8  # Saved where it stopped.
  resumed = run_script(*_train_args(run_dir), env=env, timeout=TIMEOUT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from {run_dir} step {step}' in resumed.stderr
  full = run_script(*_train_args(tmp_path / 'full'), env=env, timeout=TIMEOUT)
  assert full.returncode == 0, full.stderr[-3000:]
  (a, _), (b, _) = _params(tmp_path / 'full'), _params(run_dir)
  assert _max_diff(a, b) <= 1e-6


def test_non_shared_workdir_and_dead_peer_end_the_run_with_a_message(tmp_path):
  # Per-host local folders instead of one shared path: a clear message within the wait.
  start = time.time()
  run = Processes(
    tmp_path,
    [_train_args(tmp_path / f'local{i}', '--shared_workdir_timeout=3') for i in range(2)],
    name='local',
  )
  codes = run.wait(timeout=120)
  assert codes[0] != 0 and codes[1] != 0
  assert 'is not shared' in run.output(1) and 'Traceback' not in run.output(1)
  assert time.time() - start < 120
  # A process that dies: the survivor stops with an error within the heartbeat timeout.
  run = Processes(tmp_path, [_train_args(tmp_path / 'dead')] * 2, name='dead')
  _wait_for_step(tmp_path / 'dead', 1, run.procs)
  run.procs[1].kill()
  died = time.time()
  try:
    code = run.procs[0].wait(timeout=90)
  except subprocess.TimeoutExpired:
    run.kill()
    pytest.fail('process 0 still runs 90 s after its peer died:\n' + run.output(0)[-3000:])
  assert code != 0
  assert time.time() - died < 90


def _metric_means(out_dir) -> dict:
  """test set/method/image/metric -> value, from every `metrics.json` under `out_dir`."""
  values = {}
  for path in sorted(out_dir.glob('*/metrics.json')):
    for method, summary in json.loads(path.read_text())['methods'].items():
      for k, image in enumerate(summary['per_image']):
        for name, value in image.items():
          values[f'{path.parent.name}/{method}/{k}/{name}'] = value
  return values


def _evaluate_processes(tmp_path, workdir, out_dir, n=2):
  code = (
    'from u2net_jax.infer import eval_lib\n'
    'from u2net_jax.run import distributed\n'
    'distributed.initialize()\n'
    f'eval_lib.evaluate(None, {str(workdir)!r}, output_dir={str(out_dir)!r}, save_images=False)\n'
  )
  return Processes(tmp_path, [['-c', code]] * n, name='eval')


def test_checkpoint_of_four_devices_evaluates_on_one_device_and_two_processes(tmp_path):
  source = tmp_path / 'dev4'
  train = run_script(
    'train.py', '--config=configs/tiny.py', '--config.train.num_epochs=1',
    f'--workdir={source}', env=_env(tmp_path, devices=4), timeout=TIMEOUT,
  )  # fmt: skip
  assert train.returncode == 0, train.stderr[-3000:]
  one = run_script(
    'evaluate.py', f'--workdir={source}', f'--output_dir={tmp_path / "eval1"}',
    '--save_images=false', env=_env(tmp_path), timeout=TIMEOUT,
  )  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]
  run = _evaluate_processes(tmp_path, source, tmp_path / 'eval2')
  assert run.wait() == [0, 0], run.output()[-4000:]
  expected, got = _metric_means(tmp_path / 'eval1'), _metric_means(tmp_path / 'eval2')
  assert expected and expected.keys() == got.keys()
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-6), key


def test_fine_tune_from_a_one_device_checkpoint_on_two_processes(tmp_path):
  # A params-only checkpoint written by this (one-device) process, like converted weights.
  config = config_utils.load_config_file(REPO / 'configs' / 'tiny.py')
  from u2net_jax import models

  shapes = models.abstract_params(models.create_model(config.model))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
    lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes
  )
  source = tmp_path / 'source'
  checkpointing.save_params(source, params, meta={'origin': 'test'})
  config_utils.save_config(config, source)
  flags = ['--config.train.num_epochs=1', f'--config.init_from={source}']
  single = run_script(
    *_train_args(tmp_path / 'single', *flags), env=_env(tmp_path, devices=2), timeout=TIMEOUT
  )
  assert single.returncode == 0, single.stderr[-3000:]
  run = Processes(tmp_path, [_train_args(tmp_path / 'multi', *flags)] * 2)
  assert run.wait() == [0, 0], run.output()[-4000:]
  assert f'Initialised the weights from {source}' in run.output(0)
  np.testing.assert_allclose(_losses(tmp_path / 'multi'), _losses(tmp_path / 'single'), atol=1e-5)
