"""Speed and memory of U2Net training and inference (same-run comparisons with the official code:
`benchmarks/official_compare.py`).

Each case runs in a fresh subprocess, so that its peak host memory (VmHWM, the resident-set
high-water mark) is its own; the parent prints one table and writes all figures as JSON.

Cases (WV3: 8 bands, width 32, PAN guide; CAVE: 31 bands, width 64, RGB guide):
  sgemm            the machine's float32 matrix-product rate (2048^3), the yardstick of GFLOP/s
  train_wv3        one jitted training step (L1 loss, value_and_grad, Adam, donated state):
                   batch 16, MS 16x16, PAN 64x64 (the official training setting)
  train_cave       the same for CAVE: batch 8, HS 16x16 -> 64x64
  train_wv3_bf16   train_wv3 with `config.model.dtype = 'bfloat16'`
  rr256_tiled      one 256x256 reduced-resolution WV3 image, the official test.py tiling (64 px
                   PAN tiles with 4 px reflect margins, 25 tiles in jitted batches of
                   `config.eval.tile_batch`), via `tiling.Fuser`
  rr256_whole      the same image in one piece (the official code cannot: it asks for 34 GB)
  fr512_tiled      one 512x512 full-resolution image, tiled (81 tiles)
  fr512_whole      the same image in one piece (exact attention over 262,144 tokens)
  bf16_fidelity    the released WV3 weights on ../shared/official/wv2_rr_sample.h5, tiled, in
                   float32 and bfloat16: the reduced-resolution metrics of both and their gap

Timings are medians over `--repeats` calls after one warm-up call (which compiles); GFLOP/s
counts the useful work of the official (direct) computation -- from XLA's cost analysis of the
direct-attention program -- per second of the measured, blockwise program. Inputs are random
arrays already on the device: the input pipeline is not timed (in training it prefetches batches
to the device ahead of the step, off the critical path).

Usage (from the repository root)::

  python benchmarks/benchmark.py                    # all cases, full size (~15 min on 2 cores)
  python benchmarks/benchmark.py --quick            # tiny sizes, 4 cases (< 3 min; CI)
  python benchmarks/benchmark.py --cases=train_wv3,rr256_tiled --repeats=5

Writes `benchmarks/results/benchmark.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'official'
RESULTS = REPO / 'benchmarks' / 'results' / 'benchmark.json'
CASES = (
  'sgemm',
  'train_wv3',
  'train_cave',
  'train_wv3_bf16',
  'rr256_tiled',
  'rr256_whole',
  'fr512_tiled',
  'fr512_whole',
  'bf16_fidelity',
)
QUICK_CASES = ('sgemm', 'train_wv3', 'rr256_tiled', 'rr256_whole')

# ----------------------------------------------------------------------------------------------
# Child side: one case, printed as one JSON line.


def _peak_rss_gb() -> float:
  """This process's resident-set high-water mark (VmHWM), in GB."""
  try:
    for line in Path('/proc/self/status').read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024 / 1e9
  except OSError:
    pass
  import resource

  scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def _device_peak_gb():
  import jax

  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 1e9


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _config(name: str, quick: bool, dtype: str = 'float32'):
  from u2net_jax.run import config_utils

  config = config_utils.load_config_file(REPO / 'configs' / f'{name}.py')
  with config.unlocked():
    config.model.dtype = dtype
    if quick:  # Tiny: one head per level-0 S2Block, batch 2.
      config.model.width = 16
      config.train.batch_size = 2
      config.eval.tile_batch = 4
  return config


def _direct_flops(fn, *args) -> float:
  """FLOPs of `fn` (written with attention='direct': no loops) from XLA's cost analysis."""
  import jax

  return float(jax.jit(fn).lower(*args).cost_analysis()['flops'])


def case_sgemm(quick: bool, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  # An accelerator needs a larger product to reach its rate (2048^3 is ~0.1 ms on a GPU).
  n = 512 if quick else 2048 if jax.default_backend() == 'cpu' else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  seconds = _median_time(lambda: f(a).block_until_ready(), max(repeats, 5))
  return {'what': f'float32 {n}^3 matmul', 'time_s': seconds, 'gflops': 2 * n**3 / seconds / 1e9}


def case_train(name: str, quick: bool, repeats: int, dtype: str = 'float32') -> dict:
  import jax
  import jax.numpy as jnp

  from u2net_jax import models
  from u2net_jax.run import train_lib

  config = _config(name, quick, dtype)
  m = config.model
  b, h = config.train.batch_size, 8 if quick else 16
  keys = jax.random.split(jax.random.key(0), 3)
  batch = {
    'ms': jax.random.uniform(keys[0], (b, h, h, m.spectral_bands)),
    'guide': jax.random.uniform(keys[1], (b, 4 * h, 4 * h, m.guide_bands)),
    'gt': jax.random.uniform(keys[2], (b, 4 * h, 4 * h, m.spectral_bands)),
  }
  width = models.create_model(m).width  # The built model's width (unset in most configs).
  state = train_lib.create_train_state(config, jax.random.key(1), steps_per_epoch=1000)
  step = jax.jit(train_lib.train_step, donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  direct = models.create_model(m, attention='direct', dtype='float32')
  loss = lambda p, bt: jnp.mean(
    jnp.abs(direct.apply({'params': p}, bt['ms'], bt['guide']) - bt['gt'])
  )
  flops = _direct_flops(jax.value_and_grad(loss), state.params, batch)

  state, metrics = compiled(state, batch)  # Warm-up.
  metrics['loss'].block_until_ready()
  holder = [state]

  def one_step():
    holder[0], out = compiled(holder[0], batch)
    out['loss'].block_until_ready()

  seconds = _median_time(one_step, repeats)
  return {
    'what': f'train step, batch {b}, MS {h}x{h}, width {width}, {dtype}',
    'time_s': seconds,
    'per_sample_s': seconds / b,
    'samples_per_s': b / seconds,
    'gflop_per_sample': flops / b / 1e9,
    'achieved_gflops': flops / seconds / 1e9,
    'compile_s': compile_s,
    'loss': float(metrics['loss']),
  }


def _wv3_params(config, quick: bool):
  import jax

  from u2net_jax import convert, models

  pth = SHARED / 'u2net_wv3_200000_iter.pth'
  if not quick and pth.exists():
    return convert.torch_to_flax(convert.load_torch_state_dict(pth), config.model)
  return models.init_params(models.create_model(config.model), jax.random.key(0))


def case_infer(size: int, mode: str, quick: bool, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from u2net_jax import models
  from u2net_jax.infer import tiling

  config = _config('wv3', quick)
  size = 64 if quick else size
  params = _wv3_params(config, quick)
  m = config.model
  rng = np.random.default_rng(0)
  ms = rng.uniform(size=(size // 4, size // 4, m.spectral_bands)).astype(np.float32)
  guide = rng.uniform(size=(size, size, m.guide_bands)).astype(np.float32)
  direct = models.create_model(m, attention='direct')
  result = {}
  if mode == 'tiled':
    rows, cols = tiling.tile_grid(size, size, config.eval.tile_size)
    # Batches of at most config.eval.tile_batch tiles, balanced so that one image's last batch
    # is not mostly zero padding (25 tiles: 2 x 13, not 2 x 16).
    tile_batch = -(-rows * cols // -(-rows * cols // config.eval.tile_batch))
    fuser = tiling.Fuser(m, params, mode='tiled', tile_batch=tile_batch)
    side = fuser.tile + 2 * fuser.pad
    calls = -(-rows * cols // fuser.tile_batch)
    tiles_ms = jnp.zeros((fuser.tile_batch, side // 4, side // 4, m.spectral_bands))
    tiles_g = jnp.zeros((fuser.tile_batch, side, side, m.guide_bands))
    flops = calls * _direct_flops(
      lambda p, a, g: direct.apply({'params': p}, a, g), params, tiles_ms, tiles_g
    )
    result['what'] = (
      f'{size}x{size} image, {rows * cols} tiles of {side}x{side} in {calls} batches of '
      f'{fuser.tile_batch}'
    )
    run = lambda: fuser(ms, guide)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    seconds = _median_time(run, repeats)
    result['compile_s'] = max(first - seconds, 0.0)  # First call minus a steady one.
  else:
    model = models.create_model(m)
    apply = lambda p, a, g: jnp.clip(model.apply({'params': p}, a, g), 0.0, 1.0)
    flops = _direct_flops(
      lambda p, a, g: direct.apply({'params': p}, a, g), params, ms[None], guide[None]
    )
    result['what'] = f'{size}x{size} image in one piece ({size * size} tokens at level 0)'
    start = time.perf_counter()
    compiled = jax.jit(apply).lower(params, ms[None], guide[None]).compile()
    result['compile_s'] = time.perf_counter() - start
    run = lambda: np.asarray(compiled(params, ms[None], guide[None]))
    reps = repeats if quick else 1  # Whole images take minutes: one timed call.
    seconds = _median_time(run, reps)
  result.update(time_s=seconds, achieved_gflops=flops / seconds / 1e9, gflop=flops / 1e9)
  return result


def case_bf16_fidelity(quick: bool, repeats: int) -> dict:
  import h5py
  import numpy as np

  from u2net_jax import metrics
  from u2net_jax.infer import tiling

  path = SHARED / 'wv2_rr_sample.h5'
  if quick or not path.exists():
    return {'what': 'skipped (quick mode or ../shared absent)', 'skipped': True}
  with h5py.File(path, 'r') as f:
    data = {k: np.asarray(f[k], np.float64).transpose(0, 2, 3, 1) for k in ('gt', 'ms', 'pan')}
  result = {'what': 'released WV3 weights, wv2_rr_sample.h5 (2 x 128x128), tiled'}
  fused = {}
  for dtype in ('float32', 'bfloat16'):
    config = _config('wv3', False, dtype)
    fuser = tiling.Fuser(config.model, _wv3_params(config, False), mode='tiled')
    outs, rows = [], []
    start = time.perf_counter()
    for i in range(len(data['gt'])):
      out = fuser(
        (data['ms'][i] / 2047).astype(np.float32), (data['pan'][i] / 2047).astype(np.float32)
      )
      outs.append(out.astype(np.float64) * 2047)
      rows.append(metrics.reduced_resolution_metrics(data['gt'][i], outs[-1], 2047.0))
    result[f'{dtype}_s'] = time.perf_counter() - start
    fused[dtype] = np.stack(outs)
    result[dtype] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  ref = SHARED / 'official_tiled_wv2_rr_sample.npz'
  if ref.exists():
    sr = np.load(ref)['sr']
    result['float32_vs_official_max_abs'] = float(np.abs(fused['float32'] - sr).max())
    result['bfloat16_vs_official_max_abs'] = float(np.abs(fused['bfloat16'] - sr).max())
  gap = np.abs(fused['bfloat16'] - fused['float32'])
  result['bf16_vs_f32_max_abs'] = float(gap.max())
  result['bf16_vs_f32_mean_abs'] = float(gap.mean())
  result['time_s'] = result['bfloat16_s']
  return result


def run_case(name: str, quick: bool, repeats: int) -> dict:
  import jax

  cases = {
    'sgemm': lambda: case_sgemm(quick, repeats),
    'train_wv3': lambda: case_train('wv3', quick, repeats),
    'train_cave': lambda: case_train('cave', quick, repeats),
    'train_wv3_bf16': lambda: case_train('wv3', quick, repeats, 'bfloat16'),
    'rr256_tiled': lambda: case_infer(256, 'tiled', quick, repeats),
    'rr256_whole': lambda: case_infer(256, 'whole', quick, repeats),
    'fr512_tiled': lambda: case_infer(512, 'tiled', quick, repeats),
    'fr512_whole': lambda: case_infer(512, 'whole', quick, repeats),
    'bf16_fidelity': lambda: case_bf16_fidelity(quick, repeats),
  }
  result = cases[name]()
  result.update(case=name, peak_rss_gb=_peak_rss_gb(), device_peak_gb=_device_peak_gb())
  result['platform'] = jax.default_backend()
  return result


# ----------------------------------------------------------------------------------------------
# Parent side: subprocesses, the table and the JSON.


def _platform() -> dict:
  import jax

  devices = jax.devices()
  return {
    'backend': jax.default_backend(),
    'device_count': len(devices),
    'device_kind': devices[0].device_kind,
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'processor': platform.processor(),
    'python': platform.python_version(),
    'jax': jax.__version__,
  }


def _spawn(name: str, args) -> dict:
  cmd = [sys.executable, __file__, f'--child={name}', f'--repeats={args.repeats}']
  if args.quick:
    cmd.append('--quick')
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
  wall = time.perf_counter() - start
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  if proc.returncode or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {'case': name, 'error': f'exit {proc.returncode}: ' + ' | '.join(tail), 'wall_s': wall}
  result = json.loads(lines[-1])
  result['wall_s'] = wall
  return result


def _fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def format_table(results: list[dict], sgemm_gflops, quick: bool = False) -> str:
  """The markdown table."""
  header = (
    '| case | what | time (s) | s/sample | samples/s | GFLOP/s (% sgemm) | compile (s) '
    '| peak RSS (GB) | device peak (GB) |'
  )
  lines = [header, '|' + '---|' * 9]
  for r in results:
    if 'error' in r:
      lines.append(f'| {r["case"]} | ERROR: {r["error"][:120]} |' + ' |' * 7)
      continue
    gf = r.get('achieved_gflops') if r['case'] != 'sgemm' else r.get('gflops')
    pct = f' ({100 * gf / sgemm_gflops:.0f}%)' if gf and sgemm_gflops else ''
    lines.append(
      f'| {r["case"]} | {r["what"]} | {_fmt(r.get("time_s"), ".2f")} '
      f'| {_fmt(r.get("per_sample_s"), ".3f")} | {_fmt(r.get("samples_per_s"), ".2f")} '
      f'| {_fmt(gf, ".1f")}{pct} | {_fmt(r.get("compile_s"), ".1f")} '
      f'| {_fmt(r.get("peak_rss_gb"), ".2f")} | {_fmt(r.get("device_peak_gb"), ".2f")} |'
    )
  for r in results:
    if r['case'] == 'bf16_fidelity' and not r.get('skipped') and 'error' not in r:
      lines.append('')
      lines.append('| compute dtype | PSNR | Q2n | SAM | ERGAS | SCC | max abs diff vs official |')
      lines.append('|---|---|---|---|---|---|---|')
      for dt in ('float32', 'bfloat16'):
        m = r[dt]
        lines.append(
          f'| {dt} | {m["PSNR"]:.3f} | {m["Q2n"]:.4f} | {m["SAM"]:.4f} | {m["ERGAS"]:.4f} '
          f'| {m["SCC"]:.4f} | {_fmt(r.get(f"{dt}_vs_official_max_abs"), ".3g")} |'
        )
      lines.append(
        f'\nbfloat16 vs float32 output (0..2047 scale): max |diff| {r["bf16_vs_f32_max_abs"]:.3g}, '
        f'mean {r["bf16_vs_f32_mean_abs"]:.3g}; time {r["float32_s"]:.1f} s (float32) vs '
        f'{r["bfloat16_s"]:.1f} s (bfloat16) for 2 images'
      )
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny sizes (CI, < 3 min)')
  parser.add_argument(
    '--cases',
    default=None,
    help=f'comma-separated, from {CASES} (default: all; --quick: {QUICK_CASES})',
  )
  parser.add_argument('--repeats', type=int, default=3, help='timed calls per case (median)')
  parser.add_argument('--out', default=str(RESULTS), help='JSON output path')
  parser.add_argument('--timeout', type=float, default=None, help='seconds per case')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  sys.path.insert(0, str(REPO))
  if args.child:
    print(json.dumps(run_case(args.child, args.quick, args.repeats)), flush=True)
    return 0

  spec = args.cases or ','.join(QUICK_CASES if args.quick else CASES)
  cases = [c.strip() for c in spec.split(',') if c.strip()]
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f'unknown cases {unknown}; choose from {CASES}')
  if 'sgemm' not in cases:  # GFLOP/s are reported against this run's own sgemm rate.
    cases.insert(0, 'sgemm')
  info = _platform()
  print(
    f'platform: {info["backend"]} x{info["device_count"]} ({info["device_kind"]}), '
    f'{info["cpu_count"]} CPUs, jax {info["jax"]}; quick={args.quick}',
    flush=True,
  )
  results = []
  for name in cases:
    print(f'running {name} ...', flush=True)
    results.append(_spawn(name, args))
    r = results[-1]
    print(
      f'  {name}: ' + ('ERROR ' + r['error'] if 'error' in r else f'{r.get("time_s", 0):.2f} s'),
      flush=True,
    )
  sgemm = next((r.get('gflops') for r in results if r['case'] == 'sgemm'), None)
  table = format_table(results, sgemm, args.quick)
  print(table)
  if (
    info['backend'] != 'cpu' and sgemm
  ):  # MFU: against the device's own measured float32 matmul rate.
    print(
      f'{info["device_kind"]}: "% sgemm" is the model FLOP utilisation (MFU) against this '
      f"device's measured float32 matmul rate ({sgemm:.0f} GFLOP/s); device peak memory is "
      'the "device peak (GB)" column (peak_bytes_in_use)'
    )
  write_report(
    args.out,
    'benchmark.py',
    results,
    table,
    platform_info=info,
    quick=args.quick,
    sgemm_gflops=sgemm,
  )
  return 1 if any('error' in r for r in results) else 0


def write_report(
  path, script: str, results: list, table: str, platform_info: dict | None = None, **extra
) -> Path:
  """Writes a benchmark's JSON report (atomically) and says where.

  Args:
    path: the output file.
    script: the benchmark's file name under benchmarks/, for the recorded command.
    results: one dict per case.
    table: the printed markdown table.
    platform_info: `_platform()`, when the caller already has it.
    **extra: further top-level fields.

  Returns:
    The written path.
  """
  from u2net_jax.io import fileio

  report = {
    'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'command': ' '.join([Path(sys.executable).name, f'benchmarks/{script}'] + sys.argv[1:]),
    **extra,
    'platform': platform_info or _platform(),
    'load_average_at_end': os.getloadavg() if hasattr(os, 'getloadavg') else None,
    'results': results,
    'table': table,
  }
  out = fileio.atomic_write_text(path, json.dumps(report, indent=2))
  print(f'wrote {out}')
  return out


if __name__ == '__main__':
  sys.exit(main())
