"""Trains U2Net: `python train.py --config=configs/cave.py [--workdir=DIR]`.

A thin entry point (flags, device logging, one call) over `u2net_jax.train_lib`. Re-running the
same command resumes from the latest checkpoint in the workdir. Any config field can be
overridden, e.g. `--config.optimizer.learning_rate=5e-4`; an unknown field is an error.
"""

import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from u2net_jax import config_utils, fileio, logging_utils, train_lib
from u2net_jax.data import DataError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (default: workdirs/<config name>).')
flags.mark_flags_as_required(['config'])

# What a user can fix (data, paths, config values): one line on stderr instead of a traceback.
USER_ERRORS = (
  DataError,
  FileNotFoundError,
  PermissionError,
  fileio.OutputError,
  FloatingPointError,
  ValueError,
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Library chatter (orbax, libtpu) stays off the console unless -v 1 / --verbosity=1.
  logging_utils.configure()
  train_lib.initialize_distributed()
  config_path = FLAGS['config'].config_filename
  workdir = FLAGS.workdir or str(Path('workdirs') / Path(config_path.split(':')[0]).stem)
  logging.info(
    'JAX %s on %s: %d devices (%d local) on %d hosts; this is host %d. Workdir: %s',
    jax.__version__, jax.default_backend(), jax.device_count(), jax.local_device_count(),
    jax.process_count(), jax.process_index(), workdir,
  )  # fmt: skip
  try:
    # The command-line overrides are applied by now: derive and validate the config once.
    config = config_utils.finalize(FLAGS.config)
    train_lib.train_and_evaluate(config, workdir)
  except USER_ERRORS as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
