"""Tests of the paper's variants (ablations V1-V4, U2Net-L): structure, counts, training, eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from u2net_jax import config_utils, convert, eval_lib, models, param_count, train_lib

ABLATIONS = ('v1_single_branch', 'v2_concat', 'v3_spatial_only', 'v4_spectral_only', 'u2net_l')


def _ablation(variant):
  return config_utils.load_config_file(f'{REPO}/configs/ablation.py:{variant}')


def _attention_params(variant, level=0):
  shapes = convert.param_shapes(_ablation(variant).model)
  prefix = f's2block{level}/'
  return {p[len(prefix) :] for p in shapes if p.startswith(prefix)}


def test_parameter_counts():
  expected = {
    'u2net': 536_248,
    'v1_single_branch': 536_216,
    'v2_concat': 427_992,
    'v3_spatial_only': 483_000,
    'v4_spectral_only': 483_000,
    'u2net_l': 85_658,
  }
  for variant, n in expected.items():
    assert sum(param_count.count_by_module(_ablation(variant).model).values()) == n, variant
  assert expected['u2net_l'] < 100_000  # The paper's lightweight class boundary.


def test_variants_differ_where_the_paper_says():
  full = {'attn_norm/scale', 'attention/sa1/kernel', 'attention/se1/kernel', 'mlp/fc1/kernel'}
  assert full <= _attention_params('u2net')
  # V2: no attention at all, a projection of the concatenation 2d -> d.
  assert _attention_params('v2_concat') == {'proj/kernel', 'proj/bias'}
  # V3: spatial projections only; V4: spectral projections only.
  v3, v4 = _attention_params('v3_spatial_only'), _attention_params('v4_spectral_only')
  assert {'attention/sa1/kernel', 'attention/sa2/kernel'} <= v3
  assert not any('/se' in p for p in v3)
  assert {'attention/se1/kernel', 'attention/se2/kernel'} <= v4
  assert not any('/sa' in p for p in v4)
  # V1: one branch, entered by the concatenated inputs; no separate guide branch.
  v1 = convert.param_shapes(_ablation('v1_single_branch').model)
  assert v1['raise_dim/kernel'] == (3, 3, 9, 32)
  assert not any(p.startswith(('raise_ms_dim', 'raise_guide_dim')) for p in v1)
  # U2Net-L: the official structure, narrower.
  light = convert.param_shapes(_ablation('u2net_l').model)
  assert set(light) == set(convert.param_shapes(_ablation('u2net').model))


def test_alternative_readings_are_one_switch_away():
  cfg = dict(_ablation('v3_spatial_only').model, value_projection=True)
  assert 'attention/se1/kernel' in {
    p[len('s2block0/') :] for p in convert.param_shapes(cfg) if p.startswith('s2block0/')
  }
  no_res = dict(_ablation('v1_single_branch').model, single_branch_resblock=False)
  assert not any(p.startswith('resblock') for p in convert.param_shapes(no_res))
  cfg = dict(_ablation('v2_concat').model, concat_residual=True, width=16, spectral_bands=4)
  model = models.U2Net(**cfg)
  params = models.init_params(model, jax.random.key(0), ms_size=2)
  ms, pan = jnp.ones((1, 2, 2, 4)), jnp.ones((1, 8, 8, 1))
  assert model.apply({'params': params}, ms, pan).shape == (1, 8, 8, 4)


def test_unknown_variant_is_an_error():
  model = models.U2Net(spectral_bands=4, width=16, variant='v9')
  with pytest.raises(ValueError, match="variant 'v9'"):
    models.init_params(model, jax.random.key(0), ms_size=2)


@pytest.mark.parametrize('variant', ABLATIONS)
def test_variant_trains_a_few_steps(variant):
  config = config_utils.load_config_file(REPO / 'configs' / 'tiny.py')
  config.unlock()
  config.model.variant = variant
  config.lock()
  state = train_lib.create_train_state(config, jax.random.key(0), steps_per_epoch=4)
  rng = np.random.default_rng(0)
  batch = {
    'ms': rng.uniform(size=(4, 4, 4, 4)).astype(np.float32),
    'guide': rng.uniform(size=(4, 16, 16, 1)).astype(np.float32),
    'gt': rng.uniform(size=(4, 16, 16, 4)).astype(np.float32),
  }
  step = jax.jit(train_lib.train_step)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_a_variant_trains_and_evaluates_end_to_end(tmp_path):
  config = config_utils.load_config_file(REPO / 'configs' / 'tiny.py')
  config.unlock()
  config.model.variant = 'v2_concat'
  config.train.num_epochs = 1
  config.data.demo_test_size = 96  # A 21-px crop on each side must leave one 32-px block.
  config.lock()
  workdir = tmp_path / 'v2'
  train_lib.train_and_evaluate(config, workdir)
  results = eval_lib.evaluate(None, workdir, verbose=False)
  table = (workdir / 'eval' / 'tiny_test' / 'table.txt').read_text()
  assert 'PSNR' in table and results
  assert config_utils.load_config(workdir).model.variant == 'v2_concat'
