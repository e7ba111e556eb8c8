"""What a training run tells its user beyond the scalars: compile time, images, a closing summary.

`train_lib.train_and_evaluate` calls three hooks, each one line:

- `log_first_call(p_train, ...)`: wraps the jitted train step so that its first call says
  "compiling the train step (first step)..." and then how long XLA took (measured by jax's own
  compile events, `jax.monitoring`), so a CPU user is not left waiting in silence for the first
  log line, `log_every_steps` steps later.
- `ValidationImages`: at each validation, the same labelled previews the evaluation writes
  (`reporting.previews`: lms / fused / gt with one stretch, the error map with its colour bar,
  the guide) for a few fixed validation examples, as TensorBoard images
  (`tensorboard/events.*.images`, tag `validation/example_<index>`).
- `closing_summary`: the best validation figures beside the upsampled-MS (`lms`) baseline on the
  same validation set, where the checkpoints are and the evaluation command to run next.

Only process 0 writes or logs; every process runs the (SPMD) computations.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from u2net_jax import metrics
from u2net_jax.infer import reporting

# jax's compile events (`jax._src.dispatch`): tracing, lowering to StableHLO, XLA's compilation.
_TRACE_EVENTS = (
  '/jax/core/compile/jaxpr_trace_duration',
  '/jax/core/compile/jaxpr_to_mlir_module_duration',
)
_XLA_EVENT = '/jax/core/compile/backend_compile_duration'
NUM_IMAGES = 3  # Validation examples shown in TensorBoard.


def _is_main() -> bool:
  return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------
# The compile-time line.


class _FirstCallLogger:
  """Calls `fn`; on the first call, logs the compilation and its measured time."""

  def __init__(self, fn: Callable, what: str):
    self._fn, self._what, self._done = fn, what, False
    self.compile_seconds: float | None = None

  def __getattr__(self, name):  # `lower`, `trace`, ... of the jitted function.
    return getattr(self._fn, name)

  def __call__(self, *args, **kwargs):
    if self._done:
      return self._fn(*args, **kwargs)
    self._done = True
    if _is_main():
      logging.info('compiling %s (first step)...', self._what)
    seconds: collections.Counter = collections.Counter()

    def listener(event: str, duration: float, **_) -> None:
      if event == _XLA_EVENT or event in _TRACE_EVENTS:
        seconds[event] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    start = time.perf_counter()
    try:
      # Waiting for the result once costs one step's overlap and gives the real duration.
      out = jax.block_until_ready(self._fn(*args, **kwargs))
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)
    total = time.perf_counter() - start
    traced = sum(seconds[e] for e in _TRACE_EVENTS)
    self.compile_seconds = traced + seconds[_XLA_EVENT]
    if _is_main():
      logging.info(
        'compiled %s in %.1f s (tracing and lowering %.1f s, XLA %.1f s%s); the first step took '
        '%.1f s in all.',
        self._what, self.compile_seconds, traced, seconds[_XLA_EVENT],
        '' if seconds[_XLA_EVENT] else ': loaded from the compilation cache', total,
      )  # fmt: skip
    return out


def log_first_call(fn: Callable, what: str = 'the train step') -> Callable:
  """`fn` (a jitted function), logging its compilation and compile time on the first call.

  Args:
    fn: the jitted step.
    what: how the log names it.

  Returns:
    A callable with `fn`'s behaviour and attributes, plus `compile_seconds` after the first call.
  """
  return _FirstCallLogger(fn, what)


# ----------------------------------------------------------------------------------------------
# Validation images in TensorBoard.


def fixed_indices(n: int, count: int = NUM_IMAGES) -> list[int]:
  """`count` example indices spread over [0, n), the same at every validation."""
  return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n))})


class ValidationImages:
  """Logs the previews of a few fixed validation examples to TensorBoard at each validation."""

  def __init__(self, config, source, workdir: str | Path, *, enabled: bool | None = None):
    """Reads the examples once; opens the event file on process 0.

    Args:
      config: the run's config (`config.data`, `config.model`, `config.eval.error_max`).
      source: the validation source (`len`, `[i]` -> roles in [0, 1]).
      workdir: the run's workdir; the events go to `workdir/tensorboard`.
      enabled: write the events (default: this is process 0).
    """
    self.indices = fixed_indices(len(source))
    examples = [source[i] for i in self.indices]
    self._roles = {r: np.stack([e[r] for e in examples]) for r in ('ms', 'guide', 'gt', 'lms')}
    self._max = float(config.data.max_value)
    self._rgb = reporting.rgb_bands(int(config.model.spectral_bands), config.data.sensor)
    self._error_max = float(config.eval.get('error_max', 0.1))
    self._forward = None
    self._writer = None
    if _is_main() if enabled is None else enabled:
      from tensorboardX import SummaryWriter

      # Its own event file beside the scalars' (TensorBoard reads every file of the folder).
      self._writer = SummaryWriter(str(Path(workdir) / 'tensorboard'), filename_suffix='.images')

  def fused(self, params, apply_fn: Callable) -> np.ndarray:
    """(K, H, W, C) network outputs for the fixed examples, clamped to [0, 1] as evaluated.

    Runs on every process (the params may span several hosts).
    """
    if self._forward is None:
      self._forward = jax.jit(lambda p, batch: apply_fn({'params': p}, batch))
    placement = jax.tree_util.tree_leaves(params)[0].sharding
    inputs = {r: jax.device_put(self._roles[r], placement) for r in ('ms', 'guide', 'lms')}
    out = self._forward(params, inputs)
    # The output is replicated: any local copy is the whole array.
    return np.clip(np.asarray(out.addressable_shards[0].data, np.float32), 0.0, 1.0)

  def pictures(self, fused: np.ndarray) -> list[np.ndarray]:
    """The labelled preview panels (H', W', 3) uint8 of `fused`, one per fixed example."""
    out = []
    for k in range(len(self.indices)):
      ref = {r: self._roles[r][k].astype(np.float64) * self._max for r in ('lms', 'gt', 'guide')}
      previews = reporting.previews(
        fused[k] * self._max, ref, rgb=self._rgb, max_value=self._max, error_max=self._error_max
      )
      out.append(previews['panel'])
    return out

  def write(self, state, step: int) -> None:
    """Logs the fixed examples' panels at `step` (tags `validation/example_<index>`).

    Args:
      state: the training state (`params`, `apply_fn`).
      step: the step just validated.
    """
    fused = self.fused(state.params, state.apply_fn)
    if self._writer is None:
      return
    for index, picture in zip(self.indices, self.pictures(fused), strict=True):
      self._writer.add_image(f'validation/example_{index}', picture, step, dataformats='HWC')
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


# ----------------------------------------------------------------------------------------------
# The closing summary.


def lms_baseline(config, source) -> dict[str, float]:
  """The upsampled MS's validation figures, as the run's validation computes them for the network.

  The numpy versions of the in-loop metrics (equal to them, `metrics.in_loop`): no compilation.

  Args:
    config: the run's config (`config.model.scale` for ERGAS).
    source: the validation source.

  Returns:
    {'valid_psnr', 'valid_sam', 'valid_ergas', 'valid_loss'}: means over the examples.
  """
  sums: dict[str, float] = collections.defaultdict(float)
  ratio = int(config.model.scale)
  for i in range(len(source)):
    example = source[i]
    gt = example['gt'].astype(np.float64)
    lms = np.clip(example['lms'].astype(np.float64), 0.0, 1.0)
    sums['valid_psnr'] += metrics.psnr(gt, lms, data_range=1.0)
    sums['valid_sam'] += metrics.sam(gt, lms)
    sums['valid_ergas'] += metrics.ergas(gt, lms, ratio=ratio)
    sums['valid_loss'] += float(np.mean(np.abs(lms - gt)))
  return {k: v / max(len(source), 1) for k, v in sums.items()}


def _validations(workdir: Path) -> list[dict[str, Any]]:
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  records = []
  for line in path.read_text(encoding='utf-8').splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # A line cut by a kill: the others stand.
      continue
    if 'valid_loss' in record:
      records.append(record)
  return records


def _figures(record: Mapping[str, float]) -> str:
  return (
    f'PSNR {record["valid_psnr"]:.2f} dB, SAM {record["valid_sam"]:.3f}, '
    f'ERGAS {record["valid_ergas"]:.3f}, L1 {record["valid_loss"]:.5f}'
  )


def _shown(path: Path) -> str:
  """`path` relative to the current folder when it is below it (shorter commands)."""
  try:
    return str(path.relative_to(Path.cwd()))
  except ValueError:
    return str(path)


def closing_summary(config, workdir: str | Path, source, *, step: int | None = None) -> str:
  """Logs (process 0) and returns the end-of-training summary.

  Args:
    config: the run's config.
    workdir: the run's workdir (its `metrics.jsonl` and checkpoints).
    source: the validation source (for the `lms` baseline).
    step: the final step, for the first line.

  Returns:
    The summary text ('' on other processes).
  """
  if not _is_main():
    return ''
  workdir = Path(workdir)
  lines = [f'Training finished{"" if step is None else f" at step {step}"}; workdir {workdir}']
  records = _validations(workdir)
  if records:
    best = min(records, key=lambda r: r['valid_loss'])
    lines.append(f'  best validation (step {best["step"]}): {_figures(best)}')
    if records[-1] is not best:
      lines.append(f'  last validation (step {records[-1]["step"]}): {_figures(records[-1])}')
    baseline = lms_baseline(config, source)
    lines.append(
      f'  lms baseline (upsampled MS), same {len(source)} validation examples: '
      f'{_figures(baseline)}; the network is '
      f'{best["valid_psnr"] - baseline["valid_psnr"]:+.2f} dB PSNR from it'
    )
  # The best checkpoint is the step of the lowest validation loss (train_lib saves it). Read from
  # the log, not through orbax: a checkpoint manager opened by one process alone could wait on
  # the others in a multi-host run.
  where = f' (the best: step {best["step"]})' if records else ''
  lines.append(f'  checkpoints: {workdir / "checkpoints"}{where}')
  lines.append(f'  next: python evaluate.py --workdir={_shown(workdir)}')
  text = '\n'.join(lines)
  logging.info('%s', text)
  return text
