"""u2net-jax: U2Net (Peng et al., ACM MM 2023) for image fusion in JAX/Flax.

Modules:
  models: the double U-Net and its S2Block (Flax Linen).
  convert: the authors' PyTorch checkpoints -> Flax parameters, without torch.
  metrics: pansharpening / HISR quality metrics matching the benchmark toolbox.
  data/, input_pipeline: PanCollection and CAVE readers, Wald's protocol, TFDS, grain.
  train_lib, eval_lib: the training loop and the paper's evaluation protocols.
"""

__version__ = '0.1.0'
