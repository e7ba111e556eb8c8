"""A DLPan-Toolbox deep baseline trained with its authors' recipe on a PanCollection sensor.

  python train.py --config=configs/baseline.py:pannet,wv3
  python train.py --config=configs/baseline.py:dicnn,qb,literal
  python -m u2net_jax.convert --checkpoint=pannet.pth --config=configs/baseline.py:pannet,wv3 \
      --workdir=workdirs/pannet_wv3_released

The argument is `network,sensor[,literal]`: a network of `NETWORKS` (each registers its recipe,
`ModelSpec.recipe`, from the toolbox's `configs/option_*.py` and `models/*/*_main.py`) and a
sensor of `SENSORS` (its data files as in `configs/<sensor>.py`). Durations, batch sizes and
learning rates are the toolbox's; validation and checkpoints every `max(1, epochs // 36)` epochs.

Where a recipe file does something its authors plainly did not mean, the default trains what they
describe, and `literal` what the toolbox's code actually runs:

- StepLR gamma: the builders ask for x0.5 (DiCNN every 1500 epochs, DRPNN every 30, MSDCNN every
  40) or x0.8 (BDPN every 100), but the runner registers only the step size as an mmcv
  `StepLrUpdaterHook`, whose default gamma 0.1 runs (`AutoDL/trainer.py:153-154`). Default: the
  builder's gamma; literal: 0.1.
- PanNet's L2 term (`cfg.reg`, `Basis/python_sub_class.py:189-205`) is built from `.data`, so it
  changes the logged loss and never the gradient. Default: a real 1e-5 * sum(w^2) / 2 penalty;
  literal: the same value without its gradient (`train.l2_literal`).
- PNN's builder makes a `conv3` group at lr / 10 (`pnn_main.py:83-84`, as in the PNN paper and
  APNN's scripts) and then passes `model.parameters()` to SGD instead. Default: conv3 at lr / 10;
  literal: one learning rate.

MSDCNN's lr 1e-6 (`option_msdcnn.py:23`) is kept in both (it is what the file says, not an
evident slip of the code). APNN trains with its pre-training script's recipe (batch 128 on WV3).
"""

from configs import default
from u2net_jax import models
from u2net_jax.models import dlpan_layers

NETWORKS = ('pnn', 'pannet', 'dicnn', 'drpnn', 'msdcnn', 'fusionnet', 'apnn', 'bdpn')
SENSORS = ('wv3', 'wv2', 'qb', 'gf2')
CONFIG_ARGS = tuple(
  f'{n},{s}{lit}' for n in NETWORKS for s in SENSORS for lit in ('', ',literal')
)  # `configs/baseline.py:pannet,wv3`; checked by config_utils.

# The runner's StepLrUpdaterHook default gamma (`literal`).
TOOLBOX_GAMMA = 0.1


def get_config(arg: str = 'pannet,wv3'):
  """The recipe of `network` on `sensor` (`arg` = 'network,sensor[,literal]')."""
  parts = arg.split(',')
  name, sensor, literal = parts[0], parts[1], parts[2:] == ['literal']
  config = default.get_config()
  upper = sensor.upper()
  config.data.sensor = upper
  base = 'data/pancollection'
  config.data.train_file = f'{base}/training_{sensor}/train_{sensor}.h5'
  config.data.valid_file = f'{base}/training_{sensor}/valid_{sensor}.h5'
  config.data.test_files = {
    f'{sensor}_reduced': f'{base}/test_data/{upper}/test_{sensor}_multiExm1.h5',
    f'{sensor}_full': f'{base}/test_data/{upper}/test_{sensor}_OrigScale_multiExm1.h5',
  }
  config.model.name = name
  spec = models.get(name)
  bands = 8 if sensor in ('wv3', 'wv2') else 4
  for field, value in spec.recipe.items():
    if isinstance(value, dlpan_layers.PerBand):
      value = value(bands)
    section, leaf = field.split('.')
    config[section][leaf] = value
  if name == 'apnn' and sensor == 'wv3':
    config.model.width = 48  # The WV3 release (main_pre_train_trainData_wv3.py: batch 128).
    config.train.batch_size = 128
  if literal:
    if config.optimizer.decay_factor != 1.0:
      config.optimizer.decay_factor = TOOLBOX_GAMMA
    if config.train.l2_weight:
      config.train.l2_literal = True
    if name == 'pnn':
      config.optimizer.last_layer_lr_factor = 1.0
  epochs = config.train.num_epochs
  config.train.eval_every_epochs = max(1, epochs // 36)
  config.train.checkpoint_every_epochs = max(1, epochs // 36)
  return config
