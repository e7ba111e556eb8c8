"""Scene fusion (`fuse.py`, `u2net_jax.infer.scene`): throughput and peak memory, window by window.

Cases, each in a fresh subprocess that reports its own peak resident set (VmHWM, read in the
child: no other case or the parent counts; `os.wait4`'s `ru_maxrss` would not do, as Linux carries
the parent's high-water mark into a child started by fork/vfork + exec):

  wv2_scene       the real WorldView-2 scene of ../shared/data/pnn-wv2-ikonos-geoeye1/imgWV2.mat
                  (PAN 1280 x 1280, MS 320 x 320 x 8, uint16) as GeoTIFFs, the released WV3
                  weights: `network_fuser.fuse_files` GeoTIFF -> GeoTIFF (reads, tiling,
                  fusion, writes)
                  in megapixels of PAN per second, beside the pure tile inference of the same 441
                  tiles (`tiling.extract_tiles` in memory, then `Fuser.fuse_tiles`: no reading, no
                  writing) in the same process, both after a warm-up batch that compiles.
  synthetic_2048, synthetic_8192
                  synthetic 8-band scenes (PAN 2048^2 and 8192^2) through a tiny-width model
                  (the V2 variant at width 4,
                  random weights, 16 tiles per call, the default): peak RSS must not grow with
                  the scene.
  official_wv2    the official PyTorch code's test.py tiling (loaded at run time from
                  ../shared/official/code, 2 threads) on the first `--official_tiles` tiles of
                  the real scene: its rate in megapixels of PAN per second (extrapolated; all 441
                  tiles take ~10 min on 2 cores). Needs torch; skipped without it.
  vs_gdal         GDAL's `gdal_pansharpen` (weighted Brovey with equal weights, cubic resampling,
                  streaming, multi-threaded C++; `-threads ALL_CPUS` with the output's deflate
                  on all CPUs too (`-co NUM_THREADS=ALL_CPUS`), and `-threads 1`) beside
                  `fuse.py --method=NAME` (the classical methods, streamed) and `fuse.py
                  --workdir` (U2Net) on the same GeoTIFF scenes (`--vs_scenes`: synthetic
                  `synSIDExBANDS`, uint16 in 0..2047, 4x MS; `wv2`, the real scene above), in
                  interleaved rounds (`--rounds`; each round runs every runner once, the order
                  rotated). Every run is the real command line in its own process, timed from
                  its start to its end (interpreter start and imports included, as a user
                  waits for them), its peak RSS read by a stdlib-only launcher process through
                  `os.wait4` (the `ru_maxrss` carry-over above is then the launcher's ~20 MB,
                  recorded as `launcher_rss_gb`, not the benchmark's). Not in the default
                  `--cases` (it takes an hour on 2 cores with every scene and runner). Both
                  sides write the same GeoTIFF (256-px tiles, deflate, predictor 2); the table
                  gives MP of PAN/s, CPU s, peak RSS, output size, the speed ratio to
                  gdal_pansharpen (ALL_CPUS) in the same round (median over rounds), and whether
                  the output has GDAL's grid (CRS, transform, shape, bands). GDAL rows are
                  skipped with the reason when `gdal_pansharpen.py` is absent (`apt-get install
                  gdal-bin python3-gdal`); method rows when `fuse.py` has no `--method`.

Usage (from the repository root)::

  python benchmarks/scene_benchmark.py                 # all but vs_gdal (~5 min on 2 CPU cores)
  python benchmarks/scene_benchmark.py --cases=synthetic_2048,synthetic_8192
  python benchmarks/scene_benchmark.py --cases=vs_gdal --rounds=3 \
      --vs_scenes=syn2048x4,syn2048x8,wv2 --vs_runners=gdal,gdal_1thread,bt-h,mtf-glp-fs

Writes `benchmarks/results/scene_benchmark.json` (or `--out`) and prints a markdown table.

Size: ~730 lines, one script: the vs_gdal runs share the cases' scene writers and report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
SCENE = SHARED / 'data' / 'pnn-wv2-ikonos-geoeye1' / 'imgWV2.mat'
WEIGHTS = SHARED / 'official' / 'u2net_wv3_200000_iter.pth'
OFFICIAL_CODE = SHARED / 'official' / 'code'
RESULTS = REPO / 'benchmarks' / 'results' / 'scene_benchmark.json'
CASES = ('wv2_scene', 'synthetic_2048', 'synthetic_8192', 'official_wv2', 'vs_gdal')
DEFAULT_CASES = tuple(c for c in CASES if c != 'vs_gdal')  # vs_gdal takes an hour: asked for.
VS_SCENES = ('syn2048x4', 'syn2048x8', 'syn8192x4', 'syn8192x8', 'wv2')
VS_RUNNERS = (
  'gdal',
  'gdal_1thread',
  'bt-h',
  'gsa',
  'mtf-glp-hpm',
  'mtf-glp-fs',
  'awlp',
  'u2net_tiny',
  'u2net',
)
SENSOR_OF_BANDS = {4: 'QB', 8: 'WV2'}  # Synthetic scenes: 11-bit sensors with these band counts.
GDAL_INSTALL = 'apt-get install gdal-bin python3-gdal'
# What fuse.py writes (raster_sinks.open_sink): the same GeoTIFF layout for GDAL's output.
GDAL_CREATION = (
  'TILED=YES',
  'BLOCKXSIZE=256',
  'BLOCKYSIZE=256',
  'COMPRESS=DEFLATE',
  'PREDICTOR=2',
  'BIGTIFF=IF_SAFER',
)
CRS = 'EPSG:32633'
PAN_PIXEL = 0.5
# The cheapest real U2Net: the V2 variant (concatenation + 1x1 projection instead of S2Blocks) at
# width 4, so that 8192^2 (16,641 tiles) runs in minutes on 2 cores; what is measured is the
# memory of the streaming, not of the model.
TINY_MODEL = {'width': 4, 'head_dim': 4, 'variant': 'v2_concat'}
TINY_TILE_BATCH = 16  # The default tile batch: square 16 x 16-tile windows, as in real use.


# ---------------------------------------------------------------------------------------------
# Inputs (parent side).


def _write_tiff(path: Path, height: int, width: int, bands: int, pixel: float, fill) -> Path:
  """A uint16 GeoTIFF written by strips of 512 rows: `fill(y0, y1)` -> (y1 - y0, width, bands)."""
  import rasterio
  from rasterio.transform import Affine
  from rasterio.windows import Window

  profile = {
    'driver': 'GTiff',
    'height': height,
    'width': width,
    'count': bands,
    'dtype': 'uint16',
    'crs': CRS,
    'transform': Affine(pixel, 0, 500000.0, 0, -pixel, 4600000.0),
    'tiled': True,
    'blockxsize': 256,
    'blockysize': 256,
    'compress': 'deflate',
  }
  with rasterio.open(path, 'w', **profile) as dst:
    for y0 in range(0, height, 512):
      y1 = min(height, y0 + 512)
      dst.write(fill(y0, y1).transpose(2, 0, 1), window=Window(0, y0, width, y1 - y0))
  return path


def _synthetic_fill(width: int, bands: int, seed: int):
  import numpy as np

  def fill(y0, y1):
    rng = np.random.default_rng([seed, y0])
    yy, xx = np.mgrid[y0:y1, 0:width].astype(np.float32)
    base = 1000 + 600 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
    noise = rng.uniform(-80, 80, (y1 - y0, width, bands)).astype(np.float32)
    return np.clip(base[..., None] + noise, 0, 2047).astype(np.uint16)

  return fill


def prepare_inputs(case: str, folder: Path) -> dict:
  """Writes the case's workdir and GeoTIFFs into `folder` (not measured)."""
  import scipy.io

  from u2net_jax import convert
  from u2net_jax.run import config_utils

  config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
  workdir = folder / 'workdir'
  if case in ('wv2_scene', 'official_wv2'):
    if not (SCENE.exists() and WEIGHTS.exists()):
      raise FileNotFoundError(f'{SCENE} or {WEIGHTS} is absent (../shared)')
    data = scipy.io.loadmat(SCENE)
    pan, ms = data['I_PAN'][..., None], data['I_MS']
    _write_tiff(folder / 'pan.tif', *pan.shape, PAN_PIXEL, lambda y0, y1: pan[y0:y1])
    _write_tiff(folder / 'ms.tif', *ms.shape, 4 * PAN_PIXEL, lambda y0, y1: ms[y0:y1])
    if case == 'wv2_scene':
      convert.convert_to_workdir(WEIGHTS, config, workdir)
  else:
    side = int(case.split('_')[1])
    _write_tiff(folder / 'pan.tif', side, side, 1, PAN_PIXEL, _synthetic_fill(side, 1, 0))
    small = side // 4
    _write_tiff(folder / 'ms.tif', small, small, 8, 4 * PAN_PIXEL, _synthetic_fill(small, 8, 1))
    _tiny_workdir('wv3', workdir)
  return {'workdir': str(workdir), 'pan': str(folder / 'pan.tif'), 'ms': str(folder / 'ms.tif')}


def _tiny_workdir(config_name: str, workdir: Path) -> Path:
  """A workdir of the tiny model (TINY_MODEL, random weights) for configs/<config_name>.py."""
  import jax

  from u2net_jax import models
  from u2net_jax.run import checkpointing, config_utils

  config = config_utils.load_config_file(REPO / 'configs' / f'{config_name}.py')
  with config.unlocked():
    config.model.update(TINY_MODEL)
    config.eval.tile_batch = TINY_TILE_BATCH
  model = models.create_model(config.model)
  params = models.init_params(model, jax.random.key(0))
  config_utils.save_config(config, workdir)
  checkpointing.save_params(workdir, params)
  return workdir


# ---------------------------------------------------------------------------------------------
# Cases (child side).


def _fuse(inputs: dict, out: Path) -> dict:
  from u2net_jax.infer import network_fuser

  start = time.perf_counter()
  result = network_fuser.fuse_files(
    inputs['workdir'], inputs['pan'], inputs['ms'], out, overwrite=True, progress=False
  )
  result['wall_s'] = time.perf_counter() - start
  return result


def case_wv2_scene(inputs: dict, folder: Path) -> dict:
  import numpy as np

  from u2net_jax.data import rasters
  from u2net_jax.infer import tiling
  from u2net_jax.run import checkpointing, config_utils

  pan = rasters.open_raster(inputs['pan'], 'PAN')
  ms = rasters.open_raster(inputs['ms'], 'MS')
  mx = np.float32(2047)
  ms_tiles, guide_tiles = tiling.extract_tiles(
    ms.read(0, ms.height, 0, ms.width).astype(np.float32) / mx,
    pan.read(0, pan.height, 0, pan.width).astype(np.float32) / mx,
  )
  config = config_utils.load_config(inputs['workdir'])
  params, _, _ = checkpointing.restore_params(inputs['workdir'], config.model)
  fuser = tiling.Fuser(config.model, params, tile_batch=config.eval.tile_batch)
  start = time.perf_counter()
  fuser.fuse_tiles(ms_tiles[: fuser.tile_batch], guide_tiles[: fuser.tile_batch])
  compile_s = time.perf_counter() - start  # Compiles the one program both paths run.
  # Pure tile inference: the whole scene cut in memory, no file access.
  start = time.perf_counter()
  fuser.fuse_tiles(ms_tiles, guide_tiles)
  pure = time.perf_counter() - start
  del ms_tiles, guide_tiles
  warm = _fuse(inputs, folder / 'fused.tif')  # GeoTIFF -> GeoTIFF, window by window.
  megapixels = pan.height * pan.width / 1e6
  return {
    'what': f'real WV2 scene {pan.height}x{pan.width}, released WV3 weights, GeoTIFF -> GeoTIFF',
    'megapixels': megapixels,
    'tiles': warm['tiles'],
    'windows': warm['windows'],
    'compile_s': compile_s,
    'scene_s': warm['seconds'],
    'scene_wall_s': warm['wall_s'],
    'scene_mp_per_s': megapixels / warm['seconds'],
    'pure_tiles_s': pure,
    'pure_mp_per_s': megapixels / pure,
    'scene_vs_pure': pure / warm['seconds'],
  }


def case_synthetic(inputs: dict, folder: Path, side: int) -> dict:
  result = _fuse(inputs, folder / 'fused.tif')
  return {
    'what': f'synthetic {side}x{side} PAN, 8 bands, tiny model (V2, width 4), GeoTIFF -> GeoTIFF',
    'megapixels': side * side / 1e6,
    'tiles': result['tiles'],
    'windows': result['windows'],
    'scene_s': result['seconds'],
    'scene_wall_s': result['wall_s'],
    'scene_mp_per_s': side * side / 1e6 / result['seconds'],
  }


def case_official(inputs: dict, folder: Path, tiles: int) -> dict:
  """test.py's loop over the first `tiles` tiles of the scene, with the official model."""
  import numpy as np
  import torch

  from u2net_jax.data import rasters

  torch.set_num_threads(2)
  sys.path.insert(0, str(OFFICIAL_CODE))
  from model.u2net import U2Net  # The authors' code, loaded at run time.

  model = U2Net(dim=32).eval()
  model.load_state_dict(torch.load(WEIGHTS, map_location='cpu'))
  pan = rasters.open_raster(inputs['pan'], 'PAN')
  ms = rasters.open_raster(inputs['ms'], 'MS')
  x1 = torch.from_numpy(ms.read(0, ms.height, 0, ms.width).astype(np.float32) / 2047.0)
  x2 = torch.from_numpy(pan.read(0, pan.height, 0, pan.width).astype(np.float32) / 2047.0)
  x1, x2 = x1.permute(2, 0, 1)[None], x2.permute(2, 0, 1)[None]
  cut, pad = 64, 4
  height, width = x2.shape[2:]
  edge_h, edge_w = cut - height % cut, cut - width % cut
  x1 = torch.nn.functional.pad(x1, (1, 1, 1, 1), 'reflect')
  x2 = torch.nn.functional.pad(x2, (pad, pad, pad, pad), 'reflect')
  x1_pad = torch.zeros(1, 8, ms.height + 2 + edge_h // 4, ms.width + 2 + edge_w // 4)
  x2_pad = torch.zeros(1, 1, height + 2 * pad + edge_h, width + 2 * pad + edge_w)
  x1_pad[:, :, : ms.height + 2, : ms.width + 2] = x1
  x2_pad[:, :, : height + 2 * pad, : width + 2 * pad] = x2
  rows, cols = (height + edge_h) // cut, (width + edge_w) // cut
  done = 0
  start = time.perf_counter()
  with torch.no_grad():
    for i in range(rows):
      for j in range(cols):
        if done == tiles:
          break
        m = x1_pad[:, :, i * 16 : (i + 1) * 16 + 2, j * 16 : (j + 1) * 16 + 2]
        p = x2_pad[:, :, i * cut : (i + 1) * cut + 2 * pad, j * cut : (j + 1) * cut + 2 * pad]
        torch.clamp(model(m, p), 0, 1)
        done += 1
  seconds = time.perf_counter() - start
  per_tile = seconds / done
  return {
    'what': f'official test.py tiling, PyTorch CPU 2 threads, first {done} of {rows * cols} tiles',
    'tiles': rows * cols,
    'measured_tiles': done,
    'per_tile_s': per_tile,
    'scene_s_extrapolated': per_tile * rows * cols,
    'scene_mp_per_s': height * width / 1e6 / (per_tile * rows * cols),
  }


def run_case(case: str, inputs: dict, folder: Path, official_tiles: int) -> dict:
  if case == 'wv2_scene':
    return case_wv2_scene(inputs, folder)
  if case == 'official_wv2':
    return case_official(inputs, folder, official_tiles)
  return case_synthetic(inputs, folder, int(case.split('_')[1]))


# ---------------------------------------------------------------------------------------------
# vs_gdal: gdal_pansharpen beside fuse.py on the same scenes, every run a command in its process.


def _gdal_script() -> str | None:
  return shutil.which('gdal_pansharpen.py') or shutil.which('gdal_pansharpen')


def _fuse_has_method() -> bool:
  return re.search(r"DEFINE_\w+\(\s*'method'", (REPO / 'fuse.py').read_text()) is not None


def _scene_spec(name: str):
  """'syn2048x8' -> (2048, 8); 'wv2' -> None; anything else -> ValueError."""
  if name == 'wv2':
    return None
  match = re.fullmatch(r'syn(\d+)x(\d+)', name)
  if not match or int(match[1]) % 4 or int(match[2]) not in SENSOR_OF_BANDS:
    raise ValueError(
      f'scene {name!r}: expected wv2 or synSIDExBANDS with SIDE a multiple of 4 and BANDS in '
      f'{sorted(SENSOR_OF_BANDS)}'
    )
  return int(match[1]), int(match[2])


def prepare_vs_scene(name: str, folder: Path, runners) -> dict:
  """Writes one scene's GeoTIFFs, and the workdirs its U2Net runners need, into `folder`."""
  folder.mkdir()
  spec = _scene_spec(name)
  if spec is None:
    if not SCENE.exists():
      raise FileNotFoundError(f'{SCENE} is absent (../shared)')
    import scipy.io

    data = scipy.io.loadmat(SCENE)
    pan, ms = data['I_PAN'][..., None], data['I_MS']
    _write_tiff(folder / 'pan.tif', *pan.shape, PAN_PIXEL, lambda y0, y1: pan[y0:y1])
    _write_tiff(folder / 'ms.tif', *ms.shape, 4 * PAN_PIXEL, lambda y0, y1: ms[y0:y1])
    (height, width), bands, sensor = pan.shape[:2], ms.shape[2], 'WV2'
  else:
    (side, bands), sensor = spec, SENSOR_OF_BANDS[spec[1]]
    height = width = side
    _write_tiff(folder / 'pan.tif', side, side, 1, PAN_PIXEL, _synthetic_fill(side, 1, 0))
    small = side // 4
    fill = _synthetic_fill(small, bands, 1)
    _write_tiff(folder / 'ms.tif', small, small, bands, 4 * PAN_PIXEL, fill)
  scene = {
    'scene': name,
    'pan': str(folder / 'pan.tif'),
    'ms': str(folder / 'ms.tif'),
    'bands': bands,
    'sensor': sensor,
    'shape': [height, width],
    'megapixels': height * width / 1e6,
  }
  if 'u2net_tiny' in runners:
    config_name = {4: 'qb', 8: 'wv2'}[bands]
    scene['tiny_workdir'] = str(_tiny_workdir(config_name, folder / 'tiny'))
  if 'u2net' in runners and bands == 8 and WEIGHTS.exists():
    from u2net_jax import convert
    from u2net_jax.run import config_utils

    config = config_utils.load_config_file(REPO / 'configs' / 'wv3.py')
    convert.convert_to_workdir(WEIGHTS, config, folder / 'released')
    scene['released_workdir'] = str(folder / 'released')
  return scene


def runner_unavailable(runner: str, scene: dict) -> str | None:
  """Why `runner` cannot run on `scene` (the row is then skipped with it), or None."""
  if runner.startswith('gdal'):
    return None if _gdal_script() else f'gdal_pansharpen.py not found ({GDAL_INSTALL})'
  if runner == 'u2net':
    return None if 'released_workdir' in scene else 'released WV3 weights: 8-band scenes only'
  if runner != 'u2net_tiny' and not _fuse_has_method():
    return 'fuse.py has no --method yet'
  return None


def runner_command(runner: str, scene: dict, out: Path) -> list[str]:
  """The command line of one run: what a user types."""
  if runner.startswith('gdal'):
    bands = scene['bands']
    # Weighted Brovey with equal weights: pseudo-PAN = the mean of the bands.
    weights = [a for _ in range(bands) for a in ('-w', f'{1 / bands:.17g}')]
    creation = [a for option in GDAL_CREATION for a in ('-co', option)]
    threads = '1' if runner == 'gdal_1thread' else 'ALL_CPUS'
    if (
      threads == 'ALL_CPUS'
    ):  # The deflate of the output too (GTiff NUM_THREADS), as fast as asked.
      creation += ['-co', 'NUM_THREADS=ALL_CPUS']
    return [
      *[_gdal_script(), scene['pan'], scene['ms'], str(out)],
      *['-r', 'cubic', *weights, '-threads', threads, *creation, '-q'],
    ]
  fuse = [sys.executable, str(REPO / 'fuse.py'), f'--pan={scene["pan"]}', f'--ms={scene["ms"]}']
  fuse += [f'--out={out}', '--noprogress']
  if runner == 'u2net_tiny':
    return [*fuse, f'--workdir={scene["tiny_workdir"]}']
  if runner == 'u2net':
    return [*fuse, f'--workdir={scene["released_workdir"]}']
  return [*fuse, f'--method={runner}', f'--sensor={scene["sensor"]}']


def launch(cmd: list[str], log: Path) -> dict:
  """Launcher side: runs `cmd` (stdout to log.out, stderr to log.err) and measures it.

  The peak RSS is the command's `ru_maxrss` from `os.wait4`: Linux counts into it the mm the
  command was started from (this launcher's: stdlib only, `launcher_rss_gb`), never the parent
  benchmark's.
  """
  import benchmark

  with open(f'{log}.out', 'w') as out, open(f'{log}.err', 'w') as err:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  return {
    'rc': proc.returncode,
    'wall_s': wall,
    'cpu_s': usage.ru_utime + usage.ru_stime,
    'peak_rss_gb': usage.ru_maxrss * 1024 / 1e9,
    'launcher_rss_gb': benchmark._peak_rss_gb(),
  }


def _grid(path: Path) -> dict:
  import rasterio

  with rasterio.open(path) as src:
    return {
      'crs': str(src.crs),
      'transform': [round(v, 9) for v in tuple(src.transform)[:6]],
      'shape': [src.height, src.width],
      'count': src.count,
      'dtype': src.dtypes[0],
    }


def _run_once(runner: str, scene: dict, folder: Path, grids: dict) -> dict:
  """One run of `runner` in a launcher process; its output's grid kept the first time."""
  out = folder / f'{runner}.tif'
  out.unlink(missing_ok=True)
  log = folder / runner
  load = os.getloadavg()[0]
  cmd = [sys.executable, __file__, f'--launch={json.dumps(runner_command(runner, scene, out))}']
  proc = subprocess.run([*cmd, f'--log={log}'], cwd=REPO, stdout=subprocess.PIPE, text=True)
  if proc.returncode:
    return {'error': f'launcher exit {proc.returncode}', 'load': load}
  run = dict(json.loads(proc.stdout.strip().splitlines()[-1]), load=load)
  if run['rc'] != 0 or not out.exists():
    tail = Path(f'{log}.err').read_text()[-1500:]
    return dict(run, error=f'exit {run["rc"]}: {tail}')
  run['output_mb'] = out.stat().st_size / 1e6
  if not runner.startswith('gdal'):  # fuse.py's JSON summary: the time inside the fusion loop.
    summary = json.loads(Path(f'{log}.out').read_text().strip().splitlines()[-1])
    run['inner_s'] = summary.get('seconds')
  if runner not in grids:
    grids[runner] = _grid(out)
  out.unlink()  # Large scenes: one output on disk at a time.
  return run


def _summarise(scene: dict, runs: dict, grids: dict) -> list[dict]:
  """One row per runner: medians over the rounds, the ratio to gdal_pansharpen per round."""
  rows = []
  base = {'case': 'vs_gdal', 'scene': scene['scene'], 'megapixels': scene['megapixels']}
  reference = grids.get('gdal') or grids.get('gdal_1thread')
  for runner, done in runs.items():
    row = dict(base, runner=runner, runs=done)
    errors = [r['error'] for r in done if 'error' in r]
    if errors:
      rows.append(dict(row, error=errors[0]))
      continue
    wall = statistics.median(r['wall_s'] for r in done)
    row.update(
      rounds=len(done),
      wall_s=wall,
      mp_per_s=scene['megapixels'] / wall,
      cpu_s=statistics.median(r['cpu_s'] for r in done),
      peak_rss_gb=max(r['peak_rss_gb'] for r in done),
      output_mb=done[0]['output_mb'],
      load=[min(r['load'] for r in done), max(r['load'] for r in done)],
      grid=grids[runner],
    )
    if all(r.get('inner_s') is not None for r in done):
      row['inner_s'] = statistics.median(r['inner_s'] for r in done)
    if 'gdal' in runs and not any('error' in r for r in runs['gdal']):
      # Same round, same scene: GDAL's time over this runner's (> 1: faster than GDAL).
      ratios = [g['wall_s'] / r['wall_s'] for g, r in zip(runs['gdal'], done, strict=True)]
      row.update(ratios_to_gdal=ratios, ratio_to_gdal=statistics.median(ratios))
      # CPU seconds: what the shared machine's other load changes least.
      cpu = [g['cpu_s'] / r['cpu_s'] for g, r in zip(runs['gdal'], done, strict=True)]
      row['cpu_ratio_to_gdal'] = statistics.median(cpu)
    if reference is not None:
      row['same_grid_as_gdal'] = all(
        grids[runner][k] == reference[k] for k in ('crs', 'transform', 'shape', 'count')
      )
    rows.append(row)
  return rows


def run_vs_gdal(args, root: Path) -> list[dict]:
  """Every scene of `--vs_scenes`: `--rounds` rounds of every runner, the order rotated."""
  runners = [r.strip() for r in args.vs_runners.split(',') if r.strip()]
  rows = []
  for name in [s.strip() for s in args.vs_scenes.split(',') if s.strip()]:
    base = {'case': 'vs_gdal', 'scene': name}
    print(f'preparing {name} ...', flush=True)
    try:
      scene = prepare_vs_scene(name, root / f'vs_{name}', runners)
    except FileNotFoundError as e:
      rows.append(dict(base, runner='-', skipped=str(e)))
      continue
    skipped = {r: runner_unavailable(r, scene) for r in runners}
    active = [r for r in runners if not skipped[r]]
    runs, grids = {r: [] for r in active}, {}
    for k in range(args.rounds):
      shift = k % max(1, len(active))
      for runner in active[shift:] + active[:shift]:
        run = _run_once(runner, scene, root / f'vs_{name}', grids)
        runs[runner].append(dict(run, round=k))
        shown = 'error' if 'error' in run else f'{run["wall_s"]:.2f} s, {run["peak_rss_gb"]:.3f} GB'
        print(f'  {name} round {k + 1}/{args.rounds} {runner}: {shown}', flush=True)
    done = {row['runner']: row for row in _summarise(scene, runs, grids)}
    for runner in runners:  # The rows in the order asked for.
      rows.append(done.get(runner) or dict(base, runner=runner, skipped=skipped[runner]))
  return rows


def _runner_what(runner: str) -> str:
  if runner == 'gdal':
    return 'gdal_pansharpen, weighted Brovey, -threads ALL_CPUS -co NUM_THREADS=ALL_CPUS'
  if runner == 'gdal_1thread':
    return 'gdal_pansharpen, weighted Brovey, -threads 1'
  if runner == 'u2net_tiny':
    return 'fuse.py --workdir, U2Net V2 width 4 (random weights)'
  if runner == 'u2net':
    return 'fuse.py --workdir, U2Net (released WV3 weights)'
  return f'fuse.py --method={runner}'


def format_vs_table(rows: list[dict]) -> str:
  lines = [
    '| scene | runner | MP of PAN/s | wall s | in fusion loop s | CPU s | peak RSS (GB) | '
    "output (MB) | speed / gdal_pansharpen (ALL_CPUS): wall (CPU s) | grid = GDAL's |",
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    head = f'| {r["scene"]} | {_runner_what(r["runner"]) if r["runner"] != "-" else "-"} |'
    if 'skipped' in r or 'error' in r:
      why = r.get('skipped') or r['error'].replace('\n', ' ')[:120]
      lines.append(f'{head} {"skipped" if "skipped" in r else "error"}: {why} ||||||||')
      continue
    inner = f'{r["inner_s"]:.2f}' if r.get('inner_s') is not None else '-'
    ratio = '-'
    if 'ratio_to_gdal' in r:
      ratio = f'{r["ratio_to_gdal"]:.3f} ({r["cpu_ratio_to_gdal"]:.3f})'
    grid = {True: 'yes', False: '**no**'}.get(r.get('same_grid_as_gdal'), '-')
    lines.append(
      f'{head} {r["mp_per_s"]:.3f} | {r["wall_s"]:.2f} | {inner} | {r["cpu_s"]:.2f} | '
      f'{r["peak_rss_gb"]:.3f} | {r["output_mb"]:.1f} | {ratio} | {grid} |'
    )
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Parent side.


def _spawn(case: str, args, root: Path) -> dict:
  """Prepares the inputs, runs the case in a child and reads the child's own peak RSS."""
  folder = root / case
  folder.mkdir()
  try:
    inputs = prepare_inputs(case, folder)
  except (FileNotFoundError, ImportError) as e:
    return {'case': case, 'skipped': str(e)}
  cmd = [
    sys.executable,
    __file__,
    f'--child={case}',
    f'--inputs={json.dumps(inputs)}',
    f'--folder={folder}',
    f'--official_tiles={args.official_tiles}',
  ]
  log = folder / 'child.log'
  with open(log, 'w') as err:
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
  if proc.returncode != 0:
    return {'case': case, 'error': f'exit {proc.returncode}: {log.read_text()[-2000:]}'}
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]), case=case)


def format_table(results: list[dict]) -> str:
  lines = [
    '| case | what | tiles (windows) | time (s) | MP/s of PAN | pure tile inference MP/s | '
    'scene / pure | peak RSS (GB) |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    if 'skipped' in r or 'error' in r:
      lines.append(f'| {r["case"]} | {r.get("skipped") or r.get("error")[:80]} |||||||')
      continue
    time_s = r.get('scene_s', r.get('scene_s_extrapolated'))
    windows = f' ({r["windows"]})' if 'windows' in r else ''
    pure = f'{r["pure_mp_per_s"]:.4f}' if 'pure_mp_per_s' in r else '-'
    ratio = f'{r["scene_vs_pure"]:.3f}' if 'scene_vs_pure' in r else '-'
    lines.append(
      f'| {r["case"]} | {r["what"]} | {r["tiles"]}{windows} | {time_s:.1f} | '
      f'{r["scene_mp_per_s"]:.4f} | {pure} | {ratio} | {r["peak_rss_gb"]:.2f} |'
    )
  return '\n'.join(lines)


def _check_vs_flags(parser, args) -> None:
  for name in args.vs_scenes.split(','):
    try:
      _scene_spec(name.strip())
    except ValueError as e:
      parser.error(f'--vs_scenes: {e}')
  unknown = [r for r in args.vs_runners.split(',') if r.strip() not in VS_RUNNERS]
  if unknown:
    from u2net_jax.methods import METHODS

    unknown = [r for r in unknown if r.strip() not in METHODS]
    if unknown:
      parser.error(
        f'--vs_runners: unknown {unknown}; choose from {VS_RUNNERS} or {sorted(METHODS)}'
      )
  if args.rounds < 1:
    parser.error(f'--rounds must be at least 1, got {args.rounds}')


def _gdal_version() -> str | None:
  if not shutil.which('gdalinfo'):
    return None
  proc = subprocess.run(['gdalinfo', '--version'], stdout=subprocess.PIPE, text=True)
  return proc.stdout.strip() or None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--cases',
    default=','.join(DEFAULT_CASES),
    help=f'comma-separated, from {CASES} (all but vs_gdal)',
  )
  parser.add_argument('--official_tiles', type=int, default=16, help='tiles the official code runs')
  parser.add_argument('--out', default=str(RESULTS), help='JSON output path')
  parser.add_argument(
    '--vs_scenes', default=','.join(VS_SCENES), help='vs_gdal: wv2 and/or synSIDExBANDS scenes'
  )
  parser.add_argument(
    '--vs_runners',
    default=','.join(VS_RUNNERS),
    help=f'vs_gdal: from {VS_RUNNERS} or any fuse.py --method name',
  )
  parser.add_argument('--rounds', type=int, default=3, help='vs_gdal: interleaved rounds')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--inputs', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--folder', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--launch', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--log', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import benchmark  # noqa: E402  (benchmarks/benchmark.py: peak-RSS reader, JSON report)

  if args.launch:  # Stdlib only from here: this process's memory bounds what it adds.
    print(json.dumps(launch(json.loads(args.launch), Path(args.log))), flush=True)
    return 0
  if args.child:
    result = run_case(args.child, json.loads(args.inputs), Path(args.folder), args.official_tiles)
    print(json.dumps(dict(result, peak_rss_gb=benchmark._peak_rss_gb())), flush=True)
    return 0
  cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f'unknown cases {unknown}; choose from {CASES}')
  if 'vs_gdal' in cases:
    _check_vs_flags(parser, args)
  results, vs_rows = [], []
  with tempfile.TemporaryDirectory(prefix='scene_benchmark_') as root:
    for case in cases:
      print(f'running {case} ...', flush=True)
      if case == 'vs_gdal':
        vs_rows = run_vs_gdal(args, Path(root))
        continue
      results.append(_spawn(case, args, Path(root)))
      print(f'  {json.dumps(results[-1])}', flush=True)
  tables = ([format_table(results)] if results else []) + (
    [format_vs_table(vs_rows)] if vs_rows else []
  )
  table = '\n\n'.join(tables)
  print(table)
  extra = {}
  if vs_rows:
    extra = {'rounds': args.rounds, 'gdal': _gdal_version(), 'cpu_count': os.cpu_count()}
  results += vs_rows
  benchmark.write_report(args.out, 'scene_benchmark.py', results, table, **extra)
  return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
  sys.exit(main())
