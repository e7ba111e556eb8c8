"""Tests of `infer.archive` (`fuse.py --scenes`): many scenes on a real Dask LocalCluster.

Also its scene lists (`data.scene_lists`) and manifests (`io.manifests`).

The scene lists (CSV, glob pairs, STAC) and the restart logic run without a cluster (quick); the
rest on one LocalCluster of 2 worker processes shared by the module (slow): outputs equal to
single-scene runs, a corrupt scene isolated, a killed worker survived, a re-run that redoes
nothing. The tiny WV3-shaped model of `scene_test` keeps each scene to about a second.
"""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import rasterio
import scipy.io
from conftest import run_script, script_env, shared_path
from scene_test import PAN_PIXEL, make_pair, tiny_workdir, write_tiff  # noqa: F401

from u2net_jax.data import DataError, scene_lists
from u2net_jax.infer import network_fuser

distributed = pytest.importorskip('distributed', reason='dask.distributed is not installed')
pystac = pytest.importorskip('pystac', reason='pystac is not installed')
from u2net_jax.infer import archive  # noqa: E402

SIZES = [(64, 48), (80, 64), (48, 48), (96, 32)]


def _pairs(folder, sizes=SIZES, seed=0):
  """Synthetic GeoTIFF pairs `s<i>_pan.tif` / `s<i>_ms.tif`; returns their paths."""
  folder.mkdir(parents=True, exist_ok=True)
  pairs = []
  for i, (h, w) in enumerate(sizes):
    pan, ms = make_pair(np.random.default_rng(seed + i), h, w)
    pairs.append(
      (
        write_tiff(folder / f's{i}_pan.tif', pan),
        write_tiff(folder / f's{i}_ms.tif', ms, pixel=4 * PAN_PIXEL),
      )
    )
  return pairs


def _read(path):
  with rasterio.open(path) as f:
    return f.read(), f.crs, f.transform, f.tags(ns='IMAGE_STRUCTURE').get('LAYOUT')


def _reference(workdir, pan, ms, out):
  """What a single `fuse.py --cog` run writes (`network_fuser.fuse_files`), with one Fuser for all
  the references of the module (compiled once; `fuse.py` itself is run in the CLI test)."""
  loaded = archive._load(archive.engine_identity(archive.Engine(workdir=str(workdir)))[0])
  network_fuser.fuse_files(workdir, pan, ms, out, cog=True, progress=False, loaded=loaded)
  return _read(out)


def _assert_same(a, b):
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1:] == b[1:]


# ---------------------------------------------------------------------------------------------
# Scene lists (quick).


def test_scene_lists_csv_globs_and_stac(tmp_path):
  pairs = _pairs(tmp_path / 'in', sizes=[(32, 32)] * 3)
  (tmp_path / 'list.csv').write_text(
    'pan,ms,out\n'
    + ''.join(f'in/{p.name},in/{m.name},{o}\n' for (p, m), o in zip(pairs, 'abc', strict=True))
  )
  scenes = scene_lists.read_scenes(str(tmp_path / 'list.csv'), tmp_path / 'out')
  assert [s.name for s in scenes] == ['a', 'b', 'c']
  assert scenes[0].pan == str(pairs[0][0]) and scenes[0].out == str(tmp_path / 'out' / 'a.tif')
  globs = f'{tmp_path}/in/*_pan.tif,{tmp_path}/in/*_ms.tif'
  scenes = scene_lists.read_scenes(globs, tmp_path / 'out')
  assert [(s.name, s.ms) for s in scenes] == [(f's{i}_pan', str(pairs[i][1])) for i in range(3)]
  items = []
  for i, (p, m) in enumerate(pairs):
    item = pystac.Item(
      f'item{i}', None, None, pystac.utils.str_to_datetime('2020-01-02T00:00:00Z'), {}
    )
    item.add_asset('panchromatic', pystac.Asset(f'in/{p.name}'))
    item.add_asset('multispectral', pystac.Asset(str(m)))
    items.append(item)
  (tmp_path / 'items.json').write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
  scenes = scene_lists.read_scenes(
    str(tmp_path / 'items.json'),
    tmp_path / 'out',
    pan_asset='panchromatic',
    ms_asset='multispectral',
  )
  assert [s.name for s in scenes] == ['item0', 'item1', 'item2']
  assert scenes[1].pan == str(pairs[1][0]) and scenes[1].datetime.startswith('2020-01-02')
  with pytest.raises(DataError, match=r"no asset 'pan' \(--pan_asset\)"):
    scene_lists.read_scenes(str(tmp_path / 'items.json'), tmp_path / 'out')


def test_scene_lists_are_checked(tmp_path):
  pairs = _pairs(tmp_path / 'in', sizes=[(32, 32)] * 2)
  pairs[1][1].rename(tmp_path / 'in' / 's2_ms.tif')  # s1's MS missing: s0-s0, s1-s2.
  with pytest.raises(DataError, match='wildcard parts differ'):
    scene_lists.read_scenes(f'{tmp_path}/in/*_pan.tif,{tmp_path}/in/*_ms.tif', tmp_path / 'out')
  (tmp_path / 'in' / 's3_ms.tif').write_bytes(b'')
  with pytest.raises(DataError, match='2 PAN files match .* but 3 MS files'):
    scene_lists.read_scenes(f'{tmp_path}/in/*_pan.tif,{tmp_path}/in/*_ms.tif', tmp_path / 'out')
  (tmp_path / 'dup.csv').write_text('pan,ms\na/x.tif,a/y.tif\nb/x.tif,b/y.tif\n')
  with pytest.raises(DataError, match='two scenes write x.tif'):
    scene_lists.read_scenes(str(tmp_path / 'dup.csv'), tmp_path / 'out')
  (tmp_path / 'cols.csv').write_text('a,b\n1,2\n')
  with pytest.raises(DataError, match='needs the columns pan,ms'):
    scene_lists.read_scenes(str(tmp_path / 'cols.csv'), tmp_path / 'out')
  with pytest.raises(DataError, match='no such file'):
    scene_lists.read_scenes(str(tmp_path / 'none.csv'), tmp_path / 'out')


def test_cli_refuses_bad_flags_in_one_line(tmp_path):
  done = run_script(
    'fuse.py', '--workdir=w', f'--scenes={tmp_path}/none.csv', f'--out_dir={tmp_path}/out'
  )
  assert done.returncode == 1 and 'Traceback' not in done.stderr
  assert done.stderr.strip().splitlines()[-1].startswith(f'error: --scenes {tmp_path}/none.csv')


# ---------------------------------------------------------------------------------------------
# On a LocalCluster of 2 worker processes (slow).


@pytest.fixture(scope='module')
def cluster():
  """2 single-threaded worker processes (they inherit the suite's XLA flags), shared."""
  with (
    distributed.LocalCluster(
      n_workers=2, threads_per_worker=1, processes=True, dashboard_address=':0'
    ) as c,
    distributed.Client(c) as client,
  ):
    yield c, client


def _run(scenes, workdir, out, cluster, **kw):
  return archive.run(
    scenes,
    archive.Engine(workdir=str(workdir)),
    out,
    scheduler=cluster[0].scheduler_address,
    stream=None,
    **kw,
  )


@pytest.mark.slow
def test_archive_equals_single_runs_isolates_failures_and_reruns_nothing(
  tiny_workdir,  # noqa: F811
  cluster,
  tmp_path,
):
  pairs = _pairs(tmp_path / 'in')
  (tmp_path / 'in' / 'bad_pan.tif').write_bytes(b'II*\x00 truncated')  # A corrupt TIFF.
  write_tiff(tmp_path / 'in' / 'bad_ms.tif', np.zeros((8, 8, 8), np.uint16))
  scenes = scene_lists.read_scenes(
    f'{tmp_path}/in/*_pan.tif,{tmp_path}/in/*_ms.tif', tmp_path / 'out'
  )
  summary = _run(scenes, tiny_workdir, tmp_path / 'out', cluster)
  assert (summary['done'], summary['failed'], summary['skipped']) == (4, 1, 0)
  rows = {r['scene']: r for r in summary['rows']}
  assert 'bad_pan.tif: cannot read it as a raster' in rows['bad_pan']['error']
  assert rows['s1_pan']['pixels'] == 80 * 64 and rows['s1_pan']['error'] == ''
  table = (tmp_path / 'out' / 'summary.csv').read_text().splitlines()
  assert table[0] == 'scene,status,seconds,pixels,nodata_pixels,error,output' and len(table) == 6
  # Bit-identical to single-scene runs; COG; a STAC Item linking inputs and weights.
  for i, (pan, ms) in enumerate(pairs):
    got = _read(tmp_path / 'out' / f's{i}_pan.tif')
    _assert_same(got, _reference(tiny_workdir, pan, ms, tmp_path / f'ref{i}.tif'))
    assert got[3] == 'COG'
  item = pystac.Item.from_file(str(tmp_path / 'out' / 's0_pan.stac.json'))
  assert {link.href for link in item.links if link.rel == 'derived_from'} == set(map(str, pairs[0]))
  assert item.properties['u2net:weights']['step'] == 0 and item.assets['fused'].href == 's0_pan.tif'
  # The weights were loaded once per worker process, not per scene.
  loads = cluster[1].run(lambda: archive.LOADS['count'])
  assert 1 <= sum(loads.values()) <= 2 and max(loads.values()) == 1
  # A re-run redoes nothing (no task: the outputs are complete by stat); the corrupt one again.
  mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / 'out').glob('s?_pan*')}
  again = _run(scenes[1:], tiny_workdir, tmp_path / 'out', cluster)  # Without bad_pan.
  assert (again['done'], again['skipped'], again['failed']) == (0, 4, 0)
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / 'out').glob('s?_pan*')} == mtimes
  # A damaged output (and one deleted) are made again; the rest skipped after a content check.
  (tmp_path / 'out' / 's2_pan.tif').write_bytes(b'damaged')
  (tmp_path / 'out' / 's3_pan.tif').unlink()
  os.utime(pairs[0][0])  # New mtime, same content: checked by a task, not redone.
  third = _run(scenes[1:], tiny_workdir, tmp_path / 'out', cluster)
  assert {r['scene']: r['status'] for r in third['rows']} == {
    's0_pan': 'skipped',
    's1_pan': 'skipped',
    's2_pan': 'done',
    's3_pan': 'done',
  }
  for i in (2, 3):
    _assert_same(_read(tmp_path / 'out' / f's{i}_pan.tif'), _read(tmp_path / f'ref{i}.tif'))


@pytest.mark.slow
def test_a_killed_worker_costs_only_its_scene(tiny_workdir, cluster, tmp_path):  # noqa: F811
  pairs = _pairs(tmp_path / 'in', sizes=[(192, 192)] * 4, seed=10)
  scenes = scene_lists.read_scenes(
    f'{tmp_path}/in/*_pan.tif,{tmp_path}/in/*_ms.tif', tmp_path / 'out'
  )
  client = cluster[1]
  result = {}
  thread = threading.Thread(
    target=lambda: result.update(_run(scenes, tiny_workdir, tmp_path / 'out', cluster))
  )
  thread.start()
  killed = None
  deadline = time.monotonic() + 60
  while killed is None and time.monotonic() < deadline:
    busy = [w for w, keys in client.processing().items() if keys]
    if busy:
      killed = client.run(os.getpid, workers=busy[:1])[busy[0]]
      os.kill(killed, signal.SIGKILL)  # Mid-scene: the worker's process dies.
    time.sleep(0.02)
  thread.join(timeout=120)
  assert killed is not None and not thread.is_alive()
  statuses = {r['scene']: r['status'] for r in result['rows']}
  if set(statuses.values()) != {'done'}:  # Rescheduled too often: the re-run completes it.
    again = _run(scenes, tiny_workdir, tmp_path / 'out', cluster)
    assert again['failed'] == 0 and again['done'] == list(statuses.values()).count('failed')
  for i, (pan, ms) in enumerate(pairs):
    _assert_same(
      _read(tmp_path / 'out' / f's{i}_pan.tif'),
      _reference(tiny_workdir, pan, ms, tmp_path / f'ref{i}.tif'),
    )
  assert not list((tmp_path / 'out').glob('.*'))  # No temporaries left behind.
  client.wait_for_workers(2, timeout=60)  # The nanny restarted it.


@pytest.mark.slow
def test_cli_exit_code_counts_failures_and_equals_fuse_py(tiny_workdir, tmp_path):  # noqa: F811
  pairs = _pairs(tmp_path / 'in', sizes=SIZES[:2])
  (tmp_path / 'in' / 'list.csv').write_text(
    'pan,ms,out\ns0_pan.tif,s0_ms.tif,first\ns1_pan.tif,s1_ms.tif,second.tif\n'
    'missing_pan.tif,s1_ms.tif,third\n'
  )
  env = script_env(cache_dir=tmp_path / 'jax_cache')
  common = [f'--workdir={tiny_workdir}', '--noprogress']
  done = run_script(
    'fuse.py',
    *common,
    f'--scenes={tmp_path / "in" / "list.csv"}',
    f'--out_dir={tmp_path / "out"}',
    '--workers=1',  # The 2-worker cases run on the module's cluster; a second one costs.
    '--dashboard_address=:0',
    env=env,
  )
  assert done.returncode == 1, done.stderr[-3000:]  # One scene failed.
  assert done.stderr.strip().splitlines()[-1].startswith('error: 1 of 3 scenes failed')
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert [(r['scene'], r['status']) for r in summary['rows']] == [
    ('first', 'done'),
    ('second', 'done'),
    ('third', 'failed'),
  ]
  assert 'missing_pan.tif: file not found' in summary['rows'][2]['error']
  single = run_script(
    'fuse.py',
    *common,
    f'--pan={pairs[1][0]}',
    f'--ms={pairs[1][1]}',
    f'--out={tmp_path / "single.tif"}',
    '--cog',
    env=env,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  _assert_same(_read(tmp_path / 'out' / 'second.tif'), _read(tmp_path / 'single.tif'))


@pytest.mark.slow
def test_real_wv2_crop_from_a_stac_list(tiny_workdir, cluster, tmp_path):  # noqa: F811
  """A 256 x 256 crop of the real WorldView-2 scene, listed as a STAC Item."""
  data = scipy.io.loadmat(shared_path('data', 'pnn-wv2-ikonos-geoeye1', 'imgWV2.mat'))
  pan, ms = data['I_PAN'][:256, :256], data['I_MS'][:64, :64]
  write_tiff(tmp_path / 'pan.tif', pan)
  write_tiff(tmp_path / 'ms.tif', ms, pixel=4 * PAN_PIXEL)
  item = pystac.Item(
    'wv2_crop', None, None, pystac.utils.str_to_datetime('2011-07-01T00:00:00Z'), {}
  )
  item.add_asset('pan', pystac.Asset('pan.tif'))
  item.add_asset('ms', pystac.Asset('ms.tif'))
  (tmp_path / 'items.json').write_text(json.dumps(pystac.ItemCollection([item]).to_dict()))
  scenes = scene_lists.read_scenes(str(tmp_path / 'items.json'), tmp_path / 'out')
  summary = _run(scenes, tiny_workdir, tmp_path / 'out', cluster)
  assert summary['done'] == 1, summary
  _assert_same(
    _read(tmp_path / 'out' / 'wv2_crop.tif'),
    _reference(tiny_workdir, tmp_path / 'pan.tif', tmp_path / 'ms.tif', tmp_path / 'ref.tif'),
  )
  out_item = pystac.Item.from_file(str(tmp_path / 'out' / 'wv2_crop.stac.json'))
  assert out_item.datetime.year == 2011 and out_item.bbox is not None
