"""u2net-jax: U2Net (Peng et al., ACM MM 2023) for image fusion in JAX/Flax.

One module per concern (the README's "Code map" has a line for each):
  models, attention: the double U-Net and its S2Block (Flax Linen); the attention kernels.
  toolbox, metrics: the sensor table and the benchmark toolbox's resampling; the quality metrics.
  config_utils, convert: configs (sensor-derived fields, checks); the official weights.
  data/, input_pipeline: HDF5/TFDS readers and writers, Wald's protocol, demo data, grain.
  sharding, train_lib, checkpointing: the device mesh, the training loop, orbax checkpoints.
  tiling, eval_lib, reporting: tiled inference, the paper's evaluation protocols, outputs.
  fileio: atomic files and folders.
"""

__version__ = '0.1.0'
