"""Prints a model's parameter count: `python -m u2net_jax.param_count --config=F`.

  python -m u2net_jax.param_count --config=configs/wv3.py                      # 536,248
  python -m u2net_jax.param_count --config=configs/wv3.py --config.model.variant=u2net_l  # 85,658
  python -m u2net_jax.param_count --config=configs/ablation.py:u2net_l         # 85,658
  python -m u2net_jax.param_count --config=configs/wv3.py --all --detail       # every variant

Any `--config.model.*` field can be overridden. No computation: the shapes come from
`models.abstract_params` (a `jax.eval_shape` of the initialisation).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from u2net_jax import models
from u2net_jax.models import u2net
from u2net_jax.run import config_utils


def count_by_module(model) -> dict[str, int]:
  """Parameters per top-level module of `model`.

  Args:
    model: e.g. `models.create_model(config.model)`.

  Returns:
    Module name (e.g. 's2block0') -> number of parameters.
  """
  params = models.abstract_params(model)
  return {name: models.count_params(tree) for name, tree in params.items()}


def report(model_config, variants=None, detail: bool = False) -> str:
  """One line per variant: its name, parameter count and widths (and, with detail, per module).

  Args:
    model_config: `config.model`.
    variants: variant names replacing model_config's (None: its own variant only).
    detail: also list the per-module counts.

  Returns:
    The text to print.
  """
  lines = []
  for variant in variants or [model_config['variant']]:
    model = models.create_model(model_config, variant=variant)
    counts = count_by_module(model)
    if detail:
      lines += [f'  {name:<18} {n:>10,}' for name, n in sorted(counts.items())]
    lines.append(
      f'{variant:<18} {sum(counts.values()):>10,} parameters '
      f'(width {model.width}, head_dim {model.head_dim})'
    )
  return '\n'.join(lines)


def _define_flags() -> None:
  """The CLI's flags (defined only when run as a program, so that importing defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Config file[:argument], e.g. configs/wv3.py.')
  flags.DEFINE_bool('all', False, 'Every variant of u2net.VARIANTS with this config.')
  flags.DEFINE_bool('detail', False, 'Also print the per-module counts.')
  flags.mark_flags_as_required(['config'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  try:
    config = config_utils.finalize(args.config)  # Derives the band counts from the sensor.
    print(report(config.model, list(u2net.VARIANTS) if args.all else None, args.detail))
  except ValueError as e:  # A config error (e.g. a switch the variant lacks): one line.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
