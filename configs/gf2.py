"""GaoFen-2 pansharpening (PanCollection): 4 bands, 10-bit (maximum 1023)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.sensor = 'GF2'
  config.data.train_file = 'data/pancollection/training_gf2/train_gf2.h5'
  config.data.valid_file = 'data/pancollection/training_gf2/valid_gf2.h5'
  config.data.test_files = {
    'gf2_reduced': 'data/pancollection/test_data/GF2/test_gf2_multiExm1.h5',
    'gf2_full': 'data/pancollection/test_data/GF2/test_gf2_OrigScale_multiExm1.h5',
  }
  return config
