"""Multi-process runs: launching `jax.distributed`, agreeing between processes, preemption.

Launch (`initialize`), in the order it is looked for:
- explicit: a coordinator address, a process count and this process's id, from arguments
  (`train.py --coordinator_address=... --num_processes=... --process_id=...`) or the environment
  (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). `jax.distributed.initialize()`
  itself reads only the address from the environment, so all three are passed on explicitly;
- Cloud TPU pod slices and SLURM jobs: detected by JAX from their environment, as before;
- otherwise a single process, nothing to initialise.

The heartbeat timeout bounds how long the survivors of a dead process wait before JAX's
coordination service ends them with an error (JAX's default is 100 s).

Preemption (`PreemptionWatch`): SIGTERM is how Cloud TPU maintenance, SLURM and Kubernetes stop a
job. With several processes, JAX's preemption service catches it and agrees on a step that every
process reaches (`multihost_utils.reached_preemption_sync_point`); a single process catches it
itself. Either way the training loop asks `watch.reached(step)` after every step and saves there.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from u2net_jax import errors

ENV_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


def _int_setting(value, name: str, env: str) -> int | None:
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.DistributedError(f'{name} (or ${env}) must be an integer, got {value!r}') from None


def _auto_detected(env) -> bool:
  """Whether this looks like one process of a Cloud TPU pod slice or a SLURM job."""
  return len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1 or (
    int(env.get('SLURM_NTASKS', '1') or 1) > 1
  )


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
  initialization_timeout_s: int = 300,
) -> None:
  """Starts `jax.distributed` when this process is one of several; a no-op for a single process.

  Args:
    coordinator_address: 'host:port' of process 0 (default `$JAX_COORDINATOR_ADDRESS`).
    num_processes: how many processes take part (default `$JAX_NUM_PROCESSES`).
    process_id: this process's id, 0 .. num_processes - 1 (default `$JAX_PROCESS_ID`).
    heartbeat_timeout_s: after this long without news of a process, the others stop with an
      error instead of waiting for it forever.
    initialization_timeout_s: how long to wait for every process to join.

  Raises:
    errors.DistributedError: an explicit launch that misses a setting or has an impossible one.
  """
  env = os.environ
  address = coordinator_address or env.get(ENV_ADDRESS) or None
  count = _int_setting(
    num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES),
    'num_processes',
    ENV_NUM_PROCESSES,
  )
  index = _int_setting(
    process_id if process_id is not None else env.get(ENV_PROCESS_ID),
    'process_id',
    ENV_PROCESS_ID,
  )
  timeouts = dict(
    heartbeat_timeout_seconds=heartbeat_timeout_s,
    initialization_timeout=initialization_timeout_s,
  )
  if address is None and count is None and index is None:
    if _auto_detected(env):
      jax.distributed.initialize(**timeouts)
    return
  if address is not None and (count is None or index is None) and _auto_detected(env):
    # A coordinator given to a SLURM / TPU job whose scheduler knows the rest.
    jax.distributed.initialize(address, count, index, **timeouts)
    return
  missing = [
    name
    for name, value in (
      (f'coordinator address (${ENV_ADDRESS})', address),
      (f'number of processes (${ENV_NUM_PROCESSES})', count),
      (f'process id (${ENV_PROCESS_ID})', index),
    )
    if value is None
  ]
  if missing:
    raise errors.DistributedError(
      'an explicit multi-process launch needs all three settings; missing: ' + ', '.join(missing)
    )
  if count < 1 or not 0 <= index < count:
    raise errors.DistributedError(
      f'process id {index} is not within 0..{count - 1} ({ENV_NUM_PROCESSES}={count})'
    )
  if count == 1:
    return
  jax.distributed.initialize(address, count, index, **timeouts)


def all_processes_agree(ok: bool) -> list[bool]:
  """Every process's `ok`, gathered on every process (a collective: all must call it).

  Returns:
    [ok of process 0, ok of process 1, ...]; just [ok] for a single process.
  """
  if jax.process_count() == 1:
    return [bool(ok)]
  gathered = multihost_utils.process_allgather(np.asarray([ok], np.int32))
  return [bool(v) for v in np.asarray(gathered).reshape(-1)]


def broadcast_int(value: int) -> int:
  """Process 0's `value` (an int32), on every process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def wait_for_all(name: str) -> None:
  """Blocks until every process reaches the same `name`d point (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class PreemptionWatch:
  """Tells the training loop when to save and stop because the job was asked to (SIGTERM).

  Use as a context manager around the loop; `reached(step)` must be called after every step on
  every process (JAX's sync point counts the steps).
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._signalled = threading.Event()
    self._previous = None
    self.signal_name = 'SIGTERM'

  def __enter__(self) -> PreemptionWatch:
    if not self._multi and threading.current_thread() is threading.main_thread():
      # One process: the handler only records the request; the loop saves at the next step.
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    self._signalled.set()
    logging.warning(
      '%s received: saving a checkpoint after this step, then stopping.', self.signal_name
    )

  def reached(self, step: int) -> bool:
    """Whether every process has been asked to stop and `step` is where they all save."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()


def define_flags(fv=None) -> None:
  """The launch flags of the entry points (train.py, evaluate.py), defined once here.

  `--coordinator_address`, `--num_processes`, `--process_id` (default: the JAX_* environment
  variables, or Cloud TPU / SLURM detection) and `--heartbeat_timeout`.
  """
  from absl import flags

  fv = flags.FLAGS if fv is None else fv
  flags.DEFINE_string(
    'coordinator_address', None, f'Process 0 host:port [${ENV_ADDRESS}].', flag_values=fv
  )
  flags.DEFINE_integer(
    'num_processes', None, f'Number of processes [${ENV_NUM_PROCESSES}].', flag_values=fv
  )
  flags.DEFINE_integer(
    'process_id', None, f'This process, 0..num_processes-1 [${ENV_PROCESS_ID}].', flag_values=fv
  )
  flags.DEFINE_integer(
    'heartbeat_timeout',
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    'Seconds before a silent peer ends the run with an error (several processes).',
    flag_values=fv,
  )


def initialize_from_flags(fv=None) -> None:
  """`initialize` with the values of `define_flags`' flags."""
  from absl import flags

  fv = flags.FLAGS if fv is None else fv
  initialize(
    fv.coordinator_address,
    fv.num_processes,
    fv.process_id,
    heartbeat_timeout_s=fv.heartbeat_timeout,
  )


def start(fv=None) -> None:
  """What an entry point does first: a quiet console, then `initialize_from_flags`.

  Library chatter (orbax, libtpu) stays off the console unless -v 1 / --verbosity=1
  (`logging_utils.configure`). An incomplete launch exits with one line naming what is missing.
  """
  import sys

  from u2net_jax.run import logging_utils

  logging_utils.configure()
  try:
    initialize_from_flags(fv)
  except errors.DistributedError as e:
    sys.exit(f'error: {e}')
