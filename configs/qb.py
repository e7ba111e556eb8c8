"""QuickBird pansharpening (PanCollection): 4 bands, 11-bit."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.sensor = 'QB'
  config.data.train_file = 'data/pancollection/training_qb/train_qb.h5'
  config.data.valid_file = 'data/pancollection/training_qb/valid_qb.h5'
  config.data.test_files = {
    'qb_reduced': 'data/pancollection/test_data/QB/test_qb_multiExm1.h5',
    'qb_full': 'data/pancollection/test_data/QB/test_qb_OrigScale_multiExm1.h5',
  }
  return config
