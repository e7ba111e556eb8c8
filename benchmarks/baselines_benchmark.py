"""Speed of the DLPan-Toolbox baselines here beside their PyTorch originals, in the same run.

  python benchmarks/baselines_benchmark.py [--size 128] [--repeats 5] [--threads 2]

For each network (released WV3 weights; BDPN: the toolbox's initialisation) it times, interleaved
round by round with the toolbox's PyTorch code (`../shared/dlpan/code`, loaded at run time):
whole-image inference on one `size`^2 image and one training step (batch 4 of 64^2 patches, the
recipe's loss and optimizer). It prints medians, parameter counts and XLA's peak buffer estimate
(arguments + outputs + temporaries of the compiled program; PyTorch's is not measured).

DRPNN's and MSDCNN's released weights hold subnormal floats that slow PyTorch on a CPU 30-50x
(XLA:CPU flushes them to zero); both sides are timed with them set to zero, which leaves the
outputs unchanged (../shared/dlpan/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from u2net_jax import convert, models  # noqa: E402
from u2net_jax.run import config_utils, losses  # noqa: E402

CODE = REPO.parent / 'shared' / 'dlpan' / 'code'
NETWORKS = ('pnn', 'pannet', 'dicnn', 'drpnn', 'msdcnn', 'fusionnet', 'apnn', 'bdpn')


def _timed(fn, block) -> float:
  t = time.perf_counter()
  block(fn())
  return time.perf_counter() - t


def _bench(name, args, torch, dl, infer, train) -> tuple:
  """Times one network beside its PyTorch original; returns its table row."""
  tiny = np.finfo(np.float32).tiny
  c = infer['lms'].shape[-1]
  net = (
    dl.load_dlpan_model('bdpn', None, bands=c, seed=1)
    if name == 'bdpn'
    else dl.load_dlpan_model(name, 'WV3')
  )
  with torch.no_grad():
    for p in net.parameters():  # Subnormals -> 0 (DRPNN, MSDCNN): same outputs, fair timing.
      p[p.abs() < tiny] = 0.0
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  config = config_utils.load_config_file(f'{REPO}/configs/baseline.py:{name},wv3')
  cfg = dict(config.model)
  params = convert.torch_to_flax(state, cfg)
  model = models.create_model(cfg)
  apply = models.BatchApply(model)
  fwd = jax.jit(lambda p, b: apply({'params': p}, b))
  b_inf = {k: jnp.asarray(v) for k, v in infer.items() if k in models.get(name).inputs}
  compiled = fwd.lower(params, b_inf).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
  tx = losses.make_optimizer(config, config.optimizer.learning_rate)
  loss_fn = losses.make_loss(config)

  @jax.jit
  def step(p, o, b):
    loss, g = jax.value_and_grad(loss_fn)(p, apply, b)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  opt_state = tx.init(params)
  b_tr = {k: jnp.asarray(v) for k, v in train.items()}
  t_inf = {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) for k, v in infer.items()}
  t_tr = {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy()) for k, v in train.items()}
  fed = {'lms': t_inf['lms'], 'ms': t_inf['ms'], 'pan': t_inf['guide'], 'gt': t_inf['lms']}
  if name == 'pannet':
    fed['ms'], fed['pan'] = t_inf['ms'] - 0.5, t_inf['guide'] - 0.5  # Stand-in high-pass.

  def torch_infer():
    with torch.no_grad():
      if name == 'apnn':
        x = torch.cat([fed['lms'], fed['pan']], 1)
        return net(torch.nn.functional.pad(x, (8,) * 4, mode='replicate'))
      return dl.dlpan_network_output(name, net, fed)

  opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
  if config.optimizer.name == 'adam':
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  mse = torch.nn.functional.mse_loss

  def torch_step():
    opt.zero_grad()
    d = {'lms': t_tr['lms'], 'ms': t_tr['ms'], 'pan': t_tr['guide'], 'gt': t_tr['gt']}
    if name in ('pnn', 'apnn'):
      out = net(torch.cat([d['lms'], d['pan']], 1))
      loss = mse(out, d['gt'][:, :, 8:-8, 8:-8])
    elif name == 'pannet':
      loss = mse(d['lms'] + net(d['ms'], d['pan']), d['gt'])
    elif name == 'bdpn':
      loss = mse(net(d['ms'], d['pan'])[0], d['gt'])
    elif name == 'fusionnet':
      loss = mse(d['lms'] + net(d['lms'], d['pan']), d['gt'])
    else:
      loss = mse(net(d['lms'], d['pan']), d['gt'])
    loss.backward()
    opt.step()
    return loss

  carry = {'p': params, 'o': opt_state}

  def jax_step():
    carry['p'], carry['o'], loss = step(carry['p'], carry['o'], b_tr)
    return loss

  times = {k: [] for k in ('jax_inf', 'torch_inf', 'jax_step', 'torch_step')}
  net.eval()
  for r in range(args.repeats + 1):  # Round 0 warms up (compiles); interleaved rounds.
    ji = _timed(lambda: compiled(params, b_inf), jax.block_until_ready)
    ti = _timed(torch_infer, lambda x: x)
    net.train()
    js = _timed(jax_step, jax.block_until_ready)
    ts = _timed(torch_step, lambda x: x)
    net.eval()
    if r:
      for k, v in zip(times, (ji, ti, js, ts), strict=True):
        times[k].append(v)
  med = {k: statistics.median(v) for k, v in times.items()}
  return (name, models.count_params(params), peak, med)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=2)
  args = parser.parse_args()
  import torch

  sys.path.insert(0, str(CODE))
  import dlpan_loader as dl

  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  s, c = args.size, 8
  infer = {
    'ms': rng.random((1, s // 4, s // 4, c), np.float32),
    'lms': rng.random((1, s, s, c), np.float32),
    'guide': rng.random((1, s, s, 1), np.float32),
  }
  train = {
    'ms': rng.random((4, 16, 16, c), np.float32),
    'lms': rng.random((4, 64, 64, c), np.float32),
    'guide': rng.random((4, 64, 64, 1), np.float32),
    'gt': rng.random((4, 64, 64, c), np.float32),
  }
  rows = [_bench(name, args, torch, dl, infer, train) for name in NETWORKS]
  print(f'{args.size}^2 inference (batch 1), train step (batch 4 x 64^2), {args.threads} threads')
  print(
    'network    params     XLA MiB  jax inf s  torch inf s  ratio  jax step s  torch step s  ratio'
  )
  for name, n, peak, m in rows:
    print(
      f'{name:10s} {n:9,d} {peak:8.1f} {m["jax_inf"]:10.4f} {m["torch_inf"]:12.4f} '
      f'{m["torch_inf"] / m["jax_inf"]:6.2f} {m["jax_step"]:11.4f} {m["torch_step"]:13.4f} '
      f'{m["torch_step"] / m["jax_step"]:6.2f}'
    )


if __name__ == '__main__':
  main()
