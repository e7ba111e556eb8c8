"""The classical methods (`u2net_jax.methods`) timed beside the toolbox's MATLAB code in Octave.

Every method registered in `u2net_jax.methods.METHODS` runs on the same images as the benchmark
toolbox's MATLAB function, which runs unmodified in GNU Octave through the shared driver
(`../shared/toolbox/run_methods.py`, loaded at run time, never copied; it times each call with
tic/toc, so Octave's start-up and file I/O are not counted). The two sides alternate in rounds
within one run (round 1: Octave then ours, round 2: ours then Octave, ...), so that both see the
same machine load; the table gives the medians over the rounds and the median of the per-round
ratios (Octave s / ours s), and the largest deviation of our output from Octave's (relative to
the sensor maximum 2047). Our side is timed after one warm-up call (cached kernels, compiled
functions), one call per round.

Images: the shared WorldView-2 samples (`../shared/official/wv2_rr_sample.h5` image 0, 128 x 128
PAN; `wv2_fr_sample.h5` image 0, 256 x 256), called as the toolbox's demos call the methods
(`I_MS` is the file's `lms`). C-GSA gets the same segmentation on both sides (our seeded k-means,
given to the driver as `S_seg`), so both time `gen_LP_image` + `GS_Segm`. PRACS needs `regress`:
without octave-statistics the driver runs with the stand-in of
`tests/data/toolbox/make_cs_refs.py`.

usage:
  python benchmarks/classical_benchmark.py                     # both images, 3 rounds (~10 min)
  python benchmarks/classical_benchmark.py --images=rr --rounds=1 --methods=gs,bdsd
  python benchmarks/classical_benchmark.py --blas_threads=2        # OpenBLAS threads (default 1)
Writes `benchmarks/results/classical_benchmark.json` (or `--out`) and prints a markdown table.
Without octave or ../shared it prints the reason and exits 0.
"""

from __future__ import annotations

import os
import sys

# BLAS threads for both sides, set before numpy loads OpenBLAS (and passed to Octave's
# environment): 1 by default. The problems are small (128^2 to 256^2 pixels, <= 9 columns), and
# on a loaded 2-core machine OpenBLAS's spinning threads made a 16384 x 9 QR 30x slower.
BLAS_THREADS = next(
  (a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--blas_threads=')), '1'
)
for _var in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ[_var] = BLAS_THREADS

import argparse  # noqa: E402
import csv  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))
sys.path.insert(0, str(REPO / 'tests' / 'data' / 'toolbox'))

SHARED = REPO.parent / 'shared'
DRIVER = SHARED / 'toolbox' / 'run_methods.py'
RESULTS = REPO / 'benchmarks' / 'results' / 'classical_benchmark.json'
IMAGES = {
  'rr': ('wv2_rr_sample.h5', 0),
  'fr': ('wv2_fr_sample.h5', 0),
}


def _load(file: str, index: int):
  import h5py

  with h5py.File(SHARED / 'official' / file, 'r') as f:
    lms = np.asarray(f['lms'][index], np.float64).transpose(1, 2, 0)
    pan = np.asarray(f['pan'][index, 0], np.float64)
    ms = np.asarray(f['ms'][index], np.float64).transpose(1, 2, 0)
  return lms, pan, ms


def _octave_round(in_mat: Path, names: list[str], work: Path, env: dict) -> tuple[dict, dict]:
  """One driver run: {toolbox name: Octave seconds}, {toolbox name: output}."""
  dest = work / 'octave_out'
  shutil.rmtree(dest, ignore_errors=True)
  cmd = [sys.executable, str(DRIVER), 'mat', str(in_mat), str(dest), '--methods', ','.join(names)]
  subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  with open(dest / 'times.csv') as f:
    times = {row['method']: float(row['octave_seconds']) for row in csv.DictReader(f)}
  outs = {}
  for name in times:
    with np.load(dest / f'{name}.npz') as z:
      outs[name] = z['out']
  return times, outs


def _ours_round(fns: dict, inputs, seg) -> tuple[dict, dict]:
  lms, pan, ms = inputs
  times, outs = {}, {}
  for name, fn in fns.items():
    kwargs = {'segmentation': seg} if name == 'C-GSA' else {}
    start = time.perf_counter()
    out = fn(lms, pan, ms, sensor='WV2', ratio=4, **kwargs)
    times[name] = time.perf_counter() - start
    outs[name] = out
  return times, outs


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--images', default='rr,fr', help='comma-separated subset of rr, fr')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--methods', default=None, help='comma-separated method names (default: all)')
  ap.add_argument('--out', default=str(RESULTS))
  ap.add_argument('--blas_threads', default='1', help='OpenBLAS threads of both sides (default 1)')
  args = ap.parse_args(argv)

  missing = [
    what
    for what, ok in [('octave', shutil.which('octave')), ('../shared', DRIVER.exists())]
    if not ok
  ]
  if missing:
    print(f'skipped: {", ".join(missing)} not available')
    return 0

  import benchmark  # noqa: E402  (benchmarks/benchmark.py: JSON report)
  import make_cs_refs  # noqa: E402  (the regress stand-in for the driver)
  import scipy.io as sio

  from u2net_jax import methods
  from u2net_jax.methods import component_substitution

  selected = args.methods.split(',') if args.methods else sorted(methods.METHODS)
  fns = {name.upper(): methods.METHODS[name] for name in selected}
  results, rows = [], []
  with tempfile.TemporaryDirectory(prefix='classical_bench_') as tmp:
    work = Path(tmp)
    env = make_cs_refs.octave_env(work)
    for image in args.images.split(','):
      inputs = _load(*IMAGES[image])
      lms, pan, ms = inputs
      seg = component_substitution.kmeans_segmentation(lms, 5, seed=0)
      in_mat = work / f'{image}_in.mat'
      sio.savemat(
        in_mat,
        {
          'I_MS_LR': ms,
          'I_MS': lms,
          'I_PAN': pan,
          'sensor': 'WV2',
          'ratio': 4.0,
          'S_seg': seg.astype(np.float64),
        },
      )
      _ours_round(fns, inputs, seg)  # warm-up
      octave_t = {n: [] for n in fns}
      ours_t = {n: [] for n in fns}
      errors = {}
      for r in range(args.rounds):
        sides = ['octave', 'ours'] if r % 2 == 0 else ['ours', 'octave']
        for side in sides:
          if side == 'octave':
            t_oct, o_oct = _octave_round(in_mat, list(fns), work, env)
          else:
            t_ours, o_ours = _ours_round(fns, inputs, seg)
        for n in fns:
          ours_t[n].append(t_ours[n])
          if n in t_oct:
            octave_t[n].append(t_oct[n])
            err = float(np.abs(o_ours[n] - o_oct[n]).max()) / 2047
            errors[n] = max(errors.get(n, 0.0), err)
        print(f'{image}: round {r + 1}/{args.rounds} done', flush=True)
      shape = f'{pan.shape[0]}x{pan.shape[1]}'
      for n in fns:
        o, u = octave_t[n], ours_t[n]
        ratios = [a / b for a, b in zip(o, u, strict=True)] if len(o) == len(u) else []
        res = {
          'image': image,
          'pan_shape': list(pan.shape),
          'method': n.lower(),
          'octave_s': o,
          'ours_s': u,
          'octave_median_s': statistics.median(o) if o else None,
          'ours_median_s': statistics.median(u),
          'ratio_median': statistics.median(ratios) if ratios else None,
          'max_abs_diff_rel': errors.get(n),
        }
        results.append(res)
        if o:
          rows.append(
            f'| {image} {shape} | {n} | {res["octave_median_s"]:.3f} | {res["ours_median_s"]:.4f} '
            f'| {res["ratio_median"]:.1f}x | {res["max_abs_diff_rel"]:.1e} |'
          )
        else:
          rows.append(f'| {image} {shape} | {n} | failed | {res["ours_median_s"]:.4f} | - | - |')
  table = '\n'.join(
    [
      '| image | method | Octave s | ours s | Octave / ours | max abs diff / 2047 |',
      '|---|---|---|---|---|---|',
      *rows,
    ]
  )
  print(table)
  benchmark.write_report(
    args.out,
    'classical_benchmark.py',
    results,
    table,
    rounds=args.rounds,
    images=args.images,
    blas_threads=BLAS_THREADS,
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
