"""Tests of the model factory and the paper's variants (ablations V1-V4, U2Net-L).

`models.create_model(config.model)`: a variant's fields wherever the variant is set, explicit
fields over them, errors for switches a variant lacks; structure, parameter counts, training and
evaluation of each variant; the command-line and `config.json` paths to the same model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from conftest import REPO, load_config, run_script
from ml_collections import config_flags

from u2net_jax import convert, models, param_count
from u2net_jax.infer import eval_lib
from u2net_jax.models import u2net
from u2net_jax.run import config_utils, train_lib

ABLATIONS = ('v1_single_branch', 'v2_concat', 'v3_spatial_only', 'v4_spectral_only', 'u2net_l')


def _ablation(variant):
  return load_config(f'ablation:{variant}')


def _attention_params(variant, level=0):
  shapes = convert.param_shapes(_ablation(variant).model)
  prefix = f's2block{level}/'
  return {p[len(prefix) :] for p in shapes if p.startswith(prefix)}


def _count(model_config, **overrides):
  return sum(param_count.count_by_module(models.create_model(model_config, **overrides)).values())


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
    assert _count(_ablation(variant).model) == n, variant
    # The same count when the variant is set on any pansharpening config (not only here).
    assert _count(load_config('wv3', **{'model.variant': variant}).model) == n, variant
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
  model = models.create_model(cfg)
  params = models.init_params(model, jax.random.key(0), ms_size=2)
  ms, pan = jnp.ones((1, 2, 2, 4)), jnp.ones((1, 8, 8, 1))
  assert model.apply({'params': params}, ms, pan).shape == (1, 8, 8, 4)


def test_unknown_variant_is_an_error():
  model = u2net.U2Net(spectral_bands=4, width=16, variant='v9')
  with pytest.raises(ValueError, match="variant 'v9'"):
    models.init_params(model, jax.random.key(0), ms_size=2)
  with pytest.raises(ValueError, match=r"variant 'v9'; expected one of \('u2net', "):
    models.create_model({'variant': 'v9'})


def test_u2net_l_widths_come_from_the_variant_alone():
  model = models.create_model(load_config('wv3', **{'model.variant': 'u2net_l'}).model)
  assert (model.width, model.head_dim, model.variant) == (12, 6, 'u2net_l')
  assert models.create_model({'variant': 'u2net_l'}).width == 12  # No config needed.
  official = models.create_model(load_config('wv3').model)
  assert (official.width, official.head_dim) == (32, 16)
  # An RGB guide (HISR) makes the official width 64 (paper Sec. 5.1), not U2Net-L's.
  assert models.create_model({'spectral_bands': 31, 'guide_bands': 3}).width == 64
  assert models.create_model({'guide_bands': 3, 'variant': 'u2net_l'}).width == 12


def test_explicit_fields_override_the_variant():
  cfg = load_config('wv3', **{'model.variant': 'u2net_l', 'model.width': 16})
  model = models.create_model(cfg.model)
  assert (model.width, model.head_dim) == (16, 6)
  assert models.create_model(cfg.model, head_dim=8).head_dim == 8  # Keyword overrides too.
  assert models.create_model({'variant': 'v1_single_branch'}).single_branch_resblock
  v1 = models.create_model({'variant': 'v1_single_branch', 'single_branch_resblock': False})
  assert not v1.single_branch_resblock


@pytest.mark.parametrize(
  'switch,value,variant',
  [
    ('concat_residual', True, 'u2net'),
    ('concat_residual', False, 'v1_single_branch'),
    ('value_projection', True, 'v2_concat'),
    ('value_projection', True, 'u2net_l'),
    ('single_branch_resblock', False, 'v3_spatial_only'),
  ],
)
def test_switch_outside_its_variant_is_an_error(switch, value, variant):
  message = rf"model\.{switch}={value} does not apply to variant '{variant}'"
  with pytest.raises(ValueError, match=message):
    models.create_model({'variant': variant, switch: value})


def test_unknown_field_attention_and_dtype_are_errors():
  with pytest.raises(ValueError, match=r"unknown model field\(s\) \['widht'\]"):
    models.create_model({'widht': 16})
  with pytest.raises(ValueError, match='attention must be one of'):
    models.create_model(attention='flash')
  with pytest.raises(ValueError, match='dtype must be one of'):
    models.create_model(dtype='float16')


def test_command_line_overrides_reach_the_factory():
  """`--config.model.*` flags set the unset (typed None) fields through config_flags."""
  argv = [
    'train.py',
    f'--config={REPO / "configs" / "wv3.py"}',
    '--config.model.variant=u2net_l',
    '--config.model.width=16',
  ]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = config_utils.finalize(flag_values.config)
  model = models.create_model(config.model)
  assert (model.width, model.head_dim, model.variant, model.spectral_bands) == (16, 6, 'u2net_l', 8)


def test_saved_config_rebuilds_the_same_model(tmp_path):
  for overrides in ({'model.variant': 'u2net_l'}, {'model.variant': 'v2_concat', 'model.width': 8}):
    config = load_config('wv3', **overrides)
    config_utils.save_config(config, tmp_path)
    loaded = config_utils.load_config(tmp_path)
    assert models.model_fields(loaded.model) == models.model_fields(config.model)
    assert loaded.model.head_dim is None  # Unset fields stay unset: the variant still decides.
  # And an override of the loaded config still works.
  with loaded.unlocked():
    loaded.model.width = 12
  assert models.create_model(loaded.model).width == 12


@pytest.mark.slow
def test_param_count_cli():
  run = lambda *args: run_script('-m', 'u2net_jax.param_count', *args)

  light = run('--config=configs/wv3.py', '--config.model.variant=u2net_l')
  assert light.returncode == 0, light.stderr
  assert 'u2net_l' in light.stdout and '85,658 parameters (width 12, head_dim 6)' in light.stdout
  every = run('--config=configs/ablation.py', '--all')
  assert every.returncode == 0, every.stderr
  for n in ('536,248', '536,216', '427,992', '483,000', '85,658'):
    assert n in every.stdout
  hisr = run('--config=configs/cave.py')
  assert '2,254,351 parameters (width 64, head_dim 16)' in hisr.stdout, hisr.stderr
  bad = run('--config=configs/wv3.py', '--config.model.concat_residual=True')
  assert bad.returncode != 0 and 'Traceback' not in bad.stderr
  assert "model.concat_residual=True does not apply to variant 'u2net'" in bad.stderr


# One variant in the fast subset (the single branch, the furthest from the official network); the
# others compile a training step each (~5 s) and run with the slow tests.
@pytest.mark.parametrize(
  'variant',
  [v if v == 'v1_single_branch' else pytest.param(v, marks=pytest.mark.slow) for v in ABLATIONS],
)
def test_variant_trains_a_few_steps(variant):
  config = load_config('tiny', **{'model.variant': variant})
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


@pytest.mark.slow
def test_a_variant_trains_and_evaluates_end_to_end(tmp_path):
  config = load_config(
    'tiny',
    **{
      'model.variant': 'v2_concat',
      'train.num_epochs': 1,
      'data.demo_test_size': 96,  # A 21-px crop on each side must leave one 32-px block.
    },
  )
  workdir = tmp_path / 'v2'
  train_lib.train_and_evaluate(config, workdir)
  results = eval_lib.evaluate(None, workdir, verbose=False)
  table = (workdir / 'eval' / 'tiny_test' / 'table.txt').read_text()
  assert 'PSNR' in table and results
  assert config_utils.load_config(workdir).model.variant == 'v2_concat'
