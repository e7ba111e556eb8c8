"""Scene fusion (`fuse.py`, `u2net_jax.infer.scene`): throughput and peak memory, window by window.

Cases, each in a fresh subprocess that reports its own peak resident set (VmHWM, read in the
child: no other case or the parent counts; `os.wait4`'s `ru_maxrss` would not do, as Linux carries
the parent's high-water mark into a child started by fork/vfork + exec):

  wv2_scene       the real WorldView-2 scene of ../shared/data/pnn-wv2-ikonos-geoeye1/imgWV2.mat
                  (PAN 1280 x 1280, MS 320 x 320 x 8, uint16) as GeoTIFFs, the released WV3
                  weights: `scene.fuse_files` GeoTIFF -> GeoTIFF (reads, tiling, fusion, writes)
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

Usage (from the repository root)::

  python benchmarks/scene_benchmark.py                 # every case (~5 min on 2 CPU cores)
  python benchmarks/scene_benchmark.py --cases=synthetic_2048,synthetic_8192

Writes `benchmarks/results/scene_benchmark.json` (or `--out`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
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
CASES = ('wv2_scene', 'synthetic_2048', 'synthetic_8192', 'official_wv2')
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
  import jax
  import scipy.io

  from u2net_jax import convert, models
  from u2net_jax.run import checkpointing, config_utils

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
    with config.unlocked():
      config.model.update(TINY_MODEL)
      config.eval.tile_batch = TINY_TILE_BATCH
    model = models.create_model(config.model)
    params = models.init_params(model, jax.random.key(0))
    config_utils.save_config(config, workdir)
    checkpointing.save_params(workdir, params)
  return {'workdir': str(workdir), 'pan': str(folder / 'pan.tif'), 'ms': str(folder / 'ms.tif')}


# ---------------------------------------------------------------------------------------------
# Cases (child side).


def _fuse(inputs: dict, out: Path) -> dict:
  from u2net_jax.infer import scene

  start = time.perf_counter()
  result = scene.fuse_files(
    inputs['workdir'], inputs['pan'], inputs['ms'], out, overwrite=True, progress=False
  )
  result['wall_s'] = time.perf_counter() - start
  return result


def case_wv2_scene(inputs: dict, folder: Path) -> dict:
  import numpy as np

  from u2net_jax.infer import scene, tiling
  from u2net_jax.run import checkpointing, config_utils

  pan = scene.open_raster(inputs['pan'], 'PAN')
  ms = scene.open_raster(inputs['ms'], 'MS')
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

  from u2net_jax.infer import scene

  torch.set_num_threads(2)
  sys.path.insert(0, str(OFFICIAL_CODE))
  from model.u2net import U2Net  # The authors' code, loaded at run time.

  model = U2Net(dim=32).eval()
  model.load_state_dict(torch.load(WEIGHTS, map_location='cpu'))
  pan = scene.open_raster(inputs['pan'], 'PAN')
  ms = scene.open_raster(inputs['ms'], 'MS')
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, from {CASES}')
  parser.add_argument('--official_tiles', type=int, default=16, help='tiles the official code runs')
  parser.add_argument('--out', default=str(RESULTS), help='JSON output path')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--inputs', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--folder', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sys.path.insert(0, str(REPO))
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import benchmark  # noqa: E402  (benchmarks/benchmark.py: peak-RSS reader, JSON report)

  if args.child:
    result = run_case(args.child, json.loads(args.inputs), Path(args.folder), args.official_tiles)
    print(json.dumps(dict(result, peak_rss_gb=benchmark._peak_rss_gb())), flush=True)
    return 0
  cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f'unknown cases {unknown}; choose from {CASES}')
  results = []
  with tempfile.TemporaryDirectory(prefix='scene_benchmark_') as root:
    for case in cases:
      print(f'running {case} ...', flush=True)
      results.append(_spawn(case, args, Path(root)))
      print(f'  {json.dumps(results[-1])}', flush=True)
  table = format_table(results)
  print(table)
  benchmark.write_report(args.out, 'scene_benchmark.py', results, table)
  return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
  sys.exit(main())
