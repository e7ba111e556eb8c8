"""The official PyTorch code and this project timed side by side, interleaved in one process.

This machine's float32 matmul rate drifts 2x within an hour, so a speed ratio is only honest when
both sides run in the same process, alternating, under the same load. Each round times the
official step and the project's step back to back (the order alternates between rounds) and
measures the machine's sgemm rate (float32 2048^3 matmul, jitted) in between; the report gives
every round's ratio (official seconds / project seconds) and their median.

Cases (the official code is loaded at run time from ../shared/official/code, never copied):
  train     one training step, WV3 (8 bands, width 32), batch 16, MS 16x16, PAN 64x64: the
            official `U2Net(dim=32)` with L1 loss and Adam (zero_grad, forward, backward, step)
            against `train_lib.train_step` jitted with the state donated.
  tiled256  one 256x256 PAN / 64x64 MS image (a crop of the real WorldView-2 scene), the official
            `test.py` run as is (its `test()` function: 64-px tiles, one per call, output saved
            as .mat) against `tiling.Fuser` (same tiling, tiles in jitted batches), both with the
            released WV3 weights; their outputs are compared too.
  scene     the same on the whole 1280x1280 WorldView-2 scene (441 tiles; the official side takes
            ~10 minutes per round on 2 cores: use --scene_rounds).

Both sides get the same 2 threads: `torch.set_num_threads(2)`, and XLA:CPU's client uses the
machine's cores (2 here). Needs `torch` and `einops` (not project dependencies:
`pip install torch --index-url https://download.pytorch.org/whl/cpu einops`) and ../shared;
without them it prints the reason and exits 0 (status 'skipped' in the JSON).

Usage (from the repository root)::

  python benchmarks/official_compare.py                          # train, tiled256: 5 rounds
  python benchmarks/official_compare.py --cases=scene --scene_rounds=1
  python benchmarks/official_compare.py --quick                  # 1 round of a tiny step

Writes `benchmarks/results/official_compare.json` (or `--out`): date, command, load average,
per-round seconds, sgemm rates and ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
OFFICIAL_CODE = SHARED / 'official' / 'code'
WEIGHTS = SHARED / 'official' / 'u2net_wv3_200000_iter.pth'
SCENE = SHARED / 'data' / 'pnn-wv2-ikonos-geoeye1' / 'imgWV2.mat'
RESULTS = REPO / 'benchmarks' / 'results' / 'official_compare.json'
CASES = ('train', 'tiled256', 'scene')
MAX_VALUE = 2047.0  # WV2/WV3 sensor maximum.


def unavailable_reason(cases=CASES) -> str | None:
  """Why the side-by-side comparison cannot run here, or None when it can."""
  for module in ('torch', 'einops'):
    if importlib.util.find_spec(module) is None:
      return (
        f'{module} is not installed (not a project dependency; '
        'pip install torch --index-url https://download.pytorch.org/whl/cpu einops)'
      )
  if not (OFFICIAL_CODE / 'model' / 'u2net.py').exists():
    return f'the official code is absent: {OFFICIAL_CODE} (../shared beside the checkout)'
  if {'tiled256', 'scene'} & set(cases) and not WEIGHTS.exists():
    return f'the released WV3 weights are absent: {WEIGHTS}'
  if {'tiled256', 'scene'} & set(cases) and not SCENE.exists():
    return f'the WorldView-2 scene is absent: {SCENE}'
  return None


def _official_model_class():
  """`model.u2net.U2Net` from ../shared/official/code (loaded, not copied)."""
  if str(OFFICIAL_CODE) not in sys.path:
    sys.path.insert(0, str(OFFICIAL_CODE))
  from model.u2net import U2Net

  return U2Net


def _sgemm_gflops(n: int = 2048) -> float:
  """The machine's float32 matmul rate now (jitted XLA dot, best of 3), GFLOP/s."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Training step.


def _train_sides(batch_size: int, h: int = 16):
  """(official_step, project_step, flops_per_step): callables running one step each.

  Args:
    batch_size: images per step.
    h: MS side (PAN and output 4h).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  sys.path.insert(0, str(REPO / 'benchmarks'))
  import benchmark  # noqa: E402  (benchmarks/benchmark.py: config and FLOP helpers)

  from u2net_jax import models
  from u2net_jax.run import train_lib

  rng = np.random.default_rng(0)
  ms = rng.uniform(size=(batch_size, h, h, 8)).astype(np.float32)
  pan = rng.uniform(size=(batch_size, 4 * h, 4 * h, 1)).astype(np.float32)
  gt = rng.uniform(size=(batch_size, 4 * h, 4 * h, 8)).astype(np.float32)

  # Official: the usual PyTorch step on the official model (NCHW).
  torch.manual_seed(0)
  net = _official_model_class()(dim=32)
  net.train()
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  loss_fn = torch.nn.L1Loss()
  t_ms, t_pan, t_gt = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (ms, pan, gt))

  def official_step():
    opt.zero_grad()
    loss = loss_fn(net(t_ms, t_pan), t_gt)
    loss.backward()
    opt.step()
    return loss.item()

  config = benchmark._config('wv3', quick=False)
  with config.unlocked():
    config.train.batch_size = batch_size
  batch = {'ms': jnp.asarray(ms), 'guide': jnp.asarray(pan), 'gt': jnp.asarray(gt)}
  state = train_lib.create_train_state(config, jax.random.key(1), steps_per_epoch=1000)
  compiled = jax.jit(train_lib.train_step, donate_argnums=0).lower(state, batch).compile()
  holder = [state]

  def project_step():
    holder[0], out = compiled(holder[0], batch)
    return float(out['loss'])

  direct = models.create_model(config.model, attention='direct', dtype='float32')

  def loss(p, bt):
    return jnp.mean(jnp.abs(direct.apply({'params': p}, bt['ms'], bt['guide']) - bt['gt']))

  flops = benchmark._direct_flops(jax.value_and_grad(loss), state.params, batch)
  return official_step, project_step, flops


# ----------------------------------------------------------------------------------------------
# Tiled inference: the official test.py as is, and tiling.Fuser.


@contextlib.contextmanager
def _official_test_module(ms, pan):
  """The official `test` module, importable and runnable on CPU without editing it.

  test.py imports `utils.load_test_data.load_h5py_with_hp` (not shipped with the model code) and
  moves tensors with `.cuda()`. A stand-in `utils.load_test_data` returns the given (N, C, h, w)
  MS and (N, 1, H, W) PAN tensors (already divided by the sensor maximum, as the official loader
  does); while the context is open, `Tensor.cuda` is the identity and `torch.load` maps the
  checkpoint's CUDA storages to the CPU.
  """
  import torch

  utils = types.ModuleType('utils')
  loader = types.ModuleType('utils.load_test_data')
  loader.load_h5py_with_hp = lambda path: (ms, None, pan, None)
  utils.load_test_data = loader
  saved = {k: sys.modules.get(k) for k in ('utils', 'utils.load_test_data', 'test')}
  sys.modules.update({'utils': utils, 'utils.load_test_data': loader})
  cuda, load = torch.Tensor.cuda, torch.load
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  torch.load = lambda *args, **kwargs: load(*args, **{**kwargs, 'map_location': 'cpu'})
  try:
    sys.modules.pop('test', None)
    spec = importlib.util.spec_from_file_location('test', OFFICIAL_CODE / 'test.py')
    module = importlib.util.module_from_spec(spec)
    if str(OFFICIAL_CODE) not in sys.path:
      sys.path.insert(0, str(OFFICIAL_CODE))
    spec.loader.exec_module(module)
    yield module
  finally:
    torch.Tensor.cuda, torch.load = cuda, load
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def load_scene(size: int | None = None):
  """The WorldView-2 scene (imgWV2.mat): MS (h, w, 8) and PAN (H, W, 1) in [0, 1], float32.

  Args:
    size: crop the PAN to size x size (and the MS to size/4) from the top-left corner.
  """
  import numpy as np
  import scipy.io

  data = scipy.io.loadmat(SCENE)
  ms = np.asarray(data['I_MS'], np.float32) / MAX_VALUE
  pan = np.asarray(data['I_PAN'], np.float32)[..., None] / MAX_VALUE
  if size is not None:
    ms, pan = ms[: size // 4, : size // 4], pan[:size, :size]
  return ms, pan


def _tiled_sides(ms, pan, tile_batch: int):
  """(official_run, project_run, outputs): callables fusing the image once each."""
  import numpy as np
  import scipy.io
  import torch

  from u2net_jax import convert
  from u2net_jax.infer import tiling

  sys.path.insert(0, str(REPO / 'benchmarks'))
  import benchmark  # noqa: E402

  torch.set_grad_enabled(True)  # test.py uses torch.no_grad itself.
  t_ms = torch.from_numpy(ms.transpose(2, 0, 1)[None].copy())
  t_pan = torch.from_numpy(pan.transpose(2, 0, 1)[None].copy())
  save_dir = tempfile.mkdtemp(prefix='official_test_')
  args = types.SimpleNamespace(
    channels=32, file_path='', save_dir=save_dir, weight=str(WEIGHTS), device='cpu'
  )
  outputs = {}

  def official_run():
    with _official_test_module(t_ms, t_pan) as official_test:
      official_test.test(args)
    outputs['official'] = scipy.io.loadmat(os.path.join(save_dir, 'output_mulExm_0.mat'))['sr']

  config = benchmark._config('wv3', quick=False)
  params = convert.torch_to_flax(convert.load_torch_state_dict(WEIGHTS), config.model)
  fuser = tiling.Fuser(config.model, params, mode='tiled', tile_batch=tile_batch)

  def project_run():
    outputs['project'] = np.asarray(fuser(ms, pan)) * MAX_VALUE

  return official_run, project_run, outputs


# ----------------------------------------------------------------------------------------------
# Rounds.


def interleave(official, project, rounds: int, project_repeats: int = 1, log=print) -> dict:
  """Alternates the two sides `rounds` times (after one untimed warm-up call of each).

  Args:
    official, project: callables running one step (or one image) each.
    rounds: timed rounds; odd rounds run the project first, so drift favours neither side.
    project_repeats: project calls per round (their median is the round's project time).
    log: where progress lines go.

  Returns:
    {'rounds': [{'official_s', 'project_s', 'ratio', 'sgemm_gflops'}...], 'median_ratio',
     'official_s', 'project_s' (medians), 'warmup_official_s', 'warmup_project_s'}.
  """
  warm = {'warmup_project_s': _timed(project), 'warmup_official_s': _timed(official)}
  rows = []
  for r in range(rounds):
    sgemm = _sgemm_gflops()
    proj_times = []
    if r % 2:
      proj_times = [_timed(project) for _ in range(project_repeats)]
    off = _timed(official)
    if not r % 2:
      proj_times = [_timed(project) for _ in range(project_repeats)]
    proj = statistics.median(proj_times)
    rows.append(
      {
        'official_s': off,
        'project_s': proj,
        'ratio': off / proj,
        'sgemm_gflops': sgemm,
        'load_average': os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
      }
    )
    log(
      f'  round {r + 1}/{rounds}: official {off:.2f} s, project {proj:.2f} s, '
      f'ratio {off / proj:.2f}x, sgemm {sgemm:.0f} GFLOP/s'
    )
  return {
    'rounds': rows,
    'median_ratio': statistics.median(r['ratio'] for r in rows),
    'official_s': statistics.median(r['official_s'] for r in rows),
    'project_s': statistics.median(r['project_s'] for r in rows),
    'sgemm_gflops': statistics.median(r['sgemm_gflops'] for r in rows),
    **warm,
  }


def run_case(name: str, rounds: int, quick: bool, tile_batch: int, log=print) -> dict:
  """One case's interleaved rounds, with its description and per-round % of sgemm."""
  import numpy as np

  if name == 'train':
    b, h = (2, 4) if quick else (16, 16)  # Quick: 256 tokens at level 0, seconds a step.
    official, project, flops = _train_sides(b, h)
    result = interleave(official, project, rounds, log=log)
    result['what'] = f'train step, WV3, batch {b}, MS {h}x{h}, width 32'
    result['official_s_per_sample'] = result['official_s'] / b
    result['project_s_per_sample'] = result['project_s'] / b
    result['gflop_per_step'] = flops / 1e9
    for row in result['rounds']:
      row['project_pct_sgemm'] = 100 * flops / row['project_s'] / 1e9 / row['sgemm_gflops']
    result['project_pct_sgemm'] = statistics.median(
      r['project_pct_sgemm'] for r in result['rounds']
    )
    return result
  size = 256 if name == 'tiled256' else None
  ms, pan = load_scene(size)
  official, project, outputs = _tiled_sides(ms, pan, tile_batch)
  result = interleave(official, project, rounds, project_repeats=1 if size is None else 3, log=log)
  from u2net_jax.infer import tiling

  rows, cols = tiling.tile_grid(*pan.shape[:2], tiling.TILE)
  result['what'] = (
    f'{pan.shape[0]}x{pan.shape[1]} WorldView-2 PAN ({rows * cols} tiles), released WV3 '
    f'weights, official test.py vs tiling.Fuser (tile_batch {tile_batch})'
  )
  diff = np.abs(outputs['official'] - outputs['project'])
  result['max_abs_diff_0_2047'] = float(diff.max())
  result['mean_abs_diff_0_2047'] = float(diff.mean())
  return result


def _skip_report(reason: str, args, command: str) -> dict:
  return {'status': 'skipped', 'reason': reason, 'command': command, 'cases': args.cases}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default='train,tiled256', help=f'comma-separated, from {CASES}')
  parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds (train, tiled256)')
  parser.add_argument('--scene_rounds', type=int, default=1, help='rounds of the scene case')
  parser.add_argument('--tile_batch', type=int, default=13, help="the project's tiles per call")
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument(
    '--quick', action='store_true', help='train only, batch 2, MS 4x4, 1 round (seconds)'
  )
  parser.add_argument('--out', default=str(RESULTS), help='JSON output path')
  args = parser.parse_args(argv)
  cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  if args.quick:
    cases, args.rounds = ['train'], 1
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f'unknown cases {unknown}; choose from {CASES}')
  args.cases = cases

  sys.path.insert(0, str(REPO))
  from u2net_jax.io import fileio

  command = ' '.join(['python', 'benchmarks/official_compare.py'] + list(argv or sys.argv[1:]))
  reason = unavailable_reason(cases)
  if reason:
    print(f'skipped: {reason}')
    report = _skip_report(reason, args, command)
  else:
    import jax
    import torch

    torch.set_num_threads(args.threads)
    print(
      f'jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), torch '
      f'{torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs',
      flush=True,
    )
    report = {
      'status': 'ok',
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': command,
      'jax': jax.__version__,
      'torch': torch.__version__,
      'torch_threads': torch.get_num_threads(),
      'cpu_count': os.cpu_count(),
      'results': {},
    }
    for name in cases:
      rounds = args.scene_rounds if name == 'scene' else args.rounds
      print(f'{name}: {rounds} round(s)', flush=True)
      r = run_case(name, rounds, args.quick, args.tile_batch, log=lambda s: print(s, flush=True))
      report['results'][name] = r
      print(
        f'{name}: median ratio {r["median_ratio"]:.2f}x (official {r["official_s"]:.2f} s, '
        f'project {r["project_s"]:.2f} s, sgemm {r["sgemm_gflops"]:.0f} GFLOP/s)'
        + (f', project {r["project_pct_sgemm"]:.0f}% of sgemm' if 'project_pct_sgemm' in r else '')
        + (f', max |diff| {r["max_abs_diff_0_2047"]:.3g}' if 'max_abs_diff_0_2047' in r else ''),
        flush=True,
      )
    report['load_average_at_end'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
  out = fileio.atomic_write_text(args.out, json.dumps(report, indent=2))
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
