"""The paper's variants (Sec. 4.4-4.5, Table 3) with the WV3 pansharpening recipe.

  python train.py --config=configs/ablation.py:v2_concat --workdir=workdirs/ablation_v2
  python -m u2net_jax.param_count --config=configs/ablation.py:u2net_l

Variants (`config.model.variant`, see `models.U2Net`): u2net (the official network),
v1_single_branch, v2_concat, v3_spatial_only, v4_spectral_only, u2net_l. Parameter counts for WV3
(8 bands): u2net 536,248; v1 536,216; v2 427,992; v3 483,000; v4 483,000; u2net_l 85,658.

u2net_l is our reconstruction of the paper's lightweight model (its widths are in the supplement,
which is not public): the official structure at width 12 with head width 6, i.e. the official
model's 2/4/8 heads per level, under the paper's 1e5-parameter class boundary.
"""

from configs import default

LIGHT = {'width': 12, 'head_dim': 6}


def get_config(variant: str = 'u2net'):
  config = default.get_config()
  config.model.variant = variant
  if variant == 'u2net_l':
    config.model.update(LIGHT)
  return config
