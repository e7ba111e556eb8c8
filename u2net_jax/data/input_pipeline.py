"""Input pipeline: sources for every split, and global batches placed on the device mesh.

Sources (`get_source`): the data layer's `sources.open_source` for a split of the config
(files by their suffix, TFDS ArrayRecord datasets, or the SYNTHETIC demo data). All are
random-access: `len(source)` and `source[i]` -> {'gt', 'lms', 'ms', 'guide'} as (H, W, C) float32
divided by `config.data.max_value` ('gt' absent in full-resolution test sets).

Order (`train_batches`). The training stream is a pure function of the step. Epoch e visits the
n examples in the order `epoch_order(n, seed, e)`, the stable argsort of n raw 64-bit draws of
numpy's PCG64 seeded by `SeedSequence([seed, e])`:

  np.argsort(np.random.PCG64(np.random.SeedSequence([seed, e])).random_raw(n), kind='stable')

numpy guarantees the streams of `SeedSequence` and of a seeded bit generator across versions (it
does not for `Generator.permutation`), so the order is the same on every machine; a test pins it
with literal indices. Each epoch contributes the first `steps_per_epoch * B` examples of its
order (the last partial batch is dropped, as the official loader does), laid end to end: stream
position p is example `epoch_order(n, seed, e)[r]` with (e, r) = divmod(p, steps_per_epoch * B),
and global batch s is positions [s * B, (s + 1) * B). Each process computes an epoch's
permutation once (O(n) memory) and caches it. A resumed run only needs the step it stopped at:
`train_batches(..., start_step=step)` continues the exact sequence, with no iterator state to
checkpoint.

Hosts. Of every global batch of B examples, process p of P reads only rows
[p * B/P, (p + 1) * B/P) (disjoint shares that cover the batch) and
`jax.make_array_from_process_local_data` assembles the global `jax.Array`, sharded over the
mesh axis 'data' (`sharding.batch_sharding`). Reading runs in grain threads
(`config.data.read_threads`) or worker processes (`config.data.worker_count`), and
`config.data.prefetch` batches are put on the devices ahead of the step (transfers are
asynchronous, so the step never waits for them).

Augmentation (`config.data.augment`, off by default as in the official code): one of the eight
flips / 90-degree rotations per example, drawn from (seed, global stream position), i.e. a
deterministic function of (seed, step).

Evaluation (`eval_batches`): every example once, in file order; the last batch is padded with
copies of the last example and carries 'mask' (True for real examples) and 'index' (the example's
position, -1 for padding), so nothing is dropped or doubled.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from u2net_jax.data import DataError, sources
from u2net_jax.run import sharding

# Stream length used for the "infinite" training MapDataset (in steps); never reached.
_MAX_STEPS = 1 << 40


# ----------------------------------------------------------------------------------------------
# Sources.


def get_source(config, split: str) -> sources.Source:
  """The source of one split: `sources.open_source(sources.spec_from_config(config, split))`.

  Args:
    config: the experiment config (`config.data`, `config.model`, `config.task`).
    split: 'train', 'valid', or a test-set name (a key of `config.data.test_files`).

  Returns:
    A `sources.Source`: `len()` and `[i]` -> role -> (H, W, C) float32 divided by the sensor
    maximum.

  Raises:
    DataError: the data are missing (the message says how to prepare them) or invalid.
  """
  return sources.open_source(sources.spec_from_config(config, split))


# ----------------------------------------------------------------------------------------------
# Index arithmetic (pure functions of the step; also used by the tests).


def steps_per_epoch(config, source) -> int:
  """Training steps per epoch: len(source) // global batch (the last partial batch dropped)."""
  n = len(source)
  b = config.train.batch_size
  if n < b:
    raise DataError(f'{n} training examples is fewer than one global batch ({b})')
  return n // b


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits the examples (see the module docstring).

  Args:
    n: the number of examples.
    seed: `config.seed` (>= 0).
    epoch: the epoch (>= 0).

  Returns:
    (n,) int64, a permutation of range(n); the same for the same (n, seed, epoch) everywhere.
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f'seed {seed} and epoch {epoch} must be >= 0 (config.seed)')
  keys = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])).random_raw(int(n))
  return np.argsort(keys, kind='stable').astype(np.int64)


@functools.lru_cache(maxsize=4)
def _cached_order(n: int, seed: int, epoch: int) -> np.ndarray:
  # One permutation per epoch serves every position of it (grain threads share it read-only).
  order = epoch_order(n, seed, epoch)
  order.flags.writeable = False
  return order


def example_index(position: int, n: int, batch_size: int, seed: int) -> int:
  """The example at global stream position `position` (see the module docstring).

  Args:
    position: the position in the training stream (step * batch_size + row of the batch).
    n: the number of training examples.
    batch_size: the global batch B.
    seed: `config.seed`.

  Returns:
    The example index in [0, n).
  """
  used = (n // batch_size) * batch_size  # Positions per epoch: the last partial batch dropped.
  epoch, rank = divmod(int(position), used)
  return int(_cached_order(n, seed, epoch)[rank])


def host_positions(step: int, batch_size: int, process_index: int, process_count: int) -> range:
  """Stream positions of global batch `step` that process `process_index` reads.

  Args:
    step: the global step.
    batch_size: the global batch B (divisible by process_count).
    process_index, process_count: this host and the number of hosts.

  Returns:
    B / process_count consecutive positions: its share of [step * B, (step + 1) * B).
  """
  local = _local_batch(batch_size, process_count)
  start = step * batch_size + process_index * local
  return range(start, start + local)


def train_indices(
  config, n: int, step: int, *, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
  """Example indices that a host reads for global batch `step`.

  Args:
    config: the config (`seed`, `train.batch_size`).
    n: the number of training examples.
    step: the global step.
    process_index, process_count: the host and the number of hosts.

  Returns:
    (B / process_count,) int64 example indices.
  """
  b = config.train.batch_size
  pos = host_positions(step, b, process_index, process_count)
  return np.array([example_index(p, n, b, config.seed) for p in pos], np.int64)


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f'global batch {batch_size} does not divide over {process_count} processes')
  return batch_size // process_count


# ----------------------------------------------------------------------------------------------
# Host-side datasets (numpy), one share per process.

_DIHEDRAL = 8


def _augment(example: Mapping[str, np.ndarray], seed: int, position: int) -> dict:
  """One of the 8 flips / rotations, the same for every role, drawn from (seed, position)."""
  k = int(np.random.default_rng([seed, position]).integers(_DIHEDRAL))
  out = {}
  for role, x in example.items():
    y = np.rot90(x, k % 4, axes=(0, 1))
    if k >= 4:
      y = y[:, ::-1]
    out[role] = np.ascontiguousarray(y)
  return out


class _TrainElement:
  """Local stream element -> example dict (picklable)."""

  def __init__(self, source, config, process_index: int, process_count: int):
    self.source = source
    self.batch_size = config.train.batch_size
    self.local = _local_batch(self.batch_size, process_count)
    self.process_index = process_index
    self.n = len(source)
    self.seed = config.seed
    self.augment = bool(config.data.augment)

  def __call__(self, k: int) -> dict:
    step, j = divmod(int(k), self.local)
    position = step * self.batch_size + self.process_index * self.local + j
    example = self.source[example_index(position, self.n, self.batch_size, self.seed)]
    if self.augment:
      example = _augment(example, self.seed, position)
    return example


class _EvalElement:
  """Local eval element -> example dict with 'mask' and 'index' (picklable)."""

  def __init__(self, source, batch_size: int, process_index: int, process_count: int):
    self.source = source
    self.n = len(source)
    self.batch_size = batch_size
    self.local = _local_batch(batch_size, process_count)
    self.process_index = process_index

  def __call__(self, k: int) -> dict:
    b, j = divmod(int(k), self.local)
    position = b * self.batch_size + self.process_index * self.local + j
    real = position < self.n
    example = dict(self.source[min(position, self.n - 1)])
    example['mask'] = np.asarray(real)
    example['index'] = np.asarray(position if real else -1, np.int32)
    return example


def _read_options(config) -> grain.ReadOptions:
  threads = int(config.data.read_threads)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads))


def _finish(ds: grain.MapDataset, config) -> grain.IterDataset:
  it = ds.to_iter_dataset(_read_options(config))
  if config.data.worker_count > 0:
    # grain's workers read absl flags; outside an absl app (tests, Colab) nothing parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(config.data.worker_count)))
  return it


def host_train_dataset(
  config, source, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """This host's share of every global training batch, from `start_step` on, as numpy.

  Args:
    config: the config.
    source: the training source.
    start_step: the first global step to produce.
    process_index, process_count: the host and the number of hosts.

  Returns:
    An infinite grain `IterDataset` of role -> (B / process_count, H, W, C) float32.
  """
  steps_per_epoch(config, source)  # Fails early on a source smaller than a batch.
  local = _local_batch(config.train.batch_size, process_count)
  ds = grain.MapDataset.range(start_step * local, _MAX_STEPS * local)
  ds = ds.map(_TrainElement(source, config, process_index, process_count))
  return _finish(ds.batch(local, drop_remainder=True), config)


def host_eval_dataset(
  config, source, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """This host's share of every evaluation batch (padded, with 'mask' and 'index').

  Args:
    config: the config.
    source: the source.
    batch_size: the global evaluation batch.
    process_index, process_count: the host and the number of hosts.

  Returns:
    A finite grain `IterDataset` of ceil(n / batch_size) batches: roles -> (b, H, W, C)
    float32, 'mask' (b,) bool, 'index' (b,) int32, b = batch_size / process_count.
  """
  n = len(source)
  local = _local_batch(batch_size, process_count)
  num_batches = -(-n // batch_size)
  ds = grain.MapDataset.range(num_batches * local)
  ds = ds.map(_EvalElement(source, batch_size, process_index, process_count))
  return _finish(ds.batch(local, drop_remainder=True), config)


# ----------------------------------------------------------------------------------------------
# Device placement.


def _to_global(local: Mapping[str, np.ndarray], target, batch_size: int) -> dict[str, jax.Array]:
  return {
    k: jax.make_array_from_process_local_data(target, v, (batch_size,) + v.shape[1:])
    for k, v in local.items()
  }


def _prefetch_to_device(host_iter, target, batch_size: int, size: int) -> Iterator[dict[str, Any]]:
  """Keeps `size` batches in flight on the devices (transfers are asynchronous)."""
  queue = collections.deque()
  for local in host_iter:
    queue.append(_to_global(local, target, batch_size))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def train_batches(config, source, *, mesh, start_step: int) -> Iterator[dict[str, jax.Array]]:
  """Infinite global training batches, starting at `start_step`.

  Args:
    config: the config (`seed`, `train.batch_size`, `data.*`).
    source: the training source (`get_source(config, 'train')`).
    mesh: the mesh of `sharding.create_mesh()` (batch axis 'data', Auto axis type).
    start_step: the global step of the first batch (0, or the restored step on resume).

  Returns:
    An iterator of role -> jax.Array (B, H, W, C) sharded over 'data'.
  """
  b = config.train.batch_size
  sharding.check_batch_divides(b, mesh, 'config.train.batch_size')
  host = host_train_dataset(
    config,
    source,
    start_step=start_step,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return _prefetch_to_device(iter(host), sharding.batch_sharding(mesh), b, config.data.prefetch)


def eval_batches(config, source, *, mesh, batch_size: int) -> Iterator[dict[str, jax.Array]]:
  """Every example of `source` once, in order, in padded global batches.

  Args:
    config: the config (`data.*`).
    source: a source.
    mesh: the mesh of `sharding.create_mesh()`.
    batch_size: the global evaluation batch (divisible by the devices on 'data').

  Returns:
    An iterator of ceil(n / batch_size) batches: roles -> (batch_size, H, W, C) float32,
    'mask' (batch_size,) bool (False for padding), 'index' (batch_size,) int32 (-1 for padding).
  """
  sharding.check_batch_divides(batch_size, mesh, 'batch_size')
  host = host_eval_dataset(
    config,
    source,
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  target = sharding.batch_sharding(mesh)
  return _prefetch_to_device(iter(host), target, batch_size, config.data.prefetch)
