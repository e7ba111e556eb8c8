"""What a training run records while it runs: `metrics.jsonl`, TensorBoard scalars, the console.

Host 0 writes; the others stay quiet. `TrainLog` keeps the per-step figures of `train_step` (loss,
gradient and parameter norms) on the device and fetches them every `log_every` steps, which is
also where the NaN guard looks at them (`check_finite`): a non-finite loss or norm stops the run
before the next checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from absl import logging

from u2net_jax import errors


class MetricWriter:
  """Writes scalars as JSON lines (`metrics.jsonl`) and TensorBoard events (tensorboardX)."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    self._tb = None
    if enabled:
      # An append-only log, one flushed line per record: a kill loses at most the line being
      # written, and a resumed run continues the same file.
      self._jsonl = open(workdir / 'metrics.jsonl', 'a')  # Closed in close().
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Appends one record of `scalars` at `step` (a no-op on hosts other than 0)."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class TrainLog:
  """Collects the per-step losses on the device and reports them every few steps."""

  def __init__(self, config, plan, writer: MetricWriter, workdir: Path, lr_fn: Callable):
    """`plan`: the run's `train_lib.Plan`; `lr_fn`: its learning-rate schedule (for the log)."""
    self._batch_size = config.train.batch_size
    self._lr_fn = lr_fn
    self._plan, self._writer, self._workdir = plan, writer, workdir
    self._pending: list[dict[str, jax.Array]] = []
    self._start = time.perf_counter()
    self.last: dict[str, float] = {}

  def add(self, step_metrics: dict[str, jax.Array]) -> None:
    # Kept on the device: fetching every step would synchronise the host with each step.
    self._pending.append(step_metrics)

  def flush(self, step: int) -> None:
    """Writes the mean loss since the last flush; stops on a non-finite loss or norm."""
    fetched = jax.device_get(self._pending)
    steps, self._pending = len(self._pending), []
    first = step - steps + 1
    for name in ('loss', 'grad_norm', 'param_norm'):
      check_finite(np.asarray([m[name] for m in fetched], np.float64), first, name, self._workdir)
    losses = np.asarray([m['loss'] for m in fetched], np.float64)
    rate = steps / max(time.perf_counter() - self._start, 1e-9)
    plan = self._plan
    self.last = {
      'train_loss': float(losses.mean()),
      'grad_norm': float(fetched[-1]['grad_norm']),
      'param_norm': float(fetched[-1]['param_norm']),
      'learning_rate': float(self._lr_fn(step - 1)),
      'steps_per_sec': rate,
      'samples_per_sec': rate * self._batch_size,
      'epoch': step / plan.steps_per_epoch,
    }
    self._writer.write(step, self.last)
    if self._writer.enabled:
      logging.info(
        '[%d/%d] epoch %.1f  loss %.5f  lr %.3g  %.2f steps/s  ETA %s',
        step, plan.total_steps, self.last['epoch'], self.last['train_loss'],
        self.last['learning_rate'], rate, format_eta((plan.total_steps - step) / max(rate, 1e-9)),
      )  # fmt: skip
    self._start = time.perf_counter()


_WHAT = {'loss': 'training loss', 'grad_norm': 'gradient norm', 'param_norm': 'parameter norm'}


def check_finite(values: np.ndarray, first_step: int, name: str, workdir: Path) -> None:
  """Raises `errors.DivergedError` when one of the per-step `values` is NaN or infinite."""
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise errors.DivergedError(
      f'the {_WHAT[name]} became {values[bad[0]]} at step {first_step + int(bad[0])}; stopped '
      f'without saving. The checkpoints in {workdir / "checkpoints"} hold only finite '
      'parameters: lower --config.optimizer.learning_rate or check the data for extreme '
      'values, then re-run to resume from the last one.'
    )
