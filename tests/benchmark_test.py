"""Smoke test of `benchmarks/benchmark.py`: one tiny case in a subprocess prints the table and JSON.

The full benchmark (and its `--quick` CI mode) is run separately; this only checks that the
script, its per-case subprocesses and its outputs work.
"""

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_quick_one_case_writes_table_and_json(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
    [
      sys.executable,
      str(REPO / 'benchmarks' / 'benchmark.py'),
      '--quick',
      '--cases=rr256_whole',
      '--repeats=1',
      f'--out={out}',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert '| case | what | time (s)' in proc.stdout
  assert '| rr256_whole |' in proc.stdout
  report = json.loads(out.read_text())
  cases = {r['case']: r for r in report['results']}
  assert set(cases) == {'sgemm', 'rr256_whole'}  # sgemm is always measured: the GFLOP/s yardstick.
  assert cases['sgemm']['gflops'] > 0
  whole = cases['rr256_whole']
  assert whole['time_s'] > 0 and whole['peak_rss_gb'] > 0 and whole['achieved_gflops'] > 0
  assert report['platform']['backend'] in ('cpu', 'gpu', 'tpu')
  assert report['quick'] is True
