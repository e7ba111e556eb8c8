"""Fusion quality metrics that reproduce the benchmark's MATLAB toolbox and the HISR evaluation.

Every published pansharpening number (the U2Net paper's Tables 1-3, PanCollection, DLPan-Toolbox)
comes from the benchmark's MATLAB toolbox; the HISR numbers (Table 4) from the Deng-lab Python
evaluation. This package computes the same numbers in float64 numpy, vectorised, following the
conventions written down in `../shared/metrics/README.md` (checked there against the toolbox's own
code to ~1e-14). The points where widely copied Python ports go wrong, and this package does not:

- standard deviations and covariances use N - 1 (MATLAB `std2`, `cov`), and Q2n's hypercomplex
  covariance the N/(N - 1) factor of `onions_quality.m`;
- Q2n casts to uint16 like MATLAB: round half away from zero, saturate to [0, 65535] -- so its
  inputs must be on the sensor scale (0..2047), never [0, 1] (rejected with a ValueError);
- Q2n mirror-pads to whole blocks repeating the edge sample (numpy 'symmetric');
- the resampling they rely on (`interp23tap`, MATLAB's `imresize`, the MTF filters) and the sensor
  table are the toolbox's, in `u2net_jax.toolbox`.

Modules (everything public is re-exported here: callers write `metrics.q2n`, `metrics.psnr_jax`):
  reference: per-image metrics with a reference (PSNR, SAM, ERGAS, Q_avg, Q2n, SCC, SSIM).
  no_reference: the full-resolution QNR family (D_lambda, D_s, QNR, D_lambda^K, HQNR).
  protocols: the tables' protocols `reduced_resolution_metrics`, `full_resolution_metrics`,
    `hisr_metrics`, and `aggregate` / `format_table`, which print "mean±std" like the tables.
  in_loop: `psnr_jax`, `sam_jax`, `ergas_jax`, batched and jit-compatible, for validation inside
    the training loop.

All images are H x W x C (an H x W array is taken as one band); the argument order is (reference,
estimate), and for the no-reference metrics (fused, lms, pan). Bad input (mismatched shapes,
NaN/Inf, sizes the block metrics cannot take, [0, 1] data given to a sensor-scale metric) raises a
ValueError that names the argument and the problem.
"""

from u2net_jax.metrics.in_loop import ergas_jax, psnr_jax, sam_jax
from u2net_jax.metrics.no_reference import d_lambda, d_lambda_k, d_s, hqnr, qnr
from u2net_jax.metrics.protocols import (
  aggregate,
  format_table,
  full_resolution_metrics,
  hisr_metrics,
  reduced_resolution_metrics,
)
from u2net_jax.metrics.reference import ergas, psnr, q2n, q_index, sam, scc, ssim

__all__ = [
  'aggregate',
  'd_lambda',
  'd_lambda_k',
  'd_s',
  'ergas',
  'ergas_jax',
  'format_table',
  'full_resolution_metrics',
  'hisr_metrics',
  'hqnr',
  'psnr',
  'psnr_jax',
  'q2n',
  'q_index',
  'qnr',
  'reduced_resolution_metrics',
  'sam',
  'sam_jax',
  'scc',
  'ssim',
]
