"""The paper's variants (Sec. 4.4-4.5, Table 3) with the WV3 pansharpening recipe.

  python train.py --config=configs/ablation.py:v2_concat --workdir=workdirs/ablation_v2
  python -m u2net_jax.param_count --config=configs/ablation.py:u2net_l
  python -m u2net_jax.param_count --config=configs/ablation.py --all

This file only sets `config.model.variant`; `--config=configs/wv3.py
--config.model.variant=v2_concat` builds the same model. Each variant's own fields (U2Net-L's
widths, the switches of V1, V2, V3/V4) are in `u2net.VARIANTS`. Variants: u2net (the official
network), v1_single_branch, v2_concat, v3_spatial_only, v4_spectral_only, u2net_l. Parameter
counts for WV3 (8 bands): u2net 536,248; v1 536,216; v2 427,992; v3 483,000; v4 483,000;
u2net_l 85,658.
"""

from configs import default
from u2net_jax.models import u2net

CONFIG_ARGS = tuple(u2net.VARIANTS)  # The `:arg` values, checked by config_utils.


def get_config(variant: str = 'u2net'):
  """The WV3 recipe with `config.model.variant = variant` (one of `u2net.VARIANTS`)."""
  config = default.get_config()
  config.model.variant = variant
  return config
