"""Real multi-process runs on localhost: `jax.distributed` over gloo, CPU, one device per process.

Each test launches `train.py` (or a small evaluation script) as N processes with the explicit
coordinator settings (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) on a free
port, and compares with one process of N forced devices. Every process has a timeout, so
nothing can hang CI; all tests are slow-marked.
"""

import json
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, run_script, script_env

from u2net_jax import checkpointing, config_utils

pytestmark = pytest.mark.slow

TINY = ['--config=configs/tiny.py', '--config.train.num_epochs=2']
TIMEOUT = 240


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
