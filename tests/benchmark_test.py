"""Tests of `benchmarks/benchmark.py`: its command line, and one tiny case end to end.

The full benchmark (and its `--quick` CI mode) is run separately; the slow test only checks that
the script, its per-case subprocesses and its outputs work.
"""

import importlib.util
import json
import os

import pytest
from conftest import REPO, run_script

SCRIPT = REPO / 'benchmarks' / 'benchmark.py'


def _benchmark_module():
  spec = importlib.util.spec_from_file_location('u2net_benchmark', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_help_lists_every_case(capsys):
  benchmark = _benchmark_module()
  with pytest.raises(SystemExit) as info:
    benchmark.main(['--help'])
  assert info.value.code == 0
  out = capsys.readouterr().out
  assert '--quick' in out and '--cases' in out
  for case in benchmark.CASES:
    assert case in out


def test_unknown_case_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as info:
    _benchmark_module().main(['--cases=train_wv3,nope'])
  assert info.value.code == 2
  assert "unknown cases ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_quick_one_case_writes_table_and_json(tmp_path):
  out = tmp_path / 'bench.json'
  flags = ['--quick', '--cases=rr256_whole', '--repeats=1', f'--out={out}']
  # The caller's environment as is: the benchmark reports whichever backend it finds.
  proc = run_script(str(SCRIPT), *flags, env=os.environ, timeout=300)
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
