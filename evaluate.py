r"""Evaluates a workdir's checkpoint with the paper's protocols: tables, files and pictures.

  python evaluate.py --workdir=workdirs/demo
  python -m u2net_jax.convert --checkpoint u2net_wv3_200000_iter.pth --config configs/wv3.py \
      --workdir workdirs/official_wv3
  python evaluate.py --workdir=workdirs/official_wv3 \
      --test_files=wv2_reduced=test_wv2_multiExm1.h5,wv2_full=test_wv2_OrigScale_multiExm1.h5 \
      --sensor=WV2
  python evaluate.py --workdir=workdirs/official_wv3 --test_files=a.h5,b.h5   # eval/a, eval/b

Results go to `WORKDIR/eval/<test set>/` (see `u2net_jax/infer/reporting.py`). The logic lives in
`u2net_jax.infer.eval_lib.evaluate`, callable from a notebook; the tiled inference in
`u2net_jax.infer.tiling`. Library log lines (orbax, libtpu) are hidden below WARNING; `-v 1` shows
them (`u2net_jax.run.logging_utils`).
"""

import sys

import jax
from absl import app, flags, logging

from u2net_jax import errors
from u2net_jax.infer import eval_lib, tiling
from u2net_jax.run import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir of a training run or of converted official weights.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the best one, else the latest).')
flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'Checkpoint to use when --step is unset.')
flags.DEFINE_list(
  'test_files',
  None,
  'Test sets: HDF5 files as path.h5 (named by the file stem: results in eval/<stem>) or '
  'name=path.h5, or names of the config test sets / TFDS splits. Default: every test set of '
  'the config.',
)
flags.DEFINE_string(
  'sensor', None, 'Evaluate as data of this sensor (HQNR MTF gains), e.g. WV2 through a WV3 model.'
)
flags.DEFINE_enum('mode', None, list(tiling.MODES), 'Inference (default: config.eval.mode).')
flags.DEFINE_integer('tile_batch', None, 'Tiles per jitted call (default: config.eval.tile_batch).')
flags.DEFINE_string('output_dir', None, 'Where the results go (default: WORKDIR/eval).')
flags.DEFINE_bool('save_images', None, 'Write the .mat and PNG files (default: config.eval).')
distributed.define_flags()  # Several processes: see train.py; process 0 evaluates.
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  distributed.start()  # A quiet console (-v 1 for library logs), then the multi-process launch.
  logging.info('JAX devices: %s', jax.devices())
  try:
    eval_lib.evaluate(
      None,
      FLAGS.workdir,
      step=FLAGS.step,
      which=FLAGS.which,
      test_files=FLAGS.test_files,
      sensor=FLAGS.sensor,
      mode=FLAGS.mode,
      tile_batch=FLAGS.tile_batch,
      output_dir=FLAGS.output_dir,
      save_images=FLAGS.save_images,
    )
  except (*errors.user_errors(), FileNotFoundError) as e:
    # What a user can fix (a config.json, data, a checkpoint, the output folder, a --test_files
    # item, a missing file): one line, no traceback.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
