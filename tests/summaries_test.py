"""Tests of what a run tells its user: `u2net_jax.run.summaries` (compile line, TensorBoard images,
closing summary) and `u2net_jax.run.logging_utils` (quiet by default, `-v 1` for everything).

The TensorBoard events are read back with TensorBoard's own reader (`EventAccumulator`).
"""

import logging as logging_std

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from u2net_jax import metrics
from u2net_jax.data import input_pipeline
from u2net_jax.run import logging_utils, summaries, train_lib


def _record(name: str, level: int, msg: str, path: str = '/x/u2net_jax/run/train_lib.py'):
  return logging_std.LogRecord(name, level, path, 1, msg, None, None)


def test_quiet_filter_drops_library_chatter_only():
  quiet = logging_utils.QuietFilter()
  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not quiet.filter(_record('absl', logging_std.INFO, 'Found 2 checkpoint steps', orbax))
  assert not quiet.filter(
    _record('absl', logging_std.WARNING, 'Given directory is read only=/w/checkpoints', orbax)
  )
  assert not quiet.filter(_record('jax._src.xla_bridge', logging_std.INFO, 'no TPU backend'))
  # An unexpected orbax warning, any error, and the project's own lines pass.
  assert quiet.filter(_record('absl', logging_std.WARNING, 'checkpoint 7 is damaged', orbax))
  assert quiet.filter(_record('absl', logging_std.ERROR, 'Given directory is read only', orbax))
  assert quiet.filter(_record('absl', logging_std.INFO, '[1/16] epoch 0.2 loss 0.1'))


def test_configure_installs_and_removes_the_filter():
  absl_logger = logging_std.getLogger('absl')
  try:
    assert logging_utils.configure(0) == 0
    assert any(isinstance(f, logging_utils.QuietFilter) for f in absl_logger.filters)
    logging_utils.configure(0)  # Idempotent.
    assert sum(isinstance(f, logging_utils.QuietFilter) for f in absl_logger.filters) == 1
    assert logging_utils.configure(1) == 1
    assert not any(isinstance(f, logging_utils.QuietFilter) for f in absl_logger.filters)
  finally:
    logging_utils.configure(1)


def test_fixed_indices_spread_over_the_set():
  assert summaries.fixed_indices(64) == [0, 31, 63]
  assert summaries.fixed_indices(2) == [0, 1]
  assert summaries.fixed_indices(1) == [0]


def test_lms_baseline_matches_the_in_loop_metrics():
  config = load_config('tiny')
  source = input_pipeline.get_source(config, 'valid')
  baseline = summaries.lms_baseline(config, source)
  gt = jnp.asarray(np.stack([source[i]['gt'] for i in range(len(source))]))
  lms = jnp.clip(jnp.asarray(np.stack([source[i]['lms'] for i in range(len(source))])), 0, 1)
  assert baseline['valid_psnr'] == pytest.approx(float(metrics.psnr_jax(gt, lms).mean()), rel=1e-5)
  assert baseline['valid_sam'] == pytest.approx(float(metrics.sam_jax(gt, lms).mean()), rel=1e-4)
  assert baseline['valid_ergas'] == pytest.approx(float(metrics.ergas_jax(gt, lms).mean()), 1e-5)


@pytest.mark.slow
def test_training_logs_compile_time_images_and_a_closing_summary(tmp_path, caplog):
  accumulator = pytest.importorskip(
    'tensorboard.backend.event_processing.event_accumulator',
    reason='tensorboard (a test dependency in requirements.txt) reads the event files',
  )
  config = load_config('tiny', **{'train.num_epochs': 2, 'train.eval_every_epochs': 1})
  workdir = tmp_path / 'run'
  caplog.set_level(logging_std.INFO)
  train_lib.train_and_evaluate(config, workdir)
  text = caplog.text
  assert 'compiling the train step (first step)...' in text
  assert 'compiled the train step in' in text and 'XLA' in text
  # The closing summary: best validation, the lms baseline, the checkpoints, the next command.
  assert 'Training finished at step 8' in text
  assert 'best validation (step' in text and 'lms baseline (upsampled MS)' in text
  assert str(workdir / 'checkpoints') in text
  assert f'next: python evaluate.py --workdir={workdir}' in text
  # TensorBoard: the scalars and, at each validation (steps 4 and 8), the fixed examples' panels.
  events = accumulator.EventAccumulator(
    str(workdir / 'tensorboard'), size_guidance={accumulator.IMAGES: 0}
  )
  events.Reload()
  tags = events.Tags()
  assert 'valid_psnr' in tags['scalars']
  assert sorted(tags['images']) == [f'validation/example_{i}' for i in (0, 1, 3)]
  images = events.Images('validation/example_0')
  assert [image.step for image in images] == [4, 8]
  assert images[0].height > 128 and images[0].width > 4 * 128  # Titled, enlarged panels.
  png = images[-1].encoded_image_string
  assert png.startswith(b'\x89PNG')
