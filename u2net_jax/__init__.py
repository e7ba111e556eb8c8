"""u2net-jax: U2Net (Peng et al., ACM MM 2023) and the field's comparison methods in JAX/Flax.

The subpackages are the layers: `models` (the networks behind one registry), `methods` (the
classical methods), `metrics`, `data`, `run` (configs, training, checkpoints, processes), `infer`
(tiling, evaluation, scenes, reports) and `io` (files and weights); `toolbox` is the sensor table.
The README's "Code map" has one line per module (checked by `tests/codemap_test.py`).
"""

__version__ = '0.1.0'
