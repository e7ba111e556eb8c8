"""Tests of `io.naming`: the output files' names users see, written out literally here."""

import pytest

from u2net_jax.data import DataError, scene_lists
from u2net_jax.io import manifests, naming


@pytest.mark.parametrize(
  'kind, fields, expected',
  [
    ('evaluation', {}, 'eval'),
    ('table', {'ext': 'txt'}, 'table.txt'),
    ('table', {'ext': 'tex'}, 'table.tex'),
    ('metrics', {}, 'metrics.json'),
    ('per_image', {}, 'per_image.csv'),
    ('fused', {'index': 0}, 'output_mulExm_0.mat'),
    ('fused', {'index': 12}, 'output_mulExm_12.mat'),
    ('preview', {'index': 3}, 'preview_3.png'),
    ('preview_part', {'index': 3, 'part': 'error'}, 'preview_3_error.png'),
    ('figure', {'index': 1}, 'figure_1.png'),
    ('scene', {'scene': 'a_pan'}, 'a_pan.tif'),
    ('scene', {'scene': 'a.b'}, 'a.b.tif'),
    ('scene', {'scene': 'x.tiff'}, 'x.tiff'),  # A CSV `out` with its suffix is kept.
    ('scene', {'scene': 'x.TIF'}, 'x.TIF'),
    ('stac_item', {'scene': 'a_pan'}, 'a_pan.stac.json'),
    ('manifest', {'scene': 'a_pan'}, 'a_pan.manifest.json'),
    ('summary', {'ext': 'csv'}, 'summary.csv'),
  ],
)
def test_names(tmp_path, kind, fields, expected):
  assert naming.output_path(tmp_path, kind, **fields) == tmp_path / expected


def test_folders(tmp_path):
  assert naming.output_path(tmp_path, test_set='wv3') == tmp_path / 'wv3'
  assert naming.output_path(tmp_path, 'fused', test_set='wv3', method='GS', index=2) == (
    tmp_path / 'wv3' / 'GS' / 'output_mulExm_2.mat'
  )
  for bad in ('', '.', '..', 'a/b', 'a\\b'):
    with pytest.raises(ValueError, match='single file name'):
      naming.output_path(tmp_path, 'metrics', test_set=bad)
    with pytest.raises(ValueError, match='single file name'):
      naming.output_path(tmp_path, 'scene', scene=bad)
  with pytest.raises(KeyError):
    naming.output_path(tmp_path, 'fused')  # No index.
  with pytest.raises(KeyError):
    naming.output_path(tmp_path, 'nonsense')


def test_archive_names_beside_the_output(tmp_path):
  out = tmp_path / 'x.tiff'
  assert manifests.manifest_path(out) == tmp_path / 'x.manifest.json'
  assert manifests.stac_path(out) == tmp_path / 'x.stac.json'
  assert naming.scene_name(out) == 'x'


def test_scene_lists_name_outputs_by_the_rule(tmp_path):
  (tmp_path / 'list.csv').write_text('pan,ms,out\na_pan.tif,a_ms.tif,\nb.tif,b_ms.tif,y.tiff\n')
  (tmp_path / 'list2.csv').write_text('pan,ms,out\nc.tif,c_ms.tif,../z\n')
  scenes = scene_lists.read_scenes(str(tmp_path / 'list.csv'), tmp_path / 'out')
  out = (tmp_path / 'out').resolve()
  assert [(s.name, s.out) for s in scenes] == [
    ('a_pan', str(out / 'a_pan.tif')),
    ('y', str(out / 'y.tiff')),
  ]
  with pytest.raises(DataError, match=r'line 2: output .* must be a file name'):
    scene_lists.read_scenes(str(tmp_path / 'list2.csv'), tmp_path / 'out')
