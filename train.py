"""Trains U2Net: `python train.py --config=configs/cave.py [--workdir=DIR]`.

A thin entry point (flags, device logging, one call) over `u2net_jax.run.train_lib`. Re-running the
same command resumes from the latest checkpoint in the workdir. Any config field can be
overridden, e.g. `--config.optimizer.learning_rate=5e-4`; an unknown field is an error.

Several processes (hosts): Cloud TPU pod slices and SLURM jobs are detected; otherwise give every
process `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and one shared --workdir.
SIGTERM saves a checkpoint and exits with status 143; the same command resumes.

The console is quiet by default: library log lines (orbax, libtpu) below WARNING are hidden and
`-v 1` shows them (`u2net_jax.run.logging_utils`). The first step says it compiles and how long it
took; the run ends with a summary (best validation vs the lms baseline, checkpoints, next command).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from u2net_jax import errors
from u2net_jax.run import config_utils, distributed, train_lib
from u2net_jax.run import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory (default: workdirs/<config name>[_<arg>]).')
flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume a run whose stored config.json differs in model, data, seed or optimizer fields.',
)
distributed.define_flags()
flags.DEFINE_float(
  'shared_workdir_timeout',
  workdir_lib.SHARED_WAIT_S,
  "Seconds the other processes wait to see process 0's marker in the shared workdir.",
)
flags.mark_flags_as_required(['config'])

# Exit status after a preemption (SIGTERM): that of a process the signal ended.
PREEMPTED_STATUS = 143


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  distributed.start()  # A quiet console (-v 1 for library logs), then the multi-process launch.
  workdir = FLAGS.workdir or workdir_lib.default_workdir(FLAGS['config'].config_filename)
  logging.info(
    'JAX %s on %s: %d devices (%d local) on %d hosts; this is host %d. Workdir: %s',
    jax.__version__, jax.default_backend(), jax.device_count(), jax.local_device_count(),
    jax.process_count(), jax.process_index(), workdir,
  )  # fmt: skip
  try:
    # The command-line overrides are applied by now: derive and validate the config once.
    config_utils.check_config_arg(FLAGS['config'].config_filename)  # `file.py:typo` is an error.
    config = config_utils.finalize(FLAGS.config)
    train_lib.train_and_evaluate(
      config,
      workdir,
      allow_config_change=FLAGS.allow_config_change,
      shared_wait_s=FLAGS.shared_workdir_timeout,
    )
  except errors.Preempted as e:
    logging.warning('%s', e)
    print(f'preempted: {e}', file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_STATUS)
  except errors.user_errors() as e:
    # What a user can fix (data, config, workdir, checkpoints): one line, no traceback.
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=config_utils.parse_flags)  # A mistyped --config.FIELD: one line.
