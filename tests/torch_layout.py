"""Test helper: Flax parameters back to the official state-dict, the inverse of the converter.

Only the tests need this direction (to check that every used official tensor comes back exactly,
and to write synthetic state-dicts), so it lives here and not in `u2net_jax.convert`.
"""

from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from u2net_jax import convert


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
  """Flax params -> the official state-dict keys and layouts (the tensors the model uses).

  Args:
    params: a Flax 'params' tree of `models.create_model(...)`.

  Returns:
    Official key -> numpy array in PyTorch's layout.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(params, sep='/').items():
    key, axes = convert.torch_key(path)
    value = np.asarray(value)
    # Flax = transpose(torch, axes), so torch = transpose(Flax, the inverse permutation).
    out[key] = value if axes is None else np.transpose(value, np.argsort(axes))
  return out
