"""Cloud TPU memory and FLOPs of U2Net, compiled ahead of time on a machine without a TPU.

libtpu (`pip install -e ".[tpu]"`, i.e. `jax[tpu]` of the pinned release) compiles for a TPU
topology described by name (`jax.experimental.topologies.get_topology_desc`) with no TPU attached.
Each program is the project's own: the jitted train step of `train_lib.compile_steps` (batch
sharded over the topology's devices by `sharding.create_mesh`, state replicated and donated) at
the paper's batch and patch sizes, and the whole-image inference of `tiling.fused_output` (one
image per device). From the compiled executable:

  per-chip memory  `memory_analysis()`: arguments + outputs - donated (aliased) + temporaries +
                   code, against the chip's HBM;
  FLOPs            XLA's `cost_analysis()` for everything but the spatial attention (XLA counts a
                   loop body once, so the blockwise attention's loops are counted analytically:
                   `attention_flops`), summed over the devices;
  largest batch    the per-chip memory is taken as affine in the local batch: the replicated
                   state (or parameters) and the code fixed, all the rest per example (a lower
                   bound: gradients and optimizer temporaries do not grow with the batch); the
                   largest local batch below the HBM, times the devices (the global batch).
                   `--max_batch=compile` measures the slope from a second compile instead.

Usage (from the repository root; ~2 min on 2 CPU cores)::

  python benchmarks/tpu_compile.py                        # every config x topology
  python benchmarks/tpu_compile.py --configs=wv3 --topologies=v5e:2x2

`tests/tpu_compile_test.py` compiles the same programs and bounds their memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# libtpu takes a lock file per process; compile-only use can share the library between processes.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# Without a TPU VM's metadata server, libtpu's lookups only produce warnings.
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU slice: its name for `get_topology_desc`, the chip's HBM, extra arguments."""

  name: str
  hbm_gib: float  # Per device: v5e 16 GiB; v4 32 GiB per chip (one megacore device per chip).
  kwargs: tuple = ()
  note: str = ''


TOPOLOGIES = {
  t.name: t
  for t in (
    # One v5e chip: Colab's TPU runtime. A single-chip host needs its own host bounds.
    Topology('v5e:1x1', 16, (('chips_per_host_bounds', (1, 1, 1)),), 'Colab TPU (1 chip)'),
    Topology('v5e:2x2', 16, (), 'v5litepod-4 (1 host)'),
    # v4 chips have two TensorCores; megacore makes them one device of the chip's 32 GiB.
    Topology('v4:2x2x1', 32, (('chip_config_name', 'megacore'),), 'v4-8 (megacore)'),
  )
}

# The paper's recipes: batch, training patch (guide side), whole test image (guide side).
CONFIGS = {
  'wv3': dict(file='wv3.py', patch=64, image=512, image_note='WV3 full resolution 512x512'),
  'cave': dict(file='cave.py', patch=64, image=512, image_note='CAVE test scene 512x512'),
}


def topology(name: str):
  """The compile-only TPU topology `name` (needs libtpu)."""
  from jax.experimental import topologies

  return topologies.get_topology_desc(name, 'tpu', **dict(TOPOLOGIES[name].kwargs))


def load_config(name: str):
  """`configs/<name>.py` of `CONFIGS`, finalized."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from u2net_jax.run import config_utils

  return config_utils.load_config_file(str(REPO / 'configs' / CONFIGS[name]['file']))


def attention_flops(model, guide_side: int, batch: int, training: bool) -> float:
  """FLOPs of the spatial attention of all five S2Blocks (matrix products only), global batch.

  Level widths are S, 2S, 4S, 2S, S at guide sides H, H/2, H/4, H/2, H (N = side^2 tokens); per
  example and level the forward pass is q k^T and p v, 2 * (2 N^2 d) with d = heads * head_dim =
  the level's width. The blockwise backward recomputes q k^T and forms dv, dp, dq, dk: 5 more
  products, so a training step costs 14 N^2 d against the forward's 4 N^2 d.
  """
  s = model.width
  levels = ((guide_side, s), (guide_side // 2, 2 * s), (guide_side // 4, 4 * s))
  levels += ((guide_side // 2, 2 * s), (guide_side, s))
  per_example = sum(4 * (side * side) ** 2 * width for side, width in levels)
  return batch * per_example * (14 / 4 if training else 1)


def _loop_free_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get('flops', 0.0))


def _nbytes(tree) -> int:
  """Bytes of a tree of (abstract) arrays, e.g. the replicated train state on one device."""
  import jax

  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def chip_bytes(compiled) -> int:
  """Per-device HBM of a compiled program: live arguments, outputs, temporaries and code."""
  m = compiled.memory_analysis()
  return int(
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
    + m.generated_code_size_in_bytes
  )


def compile_train(config, topo, batch: int, patch: int, effort: float = -1.0):
  """The project's jitted train step, compiled for `topo` at a global `batch` of `patch` px."""
  import jax
  import jax.numpy as jnp

  from u2net_jax import models
  from u2net_jax.run import sharding, train_lib

  mesh = sharding.create_mesh(topo.devices)
  model = models.create_model(config.model)
  p_train, _ = train_lib.compile_steps(mesh, models.BatchApply(model), config.model.scale)
  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state = jax.eval_shape(
    lambda p: train_lib.create_train_state(config, None, 1, params=p), models.abstract_params(model)
  )
  state = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
  )
  ms = patch // model.scale
  c, g = model.spectral_bands, model.guide_bands
  shapes = {'ms': (ms, ms, c), 'guide': (patch, patch, g), 'gt': (patch, patch, c)}
  data = {
    k: jax.ShapeDtypeStruct((batch, *v), jnp.float32, sharding=batched) for k, v in shapes.items()
  }
  options = {'exec_time_optimization_effort': effort}
  return model, p_train.lower(state, data).compile(compiler_options=options), _nbytes(state)


def compile_inference(config, topo, images: int, side: int, effort: float = -1.0):
  """`tiling.fused_output` on `images` whole images of guide side `side`, one batch sharded."""
  import jax
  import jax.numpy as jnp

  from u2net_jax import models
  from u2net_jax.infer import tiling
  from u2net_jax.run import sharding

  mesh = sharding.create_mesh(topo.devices)
  model = models.create_model(config.model)
  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    models.abstract_params(model),
  )
  ms = side // model.scale
  spec = lambda *shape: jax.ShapeDtypeStruct((images, *shape), jnp.float32, sharding=batched)
  lowered = tiling.fused_output.lower(
    model, params, spec(ms, ms, model.spectral_bands), spec(side, side, model.guide_bands)
  )
  options = {'exec_time_optimization_effort': effort}
  return model, lowered.compile(compiler_options=options), _nbytes(params)


def measure(
  config_name: str, topo_name: str, program: str, effort: float = -1.0, max_batch: bool | str = True
) -> dict:
  """One row: per-chip memory at the paper's batch, global FLOPs, the largest batch that fits."""
  topo = topology(topo_name)
  devices = len(topo.devices)
  config = load_config(config_name)
  info = CONFIGS[config_name]
  start = time.perf_counter()
  if program == 'train':
    batch, side = config.train.batch_size, info['patch']
    build = lambda b: compile_train(config, topo, b, side, effort)
  else:
    batch, side = devices, info['image']  # One whole image per device.
    build = lambda b: compile_inference(config, topo, b, side, effort)
  model, compiled, state_bytes = build(batch)
  per_chip = chip_bytes(compiled)
  hbm = TOPOLOGIES[topo_name].hbm_gib * GIB
  max_local = slope = 0
  if max_batch == 'compile':
    # A second, larger local batch gives the per-example slope of the (affine) per-chip memory.
    _, bigger, _ = build(batch + devices)
    slope = max(1, chip_bytes(bigger) - per_chip)
  elif max_batch:
    # One compile: what does not grow with the batch is the replicated state (or parameters)
    # and the code; the rest (activations, the batch) is per example.
    fixed = state_bytes + compiled.memory_analysis().generated_code_size_in_bytes
    slope = max(1, (per_chip - fixed) // max(1, batch // devices))
  if max_batch:
    max_local = int((hbm - (per_chip - slope * (batch // devices))) // slope)
  flops = _loop_free_flops(compiled) * devices + attention_flops(
    model, side, batch, program == 'train'
  )
  return {
    'config': config_name,
    'topology': topo_name,
    'devices': devices,
    'program': program,
    'batch': batch,
    'side': side,
    'chip_gib': per_chip / GIB,
    'hbm_gib': TOPOLOGIES[topo_name].hbm_gib,
    'per_example_gib': slope / GIB,
    'max_chip_batch': max(0, max_local) if max_batch else None,
    'max_global_batch': max(0, max_local) * devices if max_batch else None,
    'tflops': flops / 1e12,
    'compile_s': time.perf_counter() - start,
  }


def _fits(row: dict) -> str:
  if row['max_chip_batch'] is None:
    return '-'
  return f'{row["max_chip_batch"]} ({row["max_global_batch"]})'


def table(rows: list[dict]) -> str:
  lines = [
    '| config | topology (devices) | program | batch | per-chip memory (GiB) / HBM | '
    'TFLOP per call | largest batch per chip (global) |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    what = (
      f'train step, {r["side"]}px patches'
      if r['program'] == 'train'
      else (f'whole {r["side"]}x{r["side"]} image per device')
    )
    lines.append(
      f'| {r["config"]} | {r["topology"]} ({r["devices"]}) | {what} | {r["batch"]} | '
      f'{r["chip_gib"]:.2f} / {r["hbm_gib"]:g} | {r["tflops"]:.2f} | '
      f'{_fits(r)} |'
    )
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(CONFIGS), help=f'from {list(CONFIGS)}')
  parser.add_argument('--topologies', default=','.join(TOPOLOGIES), help=f'from {list(TOPOLOGIES)}')
  parser.add_argument('--programs', default='train,infer', help='train, infer')
  parser.add_argument(
    '--cases', default='', help='instead: config/topology/program triples, e.g. wv3/v5e:2x2/train'
  )
  parser.add_argument(
    '--max_batch',
    default='estimate',
    choices=('estimate', 'compile', 'none'),
    help='largest batch: from one compile (state + code fixed, the rest per example), from a '
    'second compile at a larger batch, or not at all',
  )
  parser.add_argument(
    '--effort', type=float, default=-1.0, help='XLA exec_time_optimization_effort (-1: fastest)'
  )
  parser.add_argument('--json', default='', help='also write the rows to this JSON file')
  args = parser.parse_args(argv)
  import importlib.util

  if importlib.util.find_spec('libtpu') is None:
    print('skipped: libtpu is not installed (pip install -e ".[tpu]")')
    return 0
  if args.cases:
    cases = [tuple(c.split('/')) for c in args.cases.split(',')]
  else:
    cases = [
      (c, t, p)
      for c in args.configs.split(',')
      for t in args.topologies.split(',')
      for p in args.programs.split(',')
    ]
  rows = []
  for config_name, topo_name, program in cases:
    max_batch = {'estimate': True, 'compile': 'compile', 'none': False}[args.max_batch]
    row = measure(config_name, topo_name, program, args.effort, max_batch)
    print(
      f'{config_name} {topo_name} {program}: {row["chip_gib"]:.2f} GiB/chip, '
      f'{row["tflops"]:.2f} TFLOP, compiled in {row["compile_s"]:.1f} s',
      flush=True,
    )
    rows.append(row)
  print(table(rows))
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
