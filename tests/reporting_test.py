"""Tests of `infer.reporting`: tables, CSV/JSON/.mat/PNG writers and atomic output folders."""

import csv
import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from u2net_jax import metrics
from u2net_jax.infer import reporting
from u2net_jax.io import fileio


def _result(protocol='reduced', n=2, bands=8):
  rng = np.random.default_rng(0)
  keys = {'reduced': ['PSNR', 'Q2n', 'SAM'], 'full': ['D_lambda', 'HQNR'], 'hisr': ['PSNR']}
  methods = {}
  for method in ('U2Net', 'EXP'):
    rows = [{k: float(rng.uniform(0, 40)) for k in keys[protocol]} for _ in range(n)]
    agg = metrics.aggregate(rows)
    methods[method] = {
      'mean': {k: v[0] for k, v in agg.items()},
      'std': {k: v[1] for k, v in agg.items()},
      'per_image': rows,
    }
  return {
    'test_set': 'wv3_reduced',
    'protocol': protocol,
    'num_images': n,
    'image_size': [128, 96],
    'sensor': 'WV3',
    'step': 7,
    'mode': 'tiled',
    'bands': bands,
    'crop': 21 if protocol == 'reduced' else 0,
    'methods': methods,
  }


def test_format_report_names_the_protocol_and_the_paper_columns():
  table = reporting.format_report(_result())
  title, header, *rows = table.splitlines()
  assert title == (
    'wv3_reduced: reduced resolution, 2 images 128x96, sensor WV3, step 7, tiled inference'
  )
  assert 'Q8' in header and 'Q2n' not in header  # Q2n is printed as the tables call it.
  assert 'cropped by 21 px' in table
  assert reporting.format_report(_result(bands=4)).count('Q4') == 1
  assert reporting.format_report(_result('hisr')).startswith('wv3_reduced: HISR, 2 images')
  assert "HQNR is the paper's 'QNR' column" in reporting.format_report(_result('full'))


def test_summary_files_agree(tmp_path):
  result = _result()
  table = reporting.write_summary(tmp_path, result)
  assert (tmp_path / 'table.txt').read_text(encoding='utf-8') == table
  assert json.loads((tmp_path / 'metrics.json').read_text()) == result
  with open(tmp_path / 'per_image.csv') as f:
    lines = list(csv.DictReader(f))
  assert [(int(x['image']), x['method']) for x in lines] == [
    (0, 'U2Net'),
    (0, 'EXP'),
    (1, 'U2Net'),
    (1, 'EXP'),
  ]
  for line in lines:  # Every digit survives: the CSV equals the JSON exactly.
    expected = result['methods'][line['method']]['per_image'][int(line['image'])]
    assert {k: float(v) for k, v in line.items() if k not in ('image', 'method')} == expected


def test_a_failed_write_leaves_no_folder(tmp_path):
  final = tmp_path / 'eval' / 'wv3_reduced'
  broken = _result()
  del broken['methods']['EXP']['per_image']  # The CSV writer fails after the table and JSON.
  with pytest.raises(KeyError):
    with fileio.atomic_dir(final) as tmp:
      reporting.write_summary(tmp, broken)
  assert not final.exists()
  assert list((tmp_path / 'eval').iterdir()) == []  # No temporary folder left either.
  # An earlier result stays until a new one is complete, then is replaced whole.
  with fileio.atomic_dir(final) as tmp:
    reporting.write_summary(tmp, _result())
  with pytest.raises(KeyError):
    with fileio.atomic_dir(final) as tmp:
      reporting.write_summary(tmp, broken)
  assert sorted(p.name for p in final.iterdir()) == ['metrics.json', 'per_image.csv', 'table.txt']
  assert [p.name for p in (tmp_path / 'eval').iterdir()] == ['wv3_reduced']


def test_prepare_output_root_reports_an_unwritable_folder(tmp_path):
  assert reporting.prepare_output_root(tmp_path / 'a' / 'b').is_dir()
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  with pytest.raises(fileio.OutputError, match=r'evaluation output folder .*file/eval'):
    reporting.prepare_output_root(blocker / 'eval')


def test_rgb_bands_come_from_the_sensor_table():
  assert reporting.rgb_bands(8, 'WV3') == (4, 2, 1)
  assert reporting.rgb_bands(8, 'wv2') == (4, 2, 1)
  assert reporting.rgb_bands(4, 'GF-2') == (2, 1, 0)
  assert reporting.rgb_bands(31, 'CAVE') == (25, 15, 5)
  # Outside the table, or a band count the sensor does not have: spread over the spectrum.
  assert reporting.rgb_bands(12, 'Landsat') == (9, 6, 3)
  assert reporting.rgb_bands(12, 'WV3') == (9, 6, 3)
  assert reporting.rgb_bands(2, None) == (0,)


def test_image_files(tmp_path):
  rng = np.random.default_rng(1)
  gt = rng.uniform(0, 2047, (32, 24, 8))
  ref = {'gt': gt, 'lms': gt + 20, 'guide': gt.mean(-1, keepdims=True)}
  fused = (gt + rng.normal(0, 30, gt.shape)).astype(np.float32)
  reporting.write_image(tmp_path, 3, fused, ref, rgb=(4, 2, 1), max_value=2047.0, error_max=0.1)
  sr = scipy.io.loadmat(tmp_path / 'output_mulExm_3.mat')['sr']
  assert sr.dtype == np.float32
  np.testing.assert_array_equal(sr, fused)
  for name in ('lms', 'fused', 'gt', 'error', 'guide'):
    with Image.open(tmp_path / f'preview_3_{name}.png') as im:
      assert im.size == (24, 32) and im.mode == 'RGB'
  with Image.open(tmp_path / 'preview_3.png') as im:
    # Five titled pictures enlarged 4x to 128 px (32 -> 128), a colour bar beside the error map.
    assert im.size[1] > 128 and im.size[0] > 5 * 4 * 24
  # Without a reference (full resolution): no gt, no error map.
  pictures = reporting.previews(
    fused,
    {'lms': ref['lms'], 'guide': ref['guide']},
    rgb=(4, 2, 1),
    max_value=2047.0,
    error_max=0.1,
  )
  assert set(pictures) == {'lms', 'fused', 'guide', 'panel'}


def test_picture_primitives():
  image = np.linspace(0, 1, 100 * 3).reshape(10, 10, 3)
  lo, hi = reporting.stretch_limits(image, (0, 1, 2))
  np.testing.assert_allclose(lo, np.percentile(image.reshape(-1, 3), 2, axis=0))
  rgb = reporting.composite(image, (2, 1, 0), (lo, hi))
  assert rgb.dtype == np.uint8 and rgb.shape == (10, 10, 3)
  assert rgb.min() == 0 and rgb.max() == 255
  grey = reporting.composite(image, (0,), reporting.stretch_limits(image, (0,)))
  assert (grey[..., 0] == grey[..., 2]).all()
  colours = reporting.colormap(np.array([[0.0, 0.05, 0.1, 1.0]]), 0.1)
  np.testing.assert_array_equal(colours[0, 0], [0, 0, 128])  # Dark blue at 0.
  np.testing.assert_array_equal(colours[0, 2], [128, 0, 0])  # Dark red at the top, and above.
  np.testing.assert_array_equal(colours[0, 3], colours[0, 2])
