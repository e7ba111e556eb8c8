"""The fusion networks, one module per network, behind one registry (`models.registry`).

`create_model(config.model)` builds the network `config.model.name` names; `apply(model, params,
batch)` runs it on the roles of a batch dict it takes; `init_params`, `abstract_params` and
`count_params` work for every network. Importing this package registers every network:

  u2net: U2Net (Peng et al., ACM MM 2023) and the paper's variants; its S2Block attention kernels
    live in `attention`.
  pnn, pannet, dicnn, drpnn, msdcnn, fusionnet, apnn, bdpn: the DLPan-Toolbox deep pansharpening
    baselines (PNN, PanNet, DiCNN1, DRPNN, MSDCNN, FusionNet, APNN/PNN+, BDPN), each taking the
    roles it declares and returning the fused image; their shared layers live in `dlpan_layers`.
"""

from u2net_jax.models import (
  apnn,  # noqa: F401 (registers the network)
  bdpn,  # noqa: F401 (registers the network)
  dicnn,  # noqa: F401 (registers the network)
  drpnn,  # noqa: F401 (registers the network)
  fusionnet,  # noqa: F401 (registers the network)
  msdcnn,  # noqa: F401 (registers the network)
  pannet,  # noqa: F401 (registers the network)
  pnn,  # noqa: F401 (registers the network)
  u2net,  # noqa: F401 (registers the network)
)
from u2net_jax.models.registry import (  # noqa: F401 (the package's public API)
  BatchApply,
  ModelSpec,
  abstract_inputs,
  abstract_params,
  apply,
  count_params,
  create_model,
  get,
  init_params,
  list_models,
  model_fields,
  model_inputs,
  register,
  spec_of,
)
