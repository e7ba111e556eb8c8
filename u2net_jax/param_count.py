"""Prints a model's parameter count per module: `python -m u2net_jax.param_count --config=F`.

  python -m u2net_jax.param_count --config=configs/wv3.py                 # 536,248
  python -m u2net_jax.param_count --config=configs/ablation.py:u2net_l    # 85,658
  python -m u2net_jax.param_count --config=configs/ablation.py --all      # every variant

No computation: the shapes come from `jax.eval_shape` of the initialisation.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from u2net_jax import config_utils, convert, models


def count_by_module(model_config) -> dict[str, int]:
  """Top-level module name -> number of parameters, for `models.U2Net(**model_config)`."""
  counts: dict[str, int] = defaultdict(int)
  for path, shape in convert.param_shapes(model_config).items():
    counts[path.split('/')[0]] += int(np.prod(shape))
  return dict(counts)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', required=True, help='config file[:argument]')
  parser.add_argument(
    '--all', action='store_true', help='every variant (config file called with each variant name)'
  )
  parser.add_argument('--detail', action='store_true', help='also print the per-module counts')
  args = parser.parse_args(argv)
  path = args.config.split(':')[0]
  configs = (
    [config_utils.load_config_file(f'{path}:{v}') for v in models.VARIANTS]
    if args.all
    else [config_utils.load_config_file(args.config)]
  )
  for config in configs:
    variant = config.model.variant
    counts = count_by_module(config.model)
    if args.detail:
      for name, n in sorted(counts.items()):
        print(f'  {name:<18} {n:>10,}')
    print(f'{variant:<18} {sum(counts.values()):>10,} parameters')


if __name__ == '__main__':
  main()
