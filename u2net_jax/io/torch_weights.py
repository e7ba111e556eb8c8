"""PyTorch state dicts -> Flax parameters through a network's table of rules, without torch.

Each registered network (`models.registry.ModelSpec.weights`) declares a `WeightTable`: regular
expressions on the Flax parameter path 'a/b/c' and the template of the authors' state-dict key,
the layout change of each kernel, and the tensors the authors' model builds but never calls.
`torch_to_flax` checks a one-to-one match of names and shapes and says what differs. The same
mapping converts gradients (they have the state dict's keys).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

# Layout changes, as the axes argument of `np.transpose(torch_array, axes)` giving the Flax array
# (None: unchanged). Conv kernels OIHW -> HWIO (depth-wise (C, 1, 3, 3) -> (3, 3, 1, C) by the
# same rule), transposed convolutions IOHW -> HWIO, Linear (out, in) -> (in, out).
CONV = (2, 3, 1, 0)
CONV_TRANSPOSE = (2, 3, 0, 1)
LINEAR = (1, 0)

# Flax leaf name -> PyTorch parameter name (a LayerNorm's `weight` is Flax's `scale`, a PReLU's
# `alpha`).
TORCH_PARAM_NAME = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'alpha': 'weight'}


@dataclasses.dataclass(frozen=True)
class WeightTable:
  """How one network's PyTorch state dict maps onto its Flax parameters.

  Attributes:
    rules: (regex on the Flax path, template of the torch key); the first match wins. The
      template's `{0}`, `{1}`, ... are the regex groups and `{p}` the torch parameter name.
    kernel_axes: Flax path of a kernel -> the layout change (`CONV`, `CONV_TRANSPOSE`, `LINEAR`).
    unused: regexes of state-dict keys the authors' model builds but its forward never uses.
  """

  rules: Sequence[tuple[str, str]]
  kernel_axes: Callable[[str], tuple[int, ...]] = lambda path: CONV
  unused: Sequence[str] = ()

  def torch_key(self, flax_path: str) -> tuple[str, tuple[int, ...] | None]:
    """The state-dict key of a Flax parameter path, and the layout change (None: unchanged).

    Raises:
      KeyError: no rule matches the path.
    """
    for pattern, template in self.rules:
      m = re.fullmatch(pattern, flax_path)
      if m:
        leaf = flax_path.rsplit('/', 1)[1]
        key = template.format(*m.groups(), p=TORCH_PARAM_NAME[leaf])
        return key, (self.kernel_axes(flax_path) if leaf == 'kernel' else None)
    raise KeyError(f'no conversion rule for Flax parameter {flax_path!r}')

  def unused_keys(self, state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """The state-dict tensors that the forward pass never uses."""
    return [k for k in state_dict if any(re.match(p, k) for p in self.unused)]


def torch_to_flax(
  state_dict: Mapping[str, np.ndarray],
  table: WeightTable,
  shapes: Mapping[str, tuple[int, ...]],
  what: str,
) -> dict:
  """Maps a state dict (or a dict of its gradients) onto a Flax parameter tree.

  Args:
    state_dict: torch key -> array, e.g. from `io.pth_reader.load_torch_state_dict`.
    table: the network's `WeightTable`.
    shapes: flat Flax path 'a/b/c' -> shape of the model the weights are for.
    what: the model config, named in errors.

  Returns:
    The nested Flax 'params' tree (float32 numpy arrays).

  Raises:
    ValueError: a tensor is missing, has the wrong shape, or is neither used nor a known unused
      tensor; the message names the tensor, the expected and the found shape.
  """
  flat, used, errors = {}, set(), []
  for path, shape in shapes.items():
    key, axes = table.torch_key(path)
    if key not in state_dict:
      errors.append(f'missing tensor {key!r} (for {path}, Flax shape {shape})')
      continue
    value = np.asarray(state_dict[key])
    value = value if axes is None else np.transpose(value, axes)
    if tuple(value.shape) != shape:
      # The torch layout of the expected shape: the inverse permutation of `axes`.
      expected = shape if axes is None else tuple(shape[i] for i in np.argsort(axes))
      errors.append(
        f'tensor {key!r} has shape {tuple(np.shape(state_dict[key]))}; the model config expects '
        f'{expected} (Flax {path} {shape})'
      )
      continue
    flat[path] = np.asarray(value, np.float32)
    used.add(key)
  unknown = [k for k in state_dict if k not in used and k not in table.unused_keys(state_dict)]
  if unknown:
    errors.append(f'unexpected tensors not used by the model: {unknown}')
  if errors:
    raise ValueError(
      f'the checkpoint does not match the model config {what}:\n  ' + '\n  '.join(errors)
    )
  return traverse_util.unflatten_dict(flat, sep='/')
