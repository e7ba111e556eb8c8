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
from eval_test import _config, _make_workdir, _write_pansharpening_h5
from PIL import Image

from u2net_jax import convert, errors, methods
from u2net_jax.data import DataError
from u2net_jax.infer import compare, eval_lib, paper_tables
from u2net_jax.run import config_utils

FAST = ['exp', 'bt-h', 'gs', 'mtf-glp-fs', 'bdsd-pc']  # Quick ones, of three families.


def _small_demo():
  config = compare.base_config('WV3')
  with config.unlocked():
    config.data.demo_test_size = 96  # The 21-px crop leaves one 32-px block.
    config.data.demo_num_test = 2
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """The fast methods, a tiny U2Net and a DLPan baseline (DiCNN, random weights) beside it, on
  the small demo set."""
  workdir = _make_workdir(tmp_path_factory.mktemp('tiny'), _config())
  dicnn = _make_workdir(
    tmp_path_factory.mktemp('dicnn'),
    config_utils.load_config_file(f'{REPO}/configs/baseline.py:dicnn,wv3'),
  )
  out = tmp_path_factory.mktemp('out')
  config = _small_demo()
  results = compare.compare(
    'demo',
    out_dir=out,
    method_names=','.join(FAST),
    workdirs={'tiny': str(workdir), 'DiCNN1': str(dicnn)},
    config=config,
    paper=True,  # The demo set is no paper's test set: one line says so.
    verbose=False,
  )
  return results['demo'], out / 'demo', config


def test_rows_files_and_outputs(run):
  result, folder, config = run
  rows = [m.upper() for m in FAST] + ['tiny', 'DiCNN1']
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
    for name in ('tiny', 'DiCNN1'):  # <test set>/<workdir name>/output_mulExm_{k}.mat
      sr = scipy.io.loadmat(folder / name / f'output_mulExm_{k}.mat')['sr']
      assert sr.dtype == np.float32 and sr.shape == (96, 96, 8)
      # C order, as compare had it: loadmat's Fortran order sums in another order (last bits).
      sr = np.ascontiguousarray(sr, np.float64)
      assert eval_lib.image_metrics(test_set, ref, sr) == result['methods'][name]['per_image'][k]
    with Image.open(folder / f'figure_{k}.png') as im:  # gt + 7 outputs, each above its error.
      assert im.mode == 'RGB' and im.size[0] > 6 * 128 and im.size[1] > 2 * 128
  test_set.close()
  assert result['methods']['DiCNN1']['kind'] == 'network'
  for row in result['methods'].values():
    assert row['seconds']['per_image'] > 0
  # --paper on the demo set: no published rows, one line saying why.
  assert result['paper'] == {
    'applies': False,
    'reason': "the data are not read from an HDF5 file, so not one of the paper's PanCollection "
    'test files (test_wv3_multiExm1.h5, test_wv3_OrigScale_multiExm1.h5, test_wv2_multiExm1.h5)',
  }
  assert '(paper)' not in result['table']
  assert lines[-2].startswith('--paper: no published table applies: the data are not read')


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


# ---------------------------------------------------------------------------------------------
# The paper's published rows (--paper) and a baseline beside U2Net (--workdirs).


def test_published_numbers_are_the_papers():
  """Spot values typed from the paper (Table 1, Section 4.2; Table 2, Section 4.3)."""
  t1r, t1f, t2 = paper_tables.TABLE_1_REDUCED, paper_tables.TABLE_1_FULL, paper_tables.TABLE_2
  assert len(t1r.rows) == len(t1f.rows) == 15 and len(t2.rows) == 10
  assert list(t2.rows)[0] == 'PNN' and 'BT-H' not in t2.rows  # Table 2: DL methods only.
  assert t1r.rows['U2Net']['PSNR'].text == '39.117±3.009'
  assert t1r.rows['BT-H']['Q2n'] == paper_tables.Cell(0.832, 0.094, '0.832±0.094')
  assert t1r.rows['DiCNN']['SAM'].mean == 3.592 and t1r.rows['BDPN']['ERGAS'].std == 0.732
  assert t1f.rows['TV']['D_lambda_K'].mean == 0.0234 and t1f.rows['PanNet']['D_s'].mean == 0.0470
  assert t1f.rows['U2Net']['HQNR'].text == '0.9514±0.0115'
  assert t2.rows['U2Net']['PSNR'] == paper_tables.Cell(30.740, 2.173, '30.740±2.173')
  assert t2.rows['PMACNet']['SAM'].text == '15.95±3.329' and t2.rows['MSDCNN']['Q2n'].mean == 0.824
  assert t2.rows['FusionNet']['ERGAS'].mean == 5.136
  # The paper's QNR is the hybrid one: (1 - D_lambda_K)(1 - D_s), to its rounding, every row.
  for row in t1f.rows.values():
    hqnr = (1 - row['D_lambda_K'].mean) * (1 - row['D_s'].mean)
    assert abs(hqnr - row['HQNR'].mean) < 1.5e-3


def test_published_for_recognises_pancollection_files():
  ok = dict(protocol='reduced', sensor='WV2', num_images=20, image_size=(256, 256))
  assert paper_tables.published_for('d/test_wv2_multiExm1.h5', **ok) == (paper_tables.TABLE_2, '')
  assert paper_tables.published_for('TEST_WV2_MULTIEXM1.H5', **ok)[0] is paper_tables.TABLE_2
  full = dict(ok, protocol='full', sensor='WV3', image_size=(512, 512))
  assert paper_tables.published_for('test_wv3_OrigScale_multiExm1.h5', **full)[0] is (
    paper_tables.TABLE_1_FULL
  )
  none, why = paper_tables.published_for('test_wv2_OrigScale_multiExm1.h5', **full)
  assert none is None and 'no full-resolution WV2 table' in why
  none, why = paper_tables.published_for('wv2_rr_sample.h5', **ok)
  assert none is None and why.startswith("wv2_rr_sample.h5 is not one of the paper's PanCollection")
  small = dict(ok, num_images=2, image_size=(128, 128), sensor='WV3')
  none, why = paper_tables.published_for('test_wv2_multiExm1.h5', **small)
  assert none is None and why == (
    "test_wv2_multiExm1.h5 is named like PanCollection's but is not the paper's test set: "
    'sensor WV3 (expected WV2), images 2 (expected 20), size (128, 128) (expected (256, 256))'
  )
  assert set(paper_tables.match_rows(paper_tables.TABLE_2, ['u2net', 'DiCNN1', 'APNN', 'EXP'])) == {
    'u2net',
    'DiCNN1',
  }


def test_paper_rows_in_every_table_file(tmp_path, monkeypatch):
  """--paper on a tiny file named like PanCollection's WV3 reduced-resolution test file (its
  expected count and size shrunk to the file's): each published row right after its measured
  row, in every table file, never marked."""
  spec = paper_tables.PANCOLLECTION['test_wv3_multiExm1.h5']
  monkeypatch.setitem(
    paper_tables.PANCOLLECTION,
    'test_wv3_multiExm1.h5',
    paper_tables.TestFile('WV3', 'reduced', 2, 96, spec.published),
  )
  h5 = _write_pansharpening_h5(tmp_path / 'test_wv3_multiExm1.h5')
  result = compare.compare(
    str(h5),
    out_dir=tmp_path / 'out',
    method_names='bt-h,exp,mtf-glp-fs',
    paper=True,
    verbose=False,
  )['test_wv3_multiExm1']
  folder = tmp_path / 'out' / 'test_wv3_multiExm1'
  assert list(result['methods']) == ['BT-H', 'EXP', 'MTF-GLP-FS']
  paper = result['paper']
  assert paper['applies'] and paper['table'] == 'Table 1 (reduced resolution)'
  assert list(paper['rows']) == ['BT-H', 'MTF-GLP-FS'] and paper['rows']['BT-H']['method'] == 'BT-H'
  assert paper['rows']['MTF-GLP-FS']['text'] == {
    'PSNR': '32.963±2.753',
    'Q2n': '0.833±0.092',
    'SAM': '5.315±1.765',
    'ERGAS': '4.700±1.597',
  }
  assert json.loads((folder / 'metrics.json').read_text())['paper'] == paper
  # Text: '-' where the paper has no column (Q_avg, SCC, time).
  lines = (folder / 'table.txt').read_text().splitlines()
  names = [line.split('  ')[0].strip() for line in lines[3:-4] if not line.startswith('-')]
  assert names == ['BT-H', 'BT-H (paper)', 'EXP', 'MTF-GLP-FS', 'MTF-GLP-FS (paper)']
  row = next(line for line in lines if line.startswith('BT-H (paper)')).split()
  assert row[2:] == ['33.080±2.880', '0.832±0.094', '-', '4.920±1.425', '4.580±1.496', '-', '-']
  assert 'Table 1 (reduced resolution) (WV3, 20 reduced-resolution' in result['table']
  # Never marked: the measured rows alone decide best and second.
  assert set(result['marks']) == set(result['methods'])
  assert '*33.080' not in result['table'] and '_33.080' not in result['table']
  md, tex = (folder / 'table.md').read_text(), (folder / 'table.tex').read_text()
  assert '| BT-H (paper) | 33.080±2.880 | 0.832±0.094 | - |' in md
  assert r'MTF-GLP-FS (paper) & $32.963\pm2.753$ & $0.833\pm0.092$ & - &' in tex
  with open(folder / 'table.csv') as f:
    table = {r['method']: r for r in csv.DictReader(f)}
  assert table['BT-H (paper)']['kind'] == 'paper' and table['BT-H (paper)']['PSNR_mean'] == '33.08'
  published = table['BT-H (paper)']
  assert published['SCC_mean'] == '' and published['seconds_per_image'] == ''
  # per_image.csv holds the measured rows only.
  assert len((folder / 'per_image.csv').read_text().splitlines()) == 1 + 2 * 3


@pytest.mark.slow
def test_released_baselines_in_one_table_command_line(tmp_path):
  """`compare.py --methods=none --workdirs=PNN=...,DiCNN1=...` with the released WV3 weights on
  the real WV2 reduced-resolution samples: one table, `<set>/<name>/output_mulExm_{k}.mat`, each
  output the DLPan-Toolbox's own (stored float32 outputs, clipped and x 2047 as it saves them).
  U2Net beside a baseline in one table is the module fixture's (tiny, quick) case."""
  refs = {}
  for name, weights in (('pnn', 'pnn.pth'), ('dicnn', 'dicnn1.pth')):  # As `u2net_jax.convert`.
    config = config_utils.load_config_file(f'{REPO}/configs/wv3.py')
    with config.unlocked():
      config.model.name = name
    checkpoint = shared_path('dlpan', 'weights', 'WV3', weights)
    convert.convert_to_workdir(checkpoint, config_utils.finalize(config), tmp_path / name)
    refs[name] = np.load(shared_path('dlpan', 'io', f'{name}_wv3.npz'))['rr_out']
  h5 = shared_path('official', 'wv2_rr_sample.h5')
  done = subprocess.run(
    [
      sys.executable,
      str(REPO / 'compare.py'),
      f'--test_files=wv2_rr={h5}',
      '--sensor=WV2',
      '--methods=none',
      f'--workdirs=PNN={tmp_path / "pnn"},DiCNN1={tmp_path / "dicnn"}',
      '--paper',
      f'--out={tmp_path / "out"}',
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert done.returncode == 0, done.stderr
  assert "--paper: no published table applies: wv2_rr_sample.h5 is not one of the paper's" in (
    done.stdout
  )
  folder = tmp_path / 'out' / 'wv2_rr'
  result = json.loads((folder / 'metrics.json').read_text())
  assert list(result['methods']) == ['PNN', 'DiCNN1'] and not result['paper']['applies']
  rows = [line.split()[0] for line in done.stdout.splitlines() if line[:4] in ('PNN ', 'DiCN')]
  assert rows == ['PNN', 'DiCNN1']
  for name, label in (('pnn', 'PNN'), ('dicnn', 'DiCNN1')):
    for k in range(2):
      sr = scipy.io.loadmat(folder / label / f'output_mulExm_{k}.mat')['sr']
      toolbox = np.clip(refs[name][k].transpose(1, 2, 0), 0, 1) * np.float32(2047)
      assert np.abs(sr - toolbox).max() <= 2e-5 * 2047, (name, k)
