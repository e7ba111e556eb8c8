"""JAX versions of the cheap metrics (PSNR, SAM, ERGAS), for validation inside the training loop.

Batched over the leading axis and jit-compatible; they equal the numpy versions of
`u2net_jax.metrics.reference` (to float32 rounding in float32, to ~1e-10 in float64).
"""

from __future__ import annotations

import jax.numpy as jnp


def _check_batch(ref, out) -> None:
  if ref.ndim != 4 or ref.shape != out.shape:
    raise ValueError(
      f'out: expected ref and out of the same (B, H, W, C) shape, got {ref.shape} and {out.shape}'
    )


def psnr_jax(ref, out, data_range: float = 1.0) -> jnp.ndarray:
  """Batched `psnr`: (B, H, W, C) x 2 -> (B,) mean over bands of 10 log10(R^2 / MSE_band).

  Args:
    ref: (B, H, W, C) references.
    out: (B, H, W, C) estimates.
    data_range: R.

  Returns:
    (B,) PSNR per image; jit-compatible.
  """
  ref, out = jnp.asarray(ref), jnp.asarray(out)
  _check_batch(ref, out)
  mse = jnp.mean((ref - out) ** 2, axis=(1, 2))
  return jnp.mean(10.0 * jnp.log10(data_range**2 / mse), axis=-1)


def sam_jax(ref, out) -> jnp.ndarray:
  """Batched `sam` in degrees: (B, H, W, C) x 2 -> (B,).

  Pixels with a zero spectrum in either image are masked out of the mean. The angle is computed as
  2 atan2(|u - v|, |u + v|) of the unit spectra u, v -- the same angle as arccos(u.v), but accurate
  in float32 where arccos near 1 is not.

  Args:
    ref: (B, H, W, C) references.
    out: (B, H, W, C) estimates.

  Returns:
    (B,) SAM per image (NaN for an image with no valid pixel); jit-compatible.
  """
  ref, out = jnp.asarray(ref), jnp.asarray(out)
  _check_batch(ref, out)
  nr = jnp.sqrt(jnp.sum(ref * ref, axis=-1, keepdims=True))
  no = jnp.sqrt(jnp.sum(out * out, axis=-1, keepdims=True))
  valid = (nr * no)[..., 0] > 0
  u = ref / jnp.where(nr > 0, nr, 1)
  v = out / jnp.where(no > 0, no, 1)
  diff = jnp.sqrt(jnp.sum((u - v) ** 2, axis=-1))
  summ = jnp.sqrt(jnp.sum((u + v) ** 2, axis=-1))
  angle = 2.0 * jnp.arctan2(diff, summ)
  total = jnp.sum(jnp.where(valid, angle, 0.0), axis=(1, 2))
  return total / jnp.sum(valid, axis=(1, 2)) * (180.0 / jnp.pi)


def ergas_jax(ref, out, ratio: float = 4) -> jnp.ndarray:
  """Batched `ergas`: (B, H, W, C) x 2 -> (B,).

  Args:
    ref: (B, H, W, C) references.
    out: (B, H, W, C) estimates.
    ratio: resolution ratio.

  Returns:
    (B,) ERGAS per image; jit-compatible.
  """
  ref, out = jnp.asarray(ref), jnp.asarray(out)
  _check_batch(ref, out)
  mse = jnp.mean((ref - out) ** 2, axis=(1, 2))
  mu = jnp.mean(ref, axis=(1, 2))
  return 100.0 / ratio * jnp.sqrt(jnp.mean(mse / mu**2, axis=-1))
