"""Timing of the fusion metrics on one CPU core (issue 3's speed targets).

Targets: the full reduced-resolution set on a 256x256x8 image in under 0.5 s, the full
full-resolution set on 512x512x8 in under 3 s. The images are synthetic (smooth random fields on
the 11-bit scale), so the script needs no data; the metrics' cost does not depend on the content.

Usage (from the repository root)::

  python benchmarks/metrics_benchmark.py           # 5 repeats, median, all sets
  python benchmarks/metrics_benchmark.py --quick   # 1 repeat, the two targeted sets only

Prints a table (metric set, image size, seconds, target) and writes it as JSON to
`benchmarks/results/metrics_benchmark.json` (gitignored).
"""

import os

# One core: pin the BLAS/OpenMP pools before numpy is imported, and the process to one CPU.
for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS', 'NUMEXPR_NUM_THREADS'):
  os.environ[_var] = '1'
if hasattr(os, 'sched_setaffinity'):
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from u2net_jax import metrics  # noqa: E402
from u2net_jax.io import fileio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results' / 'metrics_benchmark.json'


def _image(h, w, c, seed, scale=2047.0):
  """Smooth positive random image, values in [0, scale]."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(h, w, c))
  for axis in (0, 1):
    x = sum(np.roll(x, s, axis=axis) for s in range(-3, 4))
  x = (x - x.min()) / (x.max() - x.min())
  return scale * (0.1 + 0.8 * x + 0.02 * np.arange(c) / c)


def _time(fn, repeats):
  fn()  # Warm-up: imports, caches (MTF kernels), page faults.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _cases(quick):
  """(metric set, size string, callable, target seconds or None, breakdown) tuples."""
  gt = _image(256, 256, 8, seed=0)
  out = np.clip(gt + _image(256, 256, 8, seed=1) * 0.05 - 50, 0, 2047)
  crop_gt, crop_out = gt[20:-21, 20:-21], out[20:-21, 20:-21]
  rr_parts = {
    'PSNR': lambda: metrics.psnr(gt / 2047, out / 2047),
    'Q2n': lambda: metrics.q2n(crop_gt, crop_out),
    'Q_avg': lambda: metrics.q_index(crop_gt, crop_out),
    'SAM': lambda: metrics.sam(crop_gt, crop_out),
    'ERGAS': lambda: metrics.ergas(crop_gt, crop_out),
    'SCC': lambda: metrics.scc(crop_gt, crop_out),
  }
  yield (
    'reduced resolution (all 6)',
    '256x256x8',
    lambda: metrics.reduced_resolution_metrics(gt, out, 2047),
    0.5,
    rr_parts,
  )

  lms = _image(512, 512, 8, seed=2)
  fused = np.clip(lms + _image(512, 512, 8, seed=3) * 0.05 - 50, 0, 2047)
  pan = _image(512, 512, 1, seed=4)[:, :, 0]
  fr_parts = {
    'D_lambda': lambda: metrics.d_lambda(fused, lms),
    'D_s': lambda: metrics.d_s(fused, lms, pan),
    'D_lambda_K': lambda: metrics.d_lambda_k(fused, lms, 'WV3'),
  }
  yield (
    'full resolution (all 5)',
    '512x512x8',
    lambda: metrics.full_resolution_metrics(fused, lms, pan, 'WV3'),
    3.0,
    fr_parts,
  )

  if not quick:
    ref = _image(512, 512, 31, seed=5, scale=1.0)
    est = np.clip(ref + _image(512, 512, 31, seed=6, scale=0.02) - 0.01, 0, 1)
    yield ('HISR (all 4)', '512x512x31', lambda: metrics.hisr_metrics(ref, est), None, {})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='1 repeat, targeted sets only')
  parser.add_argument('--repeats', type=int, default=None, help='timed runs per entry (median)')
  args = parser.parse_args(argv)
  repeats = args.repeats or (1 if args.quick else 5)

  rows = []
  for name, size, fn, target, parts in _cases(args.quick):
    rows.append({'set': name, 'size': size, 'seconds': _time(fn, repeats), 'target_s': target})
    for part, part_fn in parts.items():
      rows.append({'set': f'  {part}', 'size': size, 'seconds': _time(part_fn, repeats)})

  header = f'{"metric set":30s} {"image":>11s} {"seconds":>9s}  target'
  print(header)
  print('-' * len(header))
  for r in rows:
    target = r.get('target_s')
    verdict = (
      '' if target is None else f'< {target:g} s ' + ('ok' if r['seconds'] < target else 'MISSED')
    )
    print(f'{r["set"]:30s} {r["size"]:>11s} {r["seconds"]:9.3f}  {verdict}')

  record = {
    'repeats': repeats,
    'statistic': 'median',
    'threads': 1,
    'cpu': platform.processor() or platform.machine(),
    'python': platform.python_version(),
    'numpy': np.__version__,
    'rows': rows,
  }
  fileio.atomic_write_text(RESULTS, json.dumps(record, indent=2) + '\n')
  print(f'\nwrote {RESULTS}')
  missed = [r['set'] for r in rows if r.get('target_s') and r['seconds'] >= r['target_s']]
  return 1 if missed else 0


if __name__ == '__main__':
  sys.exit(main())
