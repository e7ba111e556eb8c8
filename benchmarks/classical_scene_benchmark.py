r"""Times `fuse.py --method` (classical methods by windows) on a synthetic GeoTIFF scene.

  python benchmarks/classical_scene_benchmark.py --size=2048 --methods=exp,gs,mtf-glp-hpm --rounds=2

Writes a synthetic WV2-shaped scene (uint16, 8 bands, `size` x `size` PAN) once, in a child
process (so this process stays small), then runs `fuse.py --method=M --sensor=WV2` once per
method per round, the methods interleaved within each round, each in its own process. Per run:
the fusion's seconds and MP of PAN per second from fuse.py's JSON summary (the fusion alone,
without imports), the child's user + system CPU seconds and its peak RSS (`os.wait4`). Prints a
markdown table with the load average before and after: compare within one run only.

  python benchmarks/classical_scene_benchmark.py --in_memory --size=2048

instead times, in this process on arrays, each method's whole-image function and its streamed
fusion (`methods.streaming.fuse_arrays`) one after the other, interleaved: CPU and wall seconds
and their largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_MAKE = r"""
import sys
import numpy as np
from pathlib import Path
sys.path.insert(0, {tests!r})
from scene_test import PAN_PIXEL, make_pair, write_tiff
folder, size = Path({folder!r}), {size}
pan, ms = make_pair(np.random.default_rng(0), size, size)
write_tiff(folder / 'pan.tif', pan)
write_tiff(folder / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
"""


def _run(args: list[str]) -> tuple[dict, float, float]:
  """Runs `python fuse.py ARGS`; returns (its JSON summary, CPU seconds, peak RSS in GB)."""
  proc = subprocess.Popen(
    [sys.executable, 'fuse.py', *args],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.stdout.close()
  if status:
    raise SystemExit(f'fuse.py {" ".join(args)} failed (status {status})')
  summary = json.loads(out.strip().splitlines()[-1])
  return summary, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=2048, help='PAN side (a multiple of 16)')
  parser.add_argument('--methods', default='exp,gs,mtf-glp-hpm')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--window', type=int, default=1024)
  parser.add_argument('--in_memory', action='store_true', help='whole-image vs streamed')
  args = parser.parse_args()
  methods = args.methods.split(',')
  if args.in_memory:
    _in_memory(args, methods)
    return
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    code = _MAKE.format(tests=str(REPO / 'tests'), folder=tmp, size=args.size)
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
    rows = []
    for r in range(args.rounds):
      for m in methods:
        summary, cpu, rss = _run(
          [
            f'--method={m}',
            '--sensor=WV2',
            f'--pan={folder / "pan.tif"}',
            f'--ms={folder / "ms.tif"}',
            f'--out={folder / "out.tif"}',
            f'--window={args.window}',
            '--overwrite',
            '--noprogress',
          ]
        )
        rows.append((r + 1, m, summary['seconds'], summary['megapixels_per_s'], cpu, rss))
  print(f'scene {args.size}x{args.size} PAN, 8 bands uint16, --window={args.window}')
  print(f'load average before: {load:.1f}, after: {os.getloadavg()[0]:.1f}\n')
  print('| round | method | fusion (s) | MP of PAN/s | process CPU (s) | peak RSS (GB) |')
  print('|---|---|---|---|---|---|')
  for r, m, sec, mps, cpu, rss in rows:
    print(f'| {r} | {m} | {sec:.1f} | {mps:.3f} | {cpu:.1f} | {rss:.2f} |')


def _in_memory(args, methods) -> None:
  import time

  import numpy as np

  sys.path.insert(0, str(REPO / 'tests'))
  from scene_test import make_pair

  from u2net_jax import toolbox
  from u2net_jax.methods import METHODS, streaming

  pan, ms = (
    a.astype(np.float64) for a in make_pair(np.random.default_rng(0), args.size, args.size)
  )
  print(
    f'arrays {args.size}x{args.size} PAN, 8 bands, window {args.window}, '
    f'load {os.getloadavg()[0]:.1f}'
  )
  print(
    '| round | method | whole-image CPU / wall (s) | streamed CPU / wall (s) | max difference |'
  )
  print('|---|---|---|---|---|')
  for r in range(args.rounds):
    for m in methods:
      t0, w0 = time.process_time(), time.perf_counter()
      ref = METHODS[m](toolbox.interp23tap(ms, 4), pan, ms, sensor='WV2')
      t1, w1 = time.process_time(), time.perf_counter()
      out = streaming.fuse_arrays(m, pan, ms, sensor='WV2', window=args.window)
      t2, w2 = time.process_time(), time.perf_counter()
      diff = np.abs(out - ref).max()
      print(
        f'| {r + 1} | {m} | {t1 - t0:.1f} / {w1 - w0:.1f} | '
        f'{t2 - t1:.1f} / {w2 - w1:.1f} | {diff:.2g} |'
      )
      del ref, out
  print(f'load after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
