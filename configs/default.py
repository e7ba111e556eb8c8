"""Default configuration: every field is defined here once.

Per-dataset configs (`wv3.py`, `cave.py`, ...) import this file and override only what differs.
Any field can be overridden on the command line, e.g.::

  python train.py --config=configs/wv3.py --config.optimizer.learning_rate=5e-4

The sensor (`config.data.sensor`) fixes the task, the band counts and the data scale, which
`config_utils.finalize` derives when the config is loaded: `--config.data.sensor=QB` alone gives a
4-band QuickBird model (the data files still have to be QB's); an explicit value that contradicts
the sensor is an error before anything runs.

The defaults are the paper's pansharpening recipe on WorldView-3 (the official code's settings).
"""

import ml_collections

from u2net_jax import data


def get_config() -> ml_collections.ConfigDict:
  """Returns the base configuration (WV3 pansharpening, the paper's recipe)."""
  config = ml_collections.ConfigDict()
  # The sensor (`config.data.sensor`) is the single source of the task, the band counts, the
  # ratio and the data scale: `task`, `model.spectral_bands`, `model.guide_bands`, `model.scale`
  # and `data.max_value` are unset (None) here and derived from it by `config_utils.finalize`; a
  # value set anywhere else must agree with the sensor's (`toolbox.SENSORS`).
  config.task = ml_collections.config_dict.placeholder(str)  # 'pansharpening' | 'hisr'.
  config.seed = 1  # The official code seeds everything with 1.

  # The network `config.model.name` names, built by `models.create_model(config.model)`, and
  # the fields of `models.u2net.U2Net`. A field left unset (None) takes the variant's value
  # (`models.u2net.VARIANTS`: u2net_l sets width 12, head_dim 6), else the official one; any
  # field set here, in a dataset config or on the command line wins.
  unset = ml_collections.config_dict.placeholder  # None, but typed: `--config.model.width=16`.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'u2net'  # The network (`models.list_models()`); the rest are U2Net's fields.
  config.model.spectral_bands = unset(int)  # C, from the sensor: 8 (WV3/WV2), 4, 31 (HISR).
  config.model.guide_bands = unset(int)  # c, from the sensor: 1 (PAN) or 3 (RGB).
  # S: unset = the official 32 with a PAN guide (pansharpening), 64 with an RGB guide (HISR).
  config.model.width = unset(int)
  config.model.head_dim = unset(int)  # S': the S2Block head width; unset = 16.
  config.model.mlp_ratio = 0.5
  config.model.resblock_ratio = 0.5
  config.model.scale = unset(int)  # The resolution ratio, from the sensor: 4.
  # S2Block spatial attention: 'direct' materialises the (HW)x(HW) matrix (the official
  # computation); 'blockwise' never does (exact, memory-efficient flash attention); 'cudnn' is
  # jax.nn.dot_product_attention's fused GPU kernel (needs dtype='bfloat16'); 'auto' picks
  # 'direct' for tiny inputs and 'blockwise' otherwise. See benchmarks/README.md.
  config.model.attention = 'auto'
  config.model.attention_block_size = 128  # Queries per blockwise tile (fastest on CPU).
  # Compute dtype: 'float32' (exact) or 'bfloat16' (TPU/GPU speed; params and outputs stay
  # float32; its effect on the metrics is in benchmarks/README.md).
  config.model.dtype = 'float32'
  # The paper's ablations and lightweight model (`models.u2net.VARIANTS`, configs/ablation.py);
  # 'u2net' is the official network. The three switches give the alternative readings of V1, V2
  # and V3/V4; setting one for a variant it does not apply to is an error.
  config.model.variant = 'u2net'
  config.model.single_branch_resblock = unset(bool)  # V1 only; unset = True.
  config.model.concat_residual = unset(bool)  # V2 only; unset = False.
  config.model.value_projection = unset(bool)  # V3 and V4 only; unset = False.

  config.data = ml_collections.ConfigDict()
  config.data.sensor = 'WV3'  # WV3 | WV2 | QB | GF2 | IKONOS | GeoEye1 | CAVE | Harvard.
  # Sensor maximum, from the sensor: 2047 (11-bit), 1023 (GF-2), 1.0 (HISR).
  config.data.max_value = unset(float)
  config.data.source = 'hdf5'  # 'hdf5' | 'tfds' | 'demo'.
  # Roles used everywhere inside the project -> dataset names inside the HDF5 files.
  config.data.h5_keys = ml_collections.ConfigDict(data.H5_KEYS['pancollection'])
  config.data.train_file = 'data/pancollection/training_wv3/train_wv3.h5'
  config.data.valid_file = 'data/pancollection/training_wv3/valid_wv3.h5'
  # Test sets: name -> HDF5 file (reduced resolution with `gt`, full resolution without).
  config.data.test_files = ml_collections.ConfigDict(
    {
      'wv3_reduced': 'data/pancollection/test_data/WV3/test_wv3_multiExm1.h5',
      'wv3_full': 'data/pancollection/test_data/WV3/test_wv3_OrigScale_multiExm1.h5',
    }
  )
  config.data.tfds_name = ''  # e.g. 'pan_collection/wv3' when source == 'tfds'.
  config.data.tfds_data_dir = ''  # '' -> TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  config.data.augment = False  # Flips and 90-degree rotations; the official code does not augment.
  config.data.worker_count = 0  # grain worker processes (0: in the main process).
  config.data.prefetch = 2  # Batches placed on the devices ahead of the step.
  config.data.read_threads = 4  # grain threads reading examples in each process.
  # Value checks (finite, on the scale of max_value) when an HDF5 file is opened: 'sample' reads
  # a deterministic spread of examples, 'full' every value once (the result cached per file),
  # 'off' none (`data.value_checks.CHECK_VALUES`).
  config.data.check_values = 'sample'
  # SYNTHETIC demo data (source == 'demo'), generated in-process: gt side, examples per split.
  config.data.demo_size = 64
  config.data.demo_test_size = 128
  config.data.demo_num_train = 512
  config.data.demo_num_valid = 64
  config.data.demo_num_test = 4

  # Adam with a staircase decay: lr * decay_factor ** floor(epoch / decay_every_epochs).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.decay_factor = 0.5
  config.optimizer.decay_every_epochs = 100
  config.optimizer.b1 = 0.9  # PyTorch Adam defaults, as the official code uses.
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  # The recipes of other networks (`u2net_jax.run.losses`, configs/baseline.py): 'adam' | 'sgd'
  # (PyTorch's SGD with `momentum`); `weight_decay` is PyTorch's coupled L2 (added to the
  # gradient); the parameters under module `last_layer` train at lr * `last_layer_lr_factor`.
  config.optimizer.name = 'adam'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.last_layer = ''
  config.optimizer.last_layer_lr_factor = 1.0

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # Global batch, split over all devices.
  # The paper trains 360 epochs on WV3; the official code's default is 500.
  config.train.num_epochs = 360
  config.train.log_every_steps = 50
  config.train.eval_every_epochs = 10
  config.train.checkpoint_every_epochs = 50
  config.train.keep_checkpoints = 3
  # The training loss (`u2net_jax.run.losses`): 'l1' (the paper's Eq. 4) | 'mse'; computed on
  # the output and `gt` cropped by `loss_border` pixels per side; plus `l2_weight * sum(kernel^2)
  # / 2`, whose gradient is dropped when `l2_literal` (the DLPan-Toolbox's `.data` term).
  config.train.loss = 'l1'
  config.train.loss_border = 0
  config.train.l2_weight = 0.0
  config.train.l2_literal = False
  config.init_from = ''  # A workdir whose weights start training (fine-tuning).

  config.eval = ml_collections.ConfigDict()
  # 'auto' (the network's own test procedure: U2Net's test.py tiles, the DLPan baselines fuse
  # whole images) | 'tiled' (official test.py procedure) | 'whole'.
  config.eval.mode = 'auto'
  config.eval.tile_size = 64  # PAN tile size of the official test.py.
  config.eval.tile_pad = 4  # Reflect margin of each PAN tile.
  config.eval.tile_batch = 16  # Tiles per jitted call.
  config.eval.crop = 21  # Reduced-resolution border crop of the tables.
  config.eval.block = 32  # Block size of Q2n, Q_avg and the QNR family.
  # evaluate.py: write every fused image (`output_mulExm_{k}.mat`, as the official test.py) and
  # PNG previews; the error maps span 0..error_max of the sensor maximum (mean |fused - gt|).
  config.eval.save_images = True
  config.eval.error_max = 0.1
  return config
