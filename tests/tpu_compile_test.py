"""Cloud TPU checked without a TPU: the project's programs compiled ahead of time for real
topologies (`benchmarks/tpu_compile.py`), their per-chip memory bounded.

libtpu compiles for a topology described by name, with no TPU attached (`.ci/run` installs it: the
`tpu` extra, `jax[tpu]` of the pinned release); without it the compile tests skip, with the
reason. The compiles run in one subprocess of the benchmark script: libtpu stays out of the test
workers (it takes a process lock and would register a TPU platform beside the CPU one), and the
test checks the command a user runs. The attention's analytic FLOP count is checked against XLA's
own count of the direct form, on CPU.
"""

import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO, run_script, script_env

from u2net_jax.models import attention

SCRIPT = REPO / 'benchmarks' / 'tpu_compile.py'

# (config, topology, program) -> per-chip GiB that a change must not exceed: the measured figure
# (README, "Colab and Cloud TPU") plus ~25%. Every topology, both configs and both programs
# occur; the two lists compile in two processes at once (~70 s of CPU each).
PROCESSES = (
  {('wv3', 'v5e:2x2', 'train'): 0.6, ('cave', 'v5e:1x1', 'infer'): 1.0},  # 0.47, 0.81 GiB.
  {('cave', 'v4:2x2x1', 'train'): 0.5, ('wv3', 'v5e:1x1', 'infer'): 0.8},  # 0.38, 0.62 GiB.
)
BOUNDS_GIB = {case: bound for cases in PROCESSES for case, bound in cases.items()}


def _tpu_compile_module():
  spec = importlib.util.spec_from_file_location('u2net_tpu_compile', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def test_attention_flops_match_xla_count_of_the_direct_form():
  # Per level, the forward pass is q k^T and p v: 4 N^2 d. XLA counts the direct form (no loop)
  # exactly; the blockwise form, whose loop bodies XLA counts once, is counted by this formula.
  n, heads, d = 256, 2, 16
  q = jax.ShapeDtypeStruct((1, n, heads, d), jnp.float32)
  cost = jax.jit(attention.direct_attention).lower(q, q, q).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  matmuls = 4 * n * n * heads * d
  assert matmuls <= cost['flops'] <= 1.1 * matmuls  # The rest is the softmax's elementwise work.

  tc = _tpu_compile_module()
  model = type('Model', (), {'width': 8})()
  side = 16  # Levels: 16^2 tokens at width 8 (twice), 8^2 at 16 (twice), 4^2 at 32.
  per_level = lambda side, width: 4 * (side * side) ** 2 * width
  expected = 2 * per_level(16, 8) + 2 * per_level(8, 16) + per_level(4, 32)
  assert tc.attention_flops(model, side, batch=3, training=False) == 3 * expected
  assert tc.attention_flops(model, side, batch=3, training=True) == 3 * expected * 14 / 4


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason='libtpu is not installed: pip install -e ".[tpu]" (jax[tpu] of the pinned jax release)',
)
def test_train_step_and_whole_image_inference_fit_tpu_chips(tmp_path):
  # The suite's CPU-only setting (JAX_PLATFORMS=cpu) would hide libtpu's compile-only devices;
  # libtpu's process lock is lifted for the two processes.
  env = {**script_env(), 'JAX_PLATFORMS': '', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  procs = []
  for i, cases in enumerate(PROCESSES):
    flags = ['--cases=' + ','.join('/'.join(case) for case in cases), '--max_batch=none']
    flags.append(f'--json={tmp_path / f"tpu{i}.json"}')
    log = tmp_path / f'tpu{i}.log'
    procs.append((run_script(str(SCRIPT), *flags, env=env, wait=False, log=log), log))
  for proc, log in procs:
    try:
      assert proc.wait(timeout=600) == 0, log.read_text()
    finally:
      proc.kill()
  rows = {}
  for i in range(len(PROCESSES)):
    for r in json.loads((tmp_path / f'tpu{i}.json').read_text()):
      rows[r['config'], r['topology'], r['program']] = r
  assert set(rows) == set(BOUNDS_GIB)
  for case, bound in BOUNDS_GIB.items():
    row = rows[case]
    assert row['devices'] == {'v5e:1x1': 1, 'v5e:2x2': 4, 'v4:2x2x1': 4}[case[1]]
    assert 0 < row['chip_gib'] <= bound < row['hbm_gib'], (case, row)
    assert row['tflops'] > 0
