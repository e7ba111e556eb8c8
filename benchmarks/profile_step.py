"""Where the time goes: a jax.profiler trace of the WV3 train step or a tiled-inference batch.

Traces a few calls of the compiled program (after a warm-up call), reads the Perfetto trace that
`jax.profiler` writes, and sums the duration of every executed XLA operation (XLA:CPU records
one event per executed thunk, loop bodies included) by category, from the operation's metadata
in the compiled HLO (the JAX source path, e.g. `transpose(jvp(U2Net))/s2block0/attention/...`):

  attention fwd / bwd     S2Block spatial attention (the blockwise kernel's loops) and the
                          rest of the S2Block attention (projections, spectral softmax)
  conv fwd / bwd          convolutions (3x3 and 1x1, transposed convolutions, pixel shuffle)
  layernorm fwd / bwd     the S2Block LayerNorms
  other fwd / bwd         elementwise chains (LeakyReLU, residual adds, loss), MLPs, copies
  optimizer               Adam, the gradient and parameter norms (outside value_and_grad)
  host overhead           the call's wall time not covered by any operation (dispatch, argument
                          handling, gaps between operations)

On 2 cores XLA:CPU can run two independent operations at once, so operation time is summed per
category and shares are of the summed operation time; the wall time and the operations' covered
span are reported beside them.

Usage (from the repository root)::

  python benchmarks/profile_step.py                       # train step, WV3, batch 16
  python benchmarks/profile_step.py --program=tiles       # 13 tiles of 72x72, released weights
  python benchmarks/profile_step.py --batch=4 --calls=1   # smaller, faster

Writes `benchmarks/results/profile_<program>.json` (and the compiled HLO beside it, `.hlo.txt`)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'
CATEGORIES = (
  'spatial attention fwd',
  'spatial attention bwd',
  'other S2Block attention fwd',
  'other S2Block attention bwd',
  'conv fwd',
  'conv bwd',
  'layernorm fwd',
  'layernorm bwd',
  'other fwd',
  'other bwd',
  'optimizer',
  'unattributed',
)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\(')
_CALLS = re.compile(r'(?:calls|body|condition|to_apply)=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')
_CONTROL = {'while', 'call', 'conditional'}  # Their bodies' operations have their own events.


def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, JAX op_name)} for every instruction of a compiled HLO module.

  An instruction without metadata (e.g. a dot fusion inside a loop body) takes the op_name of
  the computation it calls, else that of the instruction calling its own computation.
  """
  instr, calls, comp_of, comp_names = {}, {}, {}, collections.defaultdict(list)
  current = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and '=' not in line.split('{')[0]:
      current = head.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    op = _OP_NAME.search(line)
    instr[name] = [opcode, op.group(1) if op else '']
    calls[name] = _CALLS.findall(line)
    comp_of[name] = current
    if op:
      comp_names[current].append(op.group(1))
  caller = {c: name for name, cs in calls.items() for c in cs}

  def resolve(name: str, depth: int = 0) -> str:
    if instr[name][1] or depth > 20:
      return instr[name][1]
    for c in calls[name]:
      if comp_names.get(c):
        return comp_names[c][0]
    parent = caller.get(comp_of[name])
    return resolve(parent, depth + 1) if parent in instr else ''

  return {name: (v[0], resolve(name)) for name, v in instr.items()}


def categorise(opcode: str, op_name: str, training: bool = True) -> str:
  """The CATEGORIES entry of one operation from its opcode and JAX op_name.

  Args:
    opcode: the HLO opcode.
    op_name: the JAX op_name metadata.
    training: the program is a train step (outside `jvp(...)` is the optimizer); otherwise
      every operation is forward.
  """
  if not op_name:
    return 'unattributed'  # No metadata anywhere up its call chain (e.g. layout copies).
  if training and 'jvp(' not in op_name:
    return 'optimizer'  # Outside value_and_grad: Adam and the gradient/parameter norms.
  side = 'bwd' if 'transpose(jvp(' in op_name else 'fwd'
  if '/attention/' in op_name or op_name.endswith('/attention'):
    kind = 'spatial attention' if '/while/' in op_name else 'other S2Block attention'
    return f'{kind} {side}'
  if 'conv_general_dilated' in op_name or opcode == 'convolution':
    return f'conv {side}'
  if '_norm/' in op_name or 'LayerNorm' in op_name:
    return f'layernorm {side}'
  return f'other {side}'


def summarise(
  trace_events, names: dict[str, tuple[str, str]], calls: int, training: bool = True
) -> dict:
  """Per-category milliseconds per call from Perfetto 'X' events named like HLO instructions."""
  per_cat, per_op = collections.Counter(), collections.Counter()
  starts, ends = [], []
  for e in trace_events:
    if e.get('ph') != 'X' or e['name'] not in names:
      continue
    opcode, op_name = names[e['name']]
    if opcode in _CONTROL:
      continue
    cat = categorise(opcode, op_name, training)
    per_cat[cat] += e.get('dur', 0.0) / 1e3
    per_op[(cat, e['name'], op_name)] += e.get('dur', 0.0) / 1e3
    starts.append(e['ts'])
    ends.append(e['ts'] + e.get('dur', 0.0))
  total = sum(per_cat.values())
  top = collections.defaultdict(list)  # The 5 costliest operations of each category.
  for (cat, name, op_name), ms in per_op.most_common():
    if len(top[cat]) < 5:
      top[cat].append({'op': name, 'op_name': op_name, 'ms_per_call': ms / calls})
  return {
    'ms_per_call': {k: per_cat[k] / calls for k in CATEGORIES},
    'share': {k: per_cat[k] / total if total else 0.0 for k in CATEGORIES},
    'ops_ms_per_call': total / calls,
    'span_ms_per_call': (max(ends) - min(starts)) / 1e3 / calls if starts else 0.0,
    'top_ops': dict(top),
  }


def _train_program(batch: int):
  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, str(REPO / 'benchmarks'))
  import benchmark  # noqa: E402

  from u2net_jax.run import train_lib

  config = benchmark._config('wv3', quick=False)
  with config.unlocked():
    config.train.batch_size = batch
  rng = np.random.default_rng(0)
  h = 16
  data = {
    'ms': jnp.asarray(rng.uniform(size=(batch, h, h, 8)), jnp.float32),
    'guide': jnp.asarray(rng.uniform(size=(batch, 4 * h, 4 * h, 1)), jnp.float32),
    'gt': jnp.asarray(rng.uniform(size=(batch, 4 * h, 4 * h, 8)), jnp.float32),
  }
  state = train_lib.create_train_state(config, jax.random.key(1), steps_per_epoch=1000)
  compiled = jax.jit(train_lib.train_step, donate_argnums=0).lower(state, data).compile()
  holder = [state]

  def call():
    holder[0], out = compiled(holder[0], data)
    jax.block_until_ready(out)

  return compiled, call, f'train step, WV3, batch {batch}, MS 16x16, width 32'


def _tiles_program(batch: int):
  import jax
  import numpy as np

  sys.path.insert(0, str(REPO / 'benchmarks'))
  import benchmark  # noqa: E402

  from u2net_jax import models
  from u2net_jax.infer import tiling

  config = benchmark._config('wv3', quick=False)
  params = benchmark._wv3_params(config, quick=False)
  model = models.create_model(config.model)
  rng = np.random.default_rng(0)
  ms = jax.numpy.asarray(rng.uniform(size=(batch, 18, 18, 8)), np.float32)
  guide = jax.numpy.asarray(rng.uniform(size=(batch, 72, 72, 1)), np.float32)
  fn = jax.jit(lambda p, a, g: tiling.fused_output(model, p, a, g))
  compiled = fn.lower(params, ms, guide).compile()
  return (
    compiled,
    lambda: jax.block_until_ready(compiled(params, ms, guide)),
    f'tiled inference, {batch} tiles of 72x72 (PAN) / 18x18 (MS), released WV3 weights',
  )


def profile(program: str, batch: int, calls: int) -> dict:
  """Traces `calls` calls of the program and returns the per-category summary."""
  import jax

  compiled, call, what = (_train_program if program == 'train' else _tiles_program)(batch)
  call()  # Warm-up.
  start = time.perf_counter()
  call()
  untraced = time.perf_counter() - start
  with tempfile.TemporaryDirectory(prefix='u2net_profile_') as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(calls):
      call()
    wall = (time.perf_counter() - start) / calls
    jax.profiler.stop_trace()
    trace_file = next(Path(tmp).rglob('perfetto_trace.json.gz'))
    with gzip.open(trace_file, 'rt') as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  hlo_text = compiled.as_text()
  result = summarise(events, hlo_op_names(hlo_text), calls, training=program == 'train')
  result.update(
    hlo_text=hlo_text,
    what=what,
    program=program,
    batch=batch,
    calls=calls,
    wall_ms_per_call=wall * 1e3,
    untraced_wall_ms=untraced * 1e3,
    host_overhead_ms_per_call=max(wall * 1e3 - result['span_ms_per_call'], 0.0),
  )
  return result


def format_table(r: dict) -> str:
  """The markdown table of one profile."""
  lines = [
    f'{r["what"]}: wall {r["wall_ms_per_call"]:.0f} ms per call traced '
    f'({r["untraced_wall_ms"]:.0f} ms untraced), operations {r["ops_ms_per_call"]:.0f} ms '
    f'summed over threads, covering a span of {r["span_ms_per_call"]:.0f} ms',
    '',
    '| category | ms per call | share of operation time |',
    '|---|---|---|',
  ]
  for k in CATEGORIES:
    if r['ms_per_call'][k] > 0:
      lines.append(f'| {k} | {r["ms_per_call"][k]:.0f} | {100 * r["share"][k]:.1f}% |')
  lines.append(
    f'| host overhead (wall - span) | {r["host_overhead_ms_per_call"]:.0f} | '
    f'{100 * r["host_overhead_ms_per_call"] / r["wall_ms_per_call"]:.1f}% of wall |'
  )
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--program', choices=('train', 'tiles'), default='train')
  parser.add_argument('--batch', type=int, default=None, help='default: 16 (train), 13 (tiles)')
  parser.add_argument('--calls', type=int, default=2, help='traced calls')
  parser.add_argument('--out', default=None, help='JSON path')
  args = parser.parse_args(argv)
  sys.path.insert(0, str(REPO))
  from u2net_jax.io import fileio

  batch = args.batch or (16 if args.program == 'train' else 13)
  result = profile(args.program, batch, args.calls)
  result['date'] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  result['command'] = ' '.join(
    ['python', 'benchmarks/profile_step.py'] + list(argv or sys.argv[1:])
  )
  print(format_table(result))
  out = Path(args.out or RESULTS / f'profile_{args.program}.json')
  hlo = result.pop('hlo_text')  # Beside the JSON: the op names of the table, to look up.
  fileio.atomic_write_text(out.with_suffix('.hlo.txt'), hlo)
  print(f'wrote {fileio.atomic_write_text(out, json.dumps(result, indent=2))} and the HLO')
  return 0


if __name__ == '__main__':
  sys.exit(main())
