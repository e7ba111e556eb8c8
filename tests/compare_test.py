"""Tests of `compare.py` / `infer.compare`: the comparison table, its marks, the files it writes,
its errors, and the classical outputs against the toolbox's on the shared real WV2 samples.

The quick cases use a small SYNTHETIC demo set (2 images, 96 x 96) and a tiny random network;
the slow ones run the command line and every classical method on `../shared` (skipped without).
"""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from conftest import REPO, shared_path
from eval_test import _config, _make_workdir
from PIL import Image

from u2net_jax import errors, methods
from u2net_jax.data import DataError
from u2net_jax.infer import compare, eval_lib

FAST = ['exp', 'bt-h', 'gs', 'mtf-glp-fs', 'bdsd-pc']  # Quick ones, of three families.


def _small_demo():
  config = compare.base_config('WV3')
  with config.unlocked():
    config.data.demo_test_size = 96  # The 21-px crop leaves one 32-px block.
    config.data.demo_num_test = 2
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """The fast methods and a tiny network on the small demo set."""
  workdir = _make_workdir(tmp_path_factory.mktemp('tiny'), _config())
  out = tmp_path_factory.mktemp('out')
  config = _small_demo()
  results = compare.compare(
    'demo',
    out_dir=out,
    method_names=','.join(FAST),
    workdirs={'tiny': str(workdir)},
    config=config,
    verbose=False,
  )
  return results['demo'], out / 'demo', config


def test_rows_files_and_outputs(run):
  result, folder, config = run
  rows = [m.upper() for m in FAST] + ['tiny']
  assert list(result['methods']) == rows
  assert result['protocol'] == 'reduced' and result['num_images'] == 2
  # The text table: one line per method in order, then the ideal values.
  lines = (folder / 'table.txt').read_text().splitlines()
  names = [line.split()[0] for line in lines[3:] if line and not line.startswith('-')]
  assert names[: len(rows)] == rows and lines[3 + len(rows) + 1].startswith('Ideal value')
  assert '+inf' in lines[3 + len(rows) + 1]
  md, tex = (folder / 'table.md').read_text(), (folder / 'table.tex').read_text()
  assert all(f'| {r} |' in md for r in rows) and r'\begin{tabular}' in tex and '$+\\infty$' in tex
  with open(folder / 'table.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['method'] for r in table] == rows
  assert float(table[0]['PSNR_mean']) == result['methods']['EXP']['mean']['PSNR']
  assert json.loads((folder / 'metrics.json').read_text())['marks'] == result['marks']
  assert len((folder / 'per_image.csv').read_text().splitlines()) == 1 + 2 * len(rows)
  # The .mat files are exactly each method's output on the references as stored.
  test_set = eval_lib.select_test_sets(config, 'demo')[0]
  for k in range(2):
    ref = test_set.source.reference(k, test_set.source.example(k))
    for name in FAST:
      sr = scipy.io.loadmat(folder / name / f'output_mulExm_{k}.mat')['sr']
      expected = methods.METHODS[name](ref['lms'], ref['guide'][..., 0], ref['ms'], sensor='WV3')
      assert sr.dtype == np.float64 and np.array_equal(sr, expected)
    sr = scipy.io.loadmat(folder / 'tiny' / f'output_mulExm_{k}.mat')['sr']
    assert sr.dtype == np.float32 and sr.shape == (96, 96, 8)
    metrics = eval_lib.image_metrics(test_set, ref, sr.astype(np.float64))
    assert metrics == result['methods']['tiny']['per_image'][k]
    with Image.open(folder / f'figure_{k}.png') as im:  # gt + 6 outputs, each above its error.
      assert im.mode == 'RGB' and im.size[0] > 6 * 128 and im.size[1] > 2 * 128
  test_set.close()
  for row in result['methods'].values():
    assert row['seconds']['per_image'] > 0


def test_marks_follow_the_paper(run):
  result = run[0]
  rows = result['methods']
  for key in rows['EXP']['mean']:
    shown = {r: round(v['mean'][key], 4) for r, v in rows.items()}
    ideal = compare.IDEAL[key]
    order = sorted(set(shown.values()), key=lambda x: -x if ideal == np.inf else abs(x - ideal))
    best = {r for r, x in shown.items() if x == order[0]}
    second = {r for r, x in shown.items() if len(order) > 1 and x == order[1]}
    assert {r for r, m in result['marks'].items() if m.get(key) == 'best'} == best
    assert {r for r, m in result['marks'].items() if m.get(key) == 'second'} == second
  line = next(t for t in result['table'].splitlines() if t.startswith(next(iter(best)) + ' '))
  assert '*' in line
  md = (run[1] / 'table.md').read_text()
  assert md.count('**') >= 2 * len(rows['EXP']['mean']) and '<u>' in md


def test_marks_unit():
  rows = {
    'a': {'mean': {'PSNR': 30.0, 'SAM': 2.0}},
    'b': {'mean': {'PSNR': 31.0, 'SAM': 3.0}},
    'c': {'mean': {'PSNR': 29.0, 'SAM': 2.00001}},  # Prints as a's SAM: shares the mark.
  }
  assert compare.marks(rows) == {
    'a': {'PSNR': 'second', 'SAM': 'best'},
    'b': {'PSNR': 'best', 'SAM': 'second'},
    'c': {'SAM': 'best'},
  }


def test_bad_arguments(tmp_path):
  with pytest.raises(errors.OptionError, match='unknown method'):
    compare.parse_methods('exp,foo')
  assert compare.parse_methods('none') == [] and compare.parse_methods('classical') == list(
    compare.CLASSICAL
  )
  with pytest.raises(errors.OptionError, match='name=path'):
    compare.parse_workdirs('workdirs/x')
  with pytest.raises(errors.OptionError, match='taken'):
    compare.parse_workdirs('exp=workdirs/x')
  with pytest.raises(errors.OptionError, match='nothing to compare'):
    compare.compare('demo', out_dir=tmp_path, method_names='none')
  with pytest.raises(FileNotFoundError):
    compare.compare('demo', out_dir=tmp_path, workdirs={'u2net': str(tmp_path / 'none')})
  with pytest.raises(DataError, match='missing.h5'):
    compare.compare('missing.h5', out_dir=tmp_path, method_names='exp')


@pytest.mark.slow
def test_command_line_errors(tmp_path):
  def run(*flags):
    return subprocess.run(
      [sys.executable, str(REPO / 'compare.py'), f'--out={tmp_path}', *flags],
      capture_output=True,
      text=True,
      cwd=REPO,
    )

  for flags, message in (
    (['--methods=exp,nope'], "error: --methods: unknown method 'nope'"),
    (['--test_files=missing.h5', '--methods=exp'], 'error: '),
  ):
    done = run(*flags)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(message) and 'Traceback' not in done.stderr, done.stderr


@pytest.mark.slow
def test_classical_outputs_equal_the_toolbox(tmp_path):
  """Every classical method's output_mulExm_0.mat on the real WV2 reduced-resolution sample
  equals the toolbox's (C-GSA: with the toolbox's k-means segmentation, which is random)."""
  h5 = shared_path('official', 'wv2_rr_sample.h5')
  refs = shared_path('toolbox', 'refs', 'wv2_rr_sample_0')
  config = compare.base_config('WV2')
  result = compare.compare(
    f'wv2_rr={h5}', out_dir=tmp_path, sensor='WV2', config=config, verbose=False
  )['wv2_rr']
  assert list(result['methods']) == [m.upper() for m in compare.CLASSICAL]
  test_set = eval_lib.select_test_sets(config, f'wv2_rr={h5}', 'WV2')[0]
  ref = test_set.source.reference(0, test_set.source.example(0))
  test_set.close()
  for name in compare.CLASSICAL:
    sr = scipy.io.loadmat(tmp_path / 'wv2_rr' / name / 'output_mulExm_0.mat')['sr']
    toolbox = np.load(refs / f'{name.upper()}.npz')
    if name == 'c-gsa':
      args = (ref['lms'], ref['guide'][..., 0], ref['ms'])
      assert np.array_equal(sr, methods.METHODS[name](*args, sensor='WV2'))
      sr = methods.METHODS[name](*args, sensor='WV2', segmentation=toolbox['seg'])
    assert np.abs(sr - toolbox['out']).max() <= 1e-9 * 2047, name
