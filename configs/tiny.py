"""A tiny configuration for tests: SYNTHETIC demo data, a narrow U2Net, seconds per run.

python train.py --config=configs/tiny.py --workdir=/tmp/tiny
python train.py --config=configs/tiny.py:hisr --workdir=/tmp/tiny_hisr
"""

from configs import default

CONFIG_ARGS = ('pansharpening', 'hisr')  # `configs/tiny.py:hisr`; checked by config_utils.


def get_config(task: str = 'pansharpening'):
  config = default.get_config()
  config.data.source = 'demo'
  # The sensor sets the task, the bands and the scale (`config_utils.finalize`).
  config.data.sensor = 'CAVE' if task == 'hisr' else 'QB'
  config.model.width = 16
  config.model.head_dim = 8
  config.data.test_files = {'tiny_test': 'demo'}
  config.data.demo_size = 16
  # 96 px: the reduced-resolution tables crop 21 px per side and need one 32-px block inside.
  config.data.demo_test_size = 96
  config.data.demo_num_train = 16
  config.data.demo_num_valid = 4
  config.data.demo_num_test = 2
  config.data.prefetch = 1
  config.data.read_threads = 1
  config.optimizer.decay_every_epochs = 2
  config.train.batch_size = 4
  config.train.num_epochs = 4
  config.train.log_every_steps = 1
  config.train.eval_every_epochs = 2
  config.train.checkpoint_every_epochs = 1
  config.train.keep_checkpoints = 2
  config.eval.tile_batch = 4
  return config
