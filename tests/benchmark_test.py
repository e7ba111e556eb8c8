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


# The official side-by-side mode (benchmarks/official_compare.py).

COMPARE = REPO / 'benchmarks' / 'official_compare.py'


def _compare_module():
  spec = importlib.util.spec_from_file_location('u2net_official_compare', COMPARE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_side_by_side_skips_with_the_reason_without_torch(tmp_path, monkeypatch, capsys):
  compare = _compare_module()
  find_spec = compare.importlib.util.find_spec
  monkeypatch.setattr(
    compare.importlib.util,
    'find_spec',
    lambda name, *a: None if name == 'torch' else find_spec(name, *a),
  )
  out = tmp_path / 'compare.json'
  assert compare.main(['--quick', f'--out={out}']) == 0
  assert 'skipped: torch is not installed' in capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report['status'] == 'skipped' and 'pip install torch' in report['reason']


def test_side_by_side_skips_with_the_reason_without_shared(tmp_path, monkeypatch, capsys):
  compare = _compare_module()
  # torch and einops are reported present whether or not they are installed: the check of the
  # official code comes after theirs, and a skipped comparison imports neither.
  find_spec = compare.importlib.util.find_spec
  monkeypatch.setattr(
    compare.importlib.util,
    'find_spec',
    lambda name, *a: object() if name in ('torch', 'einops') else find_spec(name, *a),
  )
  monkeypatch.setattr(compare, 'OFFICIAL_CODE', tmp_path / 'absent' / 'code')
  out = tmp_path / 'compare.json'
  assert compare.main(['--cases=train', f'--out={out}']) == 0
  assert 'skipped: the official code is absent' in capsys.readouterr().out
  assert json.loads(out.read_text())['status'] == 'skipped'


def test_side_by_side_interleaves_and_takes_the_median_ratio():
  compare = _compare_module()
  calls = []
  official = lambda: calls.append('official')
  project = lambda: calls.append('project')
  compare._sgemm_gflops = lambda n=2048: 100.0  # The yardstick is not what is tested here.
  result = compare.interleave(official, project, rounds=3, project_repeats=2, log=lambda s: None)
  # Warm-up of each, then rounds alternating which side goes first.
  assert calls[:2] == ['project', 'official']
  first_official = ['official', 'project', 'project']
  first_project = ['project', 'project', 'official']
  assert calls[2:] == first_official + first_project + first_official
  assert len(result['rounds']) == 3
  ratios = sorted(r['ratio'] for r in result['rounds'])
  assert result['median_ratio'] == ratios[1]


@pytest.mark.slow
def test_side_by_side_quick_round_runs_both_sides(tmp_path):
  reason = _compare_module().unavailable_reason(['train'])
  if reason:
    pytest.skip(reason)
  out = tmp_path / 'compare.json'
  proc = run_script(str(COMPARE), '--quick', f'--out={out}', env=os.environ, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  train = report['results']['train']
  assert report['status'] == 'ok' and len(train['rounds']) == 1
  assert train['official_s'] > 0 and train['project_s'] > 0 and train['median_ratio'] > 0
  assert 0 < train['project_pct_sgemm'] < 100


# The profile's attribution of XLA operations (benchmarks/profile_step.py).


def _profile_module():
  spec = importlib.util.spec_from_file_location(
    'u2net_profile', REPO / 'benchmarks' / 'profile_step.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_profile_categories_from_op_names():
  profile = _profile_module()
  cat = profile.categorise
  loop = 'jit(train_step)/jvp(U2Net)/s2block0/attention/while/body/closed_call/exp'
  assert cat('fusion', loop) == 'spatial attention fwd'
  assert cat('fusion', loop.replace('jvp(U2Net)', 'transpose(jvp(U2Net))')) == (
    'spatial attention bwd'
  )
  assert cat('fusion', 'jit(train_step)/jvp(U2Net)/s2block0/attention/softmax') == (
    'other S2Block attention fwd'
  )
  assert cat('convolution', 'jit(f)/transpose(jvp(U2Net))/down0/conv_general_dilated') == 'conv bwd'
  assert cat('fusion', 'jit(f)/jvp(U2Net)/s2block1/attn_norm/mul') == 'layernorm fwd'
  assert cat('fusion', 'jit(train_step)/mul') == 'optimizer'
  assert cat('copy', '') == 'unattributed'
  # Inference: no value_and_grad, everything is forward.
  assert cat('fusion', 'jit(f)/U2Net/down0/conv_general_dilated', training=False) == 'conv fwd'


def test_profile_resolves_loop_bodies_and_sums_events():
  import jax
  import jax.numpy as jnp

  profile = _profile_module()

  def f(x):
    return jax.lax.scan(lambda c, y: (c + jnp.sin(y) @ x, None), x, x[None].repeat(3, 0))[0]

  hlo = jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text()
  names = profile.hlo_op_names(hlo)
  assert any(opcode == 'while' for opcode, _ in names.values())
  # Every non-control instruction of the loop body gets an op_name (its own or its caller's).
  body = [n for n, (opcode, op) in names.items() if 'while' in op and opcode != 'while']
  assert body
  events = [{'ph': 'X', 'name': n, 'ts': 10.0 * i, 'dur': 5.0} for i, n in enumerate(body)]
  events.append({'ph': 'X', 'name': 'ThunkExecutor::Execute', 'ts': 0.0, 'dur': 1e6})
  summary = profile.summarise(events, names, calls=1)
  assert summary['ops_ms_per_call'] == pytest.approx(5e-3 * len(body))
  assert sum(summary['share'].values()) == pytest.approx(1.0)


# gdal_pansharpen beside fuse.py on the same scene (benchmarks/scene_benchmark.py --cases=vs_gdal).


def _scene_module():
  spec = importlib.util.spec_from_file_location(
    'u2net_scene_benchmark', REPO / 'benchmarks' / 'scene_benchmark.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _vs_gdal(scene, tmp_path, runners, rounds=1, side=128):
  out = tmp_path / 'scene.json'
  flags = [f'--vs_scenes=syn{side}x4', f'--vs_runners={runners}', f'--rounds={rounds}']
  code = scene.main(['--cases=vs_gdal', *flags, f'--out={out}'])
  rows = {r['runner']: r for r in json.loads(out.read_text())['results']}
  return code, rows


def test_vs_gdal_skips_the_gdal_rows_with_the_reason_without_gdal(tmp_path, monkeypatch, capsys):
  scene = _scene_module()
  monkeypatch.setattr(scene, '_gdal_script', lambda: None)
  code, rows = _vs_gdal(scene, tmp_path, 'gdal,gdal_1thread', side=64)
  assert code == 0
  for runner in ('gdal', 'gdal_1thread'):
    assert rows[runner]['skipped'] == (
      'gdal_pansharpen.py not found (apt-get install gdal-bin python3-gdal)'
    )
  assert 'skipped: gdal_pansharpen.py not found' in capsys.readouterr().out


def test_vs_gdal_rounds_of_gdal_pansharpen(tmp_path):
  scene = _scene_module()
  if scene._gdal_script() is None:
    pytest.skip(f'gdal_pansharpen.py is absent ({scene.GDAL_INSTALL})')
  code, rows = _vs_gdal(scene, tmp_path, 'gdal,gdal_1thread', rounds=2)
  assert code == 0, rows
  for runner in ('gdal', 'gdal_1thread'):
    row = rows[runner]
    assert [r['round'] for r in row['runs']] == [0, 1] and row['mp_per_s'] > 0
    assert 0 < row['peak_rss_gb'] < 2 and row['output_mb'] > 0
    assert row['grid']['shape'] == [128, 128] and row['grid']['count'] == 4
    assert row['same_grid_as_gdal'] is True
  assert rows['gdal']['ratio_to_gdal'] == 1.0 and len(rows['gdal_1thread']['ratios_to_gdal']) == 2
  assert rows['gdal']['cpu_ratio_to_gdal'] == 1.0 and rows['gdal_1thread']['cpu_ratio_to_gdal'] > 0


def test_vs_gdal_flags_are_checked(capsys):
  scene = _scene_module()
  with pytest.raises(SystemExit) as info:
    scene.main(['--cases=vs_gdal', '--vs_scenes=syn100x3'])
  assert info.value.code == 2
  assert '--vs_scenes: scene' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    scene.main(['--cases=vs_gdal', '--vs_runners=gdal,brovey-typo'])
  assert "unknown ['brovey-typo']" in capsys.readouterr().err


@pytest.mark.slow
def test_vs_gdal_fuse_rows_have_gdal_grid(tmp_path):
  # fuse.py (a classical method and the tiny U2Net) beside GDAL: same CRS, transform and shape.
  scene = _scene_module()
  code, rows = _vs_gdal(scene, tmp_path, 'gdal,bt-h,u2net_tiny')
  assert code == 0, rows
  fused = [rows['u2net_tiny']]
  if scene._fuse_has_method():
    fused.append(rows['bt-h'])
  else:
    assert rows['bt-h']['skipped'] == 'fuse.py has no --method yet'
  pan_grid = {'crs': 'EPSG:32633', 'transform': [0.5, 0.0, 500000.0, 0.0, -0.5, 4600000.0]}
  for row in fused:
    assert row['mp_per_s'] > 0 and row['inner_s'] > 0 and row['output_mb'] > 0
    assert row['grid'] == dict(pan_grid, shape=[128, 128], count=4, dtype='uint16')
    assert row.get('same_grid_as_gdal') is (None if 'skipped' in rows['gdal'] else True)
