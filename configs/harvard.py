"""Harvard hyperspectral super-resolution x4: the CAVE recipe on the Harvard scenes."""

from configs import cave


def get_config():
  config = cave.get_config()
  config.data.sensor = 'Harvard'
  config.data.train_file = 'data/harvard/train_harvard.h5'
  config.data.valid_file = 'data/harvard/valid_harvard.h5'
  config.data.test_files = {'harvard_test': 'data/harvard/test_harvard.h5'}
  return config
