"""Archive fusion (`fuse.py --scenes`, `u2net_jax.infer.archive`): scenes per hour on a Dask
LocalCluster with 1 and 2 worker processes, against a plain loop of single `fuse.py` runs.

The same set of small synthetic scenes (uint16 GeoTIFF pairs, 8-band MS) is fused three ways in
one run, each from nothing (fresh output folder, no compilation cache):

  loop        one `python fuse.py --pan --ms --out --cog` subprocess per scene, one after the
              other (what a shell loop does: imports, weights and compilation paid per scene);
  workers=1   `python fuse.py --scenes=... --workers=1`;
  workers=2   `python fuse.py --scenes=... --workers=2`.

Each archive case is timed end to end (its subprocess: imports, cluster start, weight loading
and compilation per worker, fusion, summary); the peak resident set of each worker process is
its `VmHWM` after its last scene (`summary.json`, `worker_peak_rss_mb`). The model is the V2
variant at width 4 (as in `scene_benchmark.py`: what is measured is the orchestration, not the
network) with the official 64-px tiles.

Usage (from the repository root)::

  python benchmarks/archive_benchmark.py                # 8 scenes of 512^2: ~5 min on 2 cores
  python benchmarks/archive_benchmark.py --scenes=4 --size=256

Writes `benchmarks/results/archive_benchmark.json` (or `--out`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results' / 'archive_benchmark.json'
TINY_MODEL = {'width': 4, 'head_dim': 4, 'variant': 'v2_concat'}


def prepare(folder: Path, scenes: int, size: int) -> Path:
  """A workdir with random weights and `scenes` GeoTIFF pairs of `size`^2 PAN pixels."""
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import numpy as np
  from scene_benchmark import PAN_PIXEL, _synthetic_fill, _write_tiff

  from u2net_jax import models
  from u2net_jax.run import checkpointing, config_utils

  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
  with config.unlocked():
    config.model.update(TINY_MODEL)
  workdir = folder / 'workdir'
  config_utils.save_config(config, workdir)
  rng = np.random.default_rng(0)
  model = models.create_model(config.model)
  params = models.abstract_params(model)
  import jax

  params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.05, x.shape).astype(x.dtype), params)
  checkpointing.save_params(workdir, params)
  inputs = folder / 'in'
  inputs.mkdir()
  for i in range(scenes):
    _write_tiff(inputs / f's{i:03d}_pan.tif', size, size, 1, PAN_PIXEL, _synthetic_fill(size, 1, i))
    quarter = size // 4
    _write_tiff(
      inputs / f's{i:03d}_ms.tif',
      quarter,
      quarter,
      8,
      4 * PAN_PIXEL,
      _synthetic_fill(quarter, 8, i),
    )
  return workdir


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)  # Every case compiles from nothing.
  return env


def run_loop(folder: Path, workdir: Path) -> dict:
  """One `fuse.py` subprocess per scene."""
  out = folder / 'loop'
  start = time.perf_counter()
  pans = sorted((folder / 'in').glob('*_pan.tif'))
  for pan in pans:
    ms = pan.with_name(pan.name.replace('_pan', '_ms'))
    cmd = [sys.executable, 'fuse.py', f'--workdir={workdir}', f'--pan={pan}', f'--ms={ms}']
    cmd += [f'--out={out / pan.name}', '--cog', '--noprogress']
    subprocess.run(cmd, cwd=REPO, env=_env(), check=True, capture_output=True)
  seconds = time.perf_counter() - start
  return {'case': 'loop', 'seconds': seconds, 'scenes': len(pans), 'peak_rss_mb': None}


def run_archive(folder: Path, workdir: Path, workers: int) -> dict:
  """`fuse.py --scenes` with `workers` LocalCluster worker processes."""
  out = folder / f'workers{workers}'
  scenes = f'{folder}/in/*_pan.tif,{folder}/in/*_ms.tif'
  cmd = [sys.executable, 'fuse.py', f'--workdir={workdir}', f'--scenes={scenes}']
  cmd += [f'--out_dir={out}', f'--workers={workers}', '--dashboard_address=:0', '--noprogress']
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(done.stderr[-3000:])
  from u2net_jax.io import naming

  summary = json.loads(naming.output_path(out, 'summary', ext='json').read_text())
  peaks: dict[int, float] = {}
  for row in summary['rows']:
    peaks[row['worker_pid']] = max(peaks.get(row['worker_pid'], 0), row['worker_peak_rss_mb'])
  return {
    'case': f'workers={workers}',
    'seconds': seconds,
    'scenes': summary['done'],
    'peak_rss_mb': max(peaks.values()),
    'workers_used': len(peaks),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scenes', type=int, default=8, help='synthetic scenes')
  parser.add_argument('--size', type=int, default=512, help='PAN side in pixels')
  parser.add_argument('--out', type=Path, default=RESULTS, help='the JSON results')
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory(prefix='archive_bench_') as tmp:
    folder = Path(tmp)
    workdir = prepare(folder, args.scenes, args.size)
    rows.append(run_loop(folder, workdir))
    for workers in (1, 2):
      rows.append(run_archive(folder, workdir, workers))
  loop = rows[0]['seconds']
  for r in rows:
    r['scenes_per_hour'] = r['scenes'] / r['seconds'] * 3600
    r['vs_loop'] = loop / r['seconds']
  result = {
    'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    'command': ' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    'cpus': os.cpu_count(),
    'load_average': os.getloadavg(),
    'scenes': args.scenes,
    'size': args.size,
    'rows': rows,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1))
  print(f'{args.scenes} scenes of {args.size}^2 PAN, load average {os.getloadavg()[0]:.1f}\n')
  print('| case | wall (s) | scenes/h | x loop | peak RSS per worker (MB) |')
  print('|---|---|---|---|---|')
  for r in rows:
    peak = f'{r["peak_rss_mb"]:.0f}' if r['peak_rss_mb'] else '-'
    print(
      f'| {r["case"]} | {r["seconds"]:.1f} | {r["scenes_per_hour"]:.0f} | {r["vs_loop"]:.2f} '
      f'| {peak} |'
    )


if __name__ == '__main__':
  main()
