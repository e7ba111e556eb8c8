"""CAVE hyperspectral super-resolution x4 (HISR), the paper's recipe (Table 4).

31 bands in [0, 1], RGB guide, width 64 (the official width for an RGB guide, derived by
`models.create_model`), Adam lr 3e-4 halved every 50 epochs, batch 8, 500 epochs.
The HDF5 key names are those of the Deng-lab CAVE files (`GT`, `HSI_up`, `LRHSI`, `RGB`), which
`python -m u2net_jax.data.prepare_cave` also writes.

  python train.py --config=configs/cave.py
"""

from configs import default
from u2net_jax import data


def get_config():
  config = default.get_config()
  config.data.sensor = 'CAVE'  # Task 'hisr', 31 bands, RGB guide, data in [0, 1].
  config.data.h5_keys = dict(data.H5_KEYS['hisr'])
  config.data.train_file = 'data/cave/train_cave.h5'
  config.data.valid_file = 'data/cave/valid_cave.h5'
  config.data.test_files = {'cave_test': 'data/cave/test_cave.h5'}
  config.optimizer.learning_rate = 3e-4
  config.optimizer.decay_every_epochs = 50
  config.train.batch_size = 8
  config.train.num_epochs = 500
  return config
