"""Does the blockwise attention's hand-written backward pass pay? Timed against plain remat.

Forward + backward (one jitted `jax.grad`) of the S2Block spatial attention at the shapes of a
WV3 training step (batch 16, MS 16x16: level 0 has 4,096 tokens and 2 heads of 16, level 1 1,024
tokens and 4 heads, level 2 256 tokens and 8 heads), in two exact O(N d)-memory forms:

  custom_vjp  `attention.blockwise_attention`: FlashAttention-2 backward written by hand
              (`jax.custom_vjp`, saves the output and the per-query logsumexp);
  remat       the same query-chunked forward (the same (groups x 128 queries x all keys) tiles,
              a plain softmax per tile) with each tile under `jax.checkpoint`, differentiated by
              JAX (the backward recomputes each tile's forward).

Both are timed in turn (interleaved, so that a change of machine load hits both), after one
warm-up call each; the table gives medians and XLA's temporary buffer size of each program.

  python benchmarks/attention_backward.py              # ~1 min on 2 cores
  python benchmarks/attention_backward.py --repeats=9
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp

from u2net_jax.models import attention

# (name, batch, tokens, heads): a WV3 training step's S2Block levels 0, 1 and 2.
SHAPES = (
  ('level 0', 16, 4096, 2),
  ('level 1', 16, 1024, 4),
  ('level 2', 16, 256, 8),
)
HEAD_DIM = 16


def remat_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int = 128) -> jax.Array:
  """Query-chunked exact attention with JAX's own backward through `jax.checkpoint`.

  The tiles are the blockwise form's when all keys fit one key block (N <= 4096): a few
  (batch, head) groups x `block_size` queries x all N keys, the groups chosen so that a tile has
  about 128 x 4096 logits.

  Args:
    q, k, v: (B, N, heads, d), N a multiple of block_size.
    block_size: queries per tile.

  Returns:
    (B, N, heads, d).
  """
  b, n, h, d = q.shape
  g = b * h
  per_tile = max(1, 128 * 4096 // (block_size * n))
  groups = max(c for c in range(1, min(per_tile, g) + 1) if g % c == 0)
  to_groups = lambda t: t.transpose(0, 2, 1, 3).reshape(g // groups, groups, n, d)
  qt = to_groups(q * (1.0 / math.sqrt(d))).reshape(g // groups, groups, n // block_size, -1, d)
  qt = qt.transpose(0, 2, 1, 3, 4)  # (chunks, query blocks, groups, block, d)

  @jax.checkpoint
  def tile(q_blk, k_c, v_c):
    s = jnp.einsum('gqd,gkd->gqk', q_blk, k_c, preferred_element_type=jnp.float32)
    return jnp.einsum('gqk,gkd->gqd', jax.nn.softmax(s, axis=-1), v_c)

  def chunk(_, xs):
    q_c, k_c, v_c = xs
    return None, jax.lax.map(lambda q_blk: tile(q_blk, k_c, v_c), q_c)

  _, out = jax.lax.scan(chunk, None, (qt, to_groups(k), to_groups(v)))
  out = out.transpose(0, 2, 1, 3, 4).reshape(b, h, n, d)
  return out.transpose(0, 2, 1, 3)


def _grad_fn(fn):
  loss = lambda q, k, v, ct: jnp.sum(fn(q, k, v) * ct)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(batch: int, tokens: int, heads: int, repeats: int) -> dict[str, dict[str, float]]:
  """Median forward + backward seconds and temporary MiB of both forms at one shape."""
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (batch, tokens, heads, HEAD_DIM)) for key in keys)
  forms = {'custom_vjp': attention.blockwise_attention, 'remat': remat_attention}
  compiled, times = {}, {name: [] for name in forms}
  for name, fn in forms.items():
    compiled[name] = _grad_fn(fn).lower(q, k, v, ct).compile()
    jax.block_until_ready(compiled[name](q, k, v, ct))  # Warm-up.
  pairs = zip(compiled['custom_vjp'](q, k, v, ct), compiled['remat'](q, k, v, ct), strict=True)
  err = max(float(jnp.abs(a - b).max()) for a, b in pairs)
  assert err < 1e-4, f'the two forms disagree: {err}'
  for _ in range(repeats):
    for name in forms:
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](q, k, v, ct))
      times[name].append(time.perf_counter() - start)
  return {
    name: {
      'seconds': statistics.median(times[name]),
      'temp_mib': compiled[name].memory_analysis().temp_size_in_bytes / 2**20,
    }
    for name in forms
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind}, medians of {args.repeats}')
  print('| shape | custom_vjp (s) | remat (s) | remat / custom_vjp | temp MiB (custom, remat) |')
  print('|---|---|---|---|---|')
  for name, b, n, h in SHAPES:
    r = measure(b, n, h, args.repeats)
    c, m = r['custom_vjp'], r['remat']
    print(
      f'| {name}: {b}x{h}x{n}x{HEAD_DIM} | {c["seconds"]:.3f} | {m["seconds"]:.3f} | '
      f'{m["seconds"] / c["seconds"]:.2f} | {c["temp_mib"]:.0f}, {m["temp_mib"]:.0f} |'
    )


if __name__ == '__main__':
  main()
