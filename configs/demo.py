"""The main job on the embedded SYNTHETIC demo data: finishes in a few minutes on a laptop CPU.

  python train.py --config=configs/demo.py --workdir=workdirs/demo
  python evaluate.py --workdir=workdirs/demo

The data are generated in-process (`u2net_jax.data.demo`; no download): synthetic 8-band
WorldView-3-like scenes with real-looking spatial structure and smooth spectra, a PAN made by a
spectral response, and Wald's protocol (an MTF-like Gaussian blur, decimation by 4, 23-tap
interpolation). The
model is the full U2Net (width 32); patches are smaller than the paper's so a CPU can train it.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'demo'
  config.data.sensor = 'WV3'
  config.data.test_files = {'demo_test': 'demo'}
  config.data.demo_size = 32
  config.data.demo_test_size = 128
  config.data.demo_num_train = 512
  config.data.demo_num_valid = 64
  config.data.demo_num_test = 4
  config.optimizer.learning_rate = 2e-3
  config.optimizer.decay_every_epochs = 2
  config.train.batch_size = 8
  config.train.num_epochs = 4
  config.train.log_every_steps = 16
  config.train.eval_every_epochs = 1
  config.train.checkpoint_every_epochs = 1
  return config
