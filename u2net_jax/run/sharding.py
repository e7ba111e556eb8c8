"""Where the data parallelism is decided: one device mesh and the shardings given to `jax.jit`.

The batch is split along the mesh axis 'data', everything else (parameters, optimizer state) is
replicated. This is what `jax.pmap` lowers to in current JAX, written as its recommended form:
`jax.jit` with shardings over a one-axis mesh. Step functions never mention devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

BATCH_AXIS = 'data'


def create_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh ('data') over `devices` (default: every device of every process).

  The axis type is Auto: the compiler propagates the shardings (the classic `jit` data
  parallelism). `jax.make_mesh` defaults to explicit axes, whose sharding-typed batches the
  model's reshapes (pixel shuffle) reject.

  Args:
    devices: the devices, e.g. `jax.local_devices()` for per-process inference.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(
    (len(devices),), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def local_mesh() -> jax.sharding.Mesh:
  """A mesh over this process's devices only (inference that each process runs on its own)."""
  return create_mesh(jax.local_devices())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the other axes replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(batch_size: int, mesh: jax.sharding.Mesh, field: str) -> None:
  """Raises a ValueError naming `field` when `batch_size` does not split over the mesh."""
  n = mesh.shape[BATCH_AXIS]
  if batch_size % n:
    raise ValueError(
      f'{field}={batch_size} does not divide over the {n} devices; choose a multiple of {n} '
      f'(e.g. --{field}={max(n, batch_size // n * n)})'
    )
