"""WorldView-2 pansharpening (PanCollection): 8 bands, 11-bit."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.sensor = 'WV2'
  config.data.train_file = 'data/pancollection/training_wv2/train_wv2.h5'
  config.data.valid_file = 'data/pancollection/training_wv2/valid_wv2.h5'
  config.data.test_files = {
    'wv2_reduced': 'data/pancollection/test_data/WV2/test_wv2_multiExm1.h5',
    'wv2_full': 'data/pancollection/test_data/WV2/test_wv2_OrigScale_multiExm1.h5',
  }
  return config
