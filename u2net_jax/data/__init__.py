"""Datasets of u2net-jax: readers, Wald's protocol, preparers, TFDS builders and demo data.

Modules:
  pancollection: random-access HDF5 readers (PanCollection and the Deng-lab CAVE/Harvard layout)
    with validation of keys, shapes, band counts and values (sampled, or full and cached), and
    `H5Writer`, the one streaming, atomic HDF5 writer.
  wald: Wald's protocol (MTF-matched or Gaussian blur, decimation, 23-tap interpolation).
  prepare_pansharpening: `python -m u2net_jax.data.prepare_pansharpening` for users' own scenes.
  prepare_cave: `python -m u2net_jax.data.prepare_cave` for the raw CAVE (and Harvard) scenes.
  demo: SYNTHETIC data generated in-process for both tasks (no download).
  tfds_builders: the `pan_collection`, `cave` and `u2net_demo` TFDS builders (ArrayRecord);
    `python -m u2net_jax.data.tfds_builders` builds one.

The command lines take absl flags (`--help` lists them); each module's `main(argv)` runs one from
Python with its own flag values, so they can be called from a notebook or a test.

Every example is a dict with the project's roles: 'gt', 'lms', 'ms' and 'guide' (the PAN or the
RGB image). On disk the arrays are N x C x H x W; the readers return H x W x C float32 arrays
divided by the sensor maximum (`config.data.max_value`).
"""


class DataError(ValueError):
  """A dataset file is missing, malformed or does not match the configuration.

  The message names the file, the key, the expected and the found shape (or value), and for a
  missing file the command that prepares it.
  """
