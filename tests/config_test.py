"""Tests of `run.config_utils`: every shipped config loads and validates; the sensor is the
single source of the task, band counts and scale; field checks; the `config.json` round trip."""

import json
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from u2net_jax import toolbox
from u2net_jax.run import config_utils

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / 'configs').glob('*.py') if p.name != '__init__.py')
# Config files with arguments: every variant of the ablation file, the HISR tiny config.
CONFIG_ARGS = ['tiny.py:hisr', 'ablation.py:v2_concat', 'ablation.py:u2net_l']


def _load(name, **overrides):
  return config_utils.load_config_file(REPO / 'configs' / name, overrides=overrides or None)


def _flags_config(*args):
  """The config as train.py gets it from absl's config_flags, then finalized."""
  argv = ['prog', *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  return config_utils.finalize(values.config)


@pytest.mark.parametrize('name', CONFIGS + CONFIG_ARGS)
def test_every_shipped_config_loads_and_agrees_with_its_sensor(name):
  config = _load(name)
  sensor = toolbox.get_sensor(config.data.sensor)
  assert config.data.sensor == sensor['name']
  assert config.task == sensor['task']
  assert config.model.spectral_bands == sensor['bands']
  assert config.model.guide_bands == sensor['guide_bands']
  assert config.data.max_value == sensor['max_value']
  assert isinstance(config.data.max_value, float)
  assert config.is_locked
  # Finalizing again changes nothing.
  before = config.to_dict()
  assert config_utils.finalize(config).to_dict() == before


@pytest.mark.parametrize(
  'name,sensor,task,bands,guide,max_value',
  [
    ('wv3.py', 'WV3', 'pansharpening', 8, 1, 2047),
    ('wv2.py', 'WV2', 'pansharpening', 8, 1, 2047),
    ('qb.py', 'QB', 'pansharpening', 4, 1, 2047),
    ('gf2.py', 'GF2', 'pansharpening', 4, 1, 1023),
    ('cave.py', 'CAVE', 'hisr', 31, 3, 1.0),
    ('harvard.py', 'Harvard', 'hisr', 31, 3, 1.0),
    ('demo.py', 'WV3', 'pansharpening', 8, 1, 2047),
    ('tiny.py', 'QB', 'pansharpening', 4, 1, 2047),
    ('tiny.py:hisr', 'CAVE', 'hisr', 31, 3, 1.0),
  ],
)
def test_dataset_configs_give_the_papers_settings(name, sensor, task, bands, guide, max_value):
  c = _load(name)
  assert (c.data.sensor, c.task, c.model.spectral_bands, c.model.guide_bands) == (
    sensor,
    task,
    bands,
    guide,
  )
  assert c.data.max_value == max_value


def test_a_contradiction_fails_at_load_naming_the_fields():
  msg = r"data\.max_value=1023 disagrees with data\.sensor='WV2' \(2047\)"
  with pytest.raises(config_utils.ConfigError, match=msg):
    _load('wv2.py', **{'data.max_value': 1023.0})
  with pytest.raises(config_utils.ConfigError, match=msg):
    _flags_config('--config=' + str(REPO / 'configs' / 'wv2.py'), '--config.data.max_value=1023')
  with pytest.raises(
    config_utils.ConfigError, match=r"model\.spectral_bands=8 disagrees .*'QB' \(4\)"
  ):
    _load('qb.py', **{'model.spectral_bands': 8})
  with pytest.raises(config_utils.ConfigError, match=r"task='hisr' disagrees .*'WV3'"):
    _load('wv3.py', **{'task': 'hisr'})
  with pytest.raises(config_utils.ConfigError, match=r"model\.guide_bands=1 disagrees .*'CAVE'"):
    _load('cave.py', **{'model.guide_bands': 1})


def test_every_problem_is_reported_at_once():
  with pytest.raises(config_utils.ConfigError) as e:
    _load('wv2.py', **{'data.max_value': 1023.0, 'model.spectral_bands': 4, 'eval.mode': 'x'})
  lines = str(e.value).splitlines()
  assert len(lines) == 4 and lines[0] == 'invalid config:'


def test_a_sensor_override_alone_derives_the_sensor_fields():
  c = _load('wv3.py', **{'data.sensor': 'QB'})
  assert (c.model.spectral_bands, c.model.guide_bands, c.data.max_value) == (4, 1, 2047.0)
  c = _flags_config('--config=' + str(REPO / 'configs' / 'wv3.py'), '--config.data.sensor=gf-2')
  assert (c.data.sensor, c.model.spectral_bands, c.data.max_value) == ('GF2', 4, 1023.0)
  c = _flags_config('--config=' + str(REPO / 'configs' / 'demo.py'), '--config.data.sensor=CAVE')
  assert (c.task, c.model.spectral_bands, c.model.guide_bands, c.data.max_value) == (
    'hisr',
    31,
    3,
    1.0,
  )
  # Explicit values that agree with the sensor are fine.
  c = _load('wv3.py', **{'data.sensor': 'QB', 'model.spectral_bands': 4, 'data.max_value': 2047})
  assert c.model.spectral_bands == 4


def test_unknown_sensor_and_unknown_field():
  with pytest.raises(config_utils.ConfigError, match=r"data\.sensor='Landsat' is not one of") as e:
    _load('wv3.py', **{'data.sensor': 'Landsat'})
  assert len(str(e.value).splitlines()) == 2  # The heading and the sensor, nothing derived.
  with pytest.raises(KeyError, match='max_valu'):
    _load('wv3.py', **{'data.max_valu': 1.0})


@pytest.mark.parametrize(
  'field,value,allowed',
  [
    ('data.source', 'hdf', "'hdf5', 'tfds', 'demo'"),
    ('data.check_values', 'some', "'sample', 'full', 'off'"),
    ('eval.mode', 'tile', "'tiled', 'whole'"),
    ('model.dtype', 'float16', "'float32', 'bfloat16'"),
    ('model.attention', 'flash', "'direct', 'blockwise', 'cudnn', 'auto'"),
    ('model.variant', 'v9', "'u2net', 'v1_single_branch', 'u2net_l'"),
    ('train.loss', 'huber', "'l1', 'mse'"),
    ('optimizer.name', 'rmsprop', "'adam', 'sgd'"),
  ],
)
def test_enum_fields_are_checked_with_the_allowed_values(field, value, allowed):
  with pytest.raises(config_utils.ConfigError) as e:
    _load('wv3.py', **{field: value})
  assert f"{field}='{value}' is not one of (" in str(e.value)
  for v in allowed.split(', '):
    assert v in str(e.value)


@pytest.mark.parametrize(
  'field,value,expected',
  [
    ('train.loss_border', -1, 'an integer >= 0'),
    ('train.l2_weight', -1e-5, 'a finite number in [0, inf)'),
    ('optimizer.momentum', 1.0, 'a finite number in [0, '),
    ('optimizer.weight_decay', -0.1, 'a finite number in [0, inf)'),
    ('optimizer.last_layer_lr_factor', -1.0, 'a finite number in [0, inf)'),
  ],
)
def test_recipe_fields_are_checked(field, value, expected):
  # The baselines' recipe fields (`run.losses`) are refused before training, not deep inside it.
  with pytest.raises(config_utils.ConfigError) as e:
    _load('wv3.py', **{field: value})
  assert f'{field}=' in str(e.value) and expected in str(e.value)


def test_config_json_round_trip(tmp_path):
  config = _load('tiny.py:hisr')
  path = config_utils.save_config(config, tmp_path / 'run')
  assert path == tmp_path / 'run' / 'config.json'
  assert sorted(p.name for p in path.parent.iterdir()) == ['config.json']  # No temp files left.
  loaded = config_utils.load_config(tmp_path / 'run')
  assert loaded.is_locked
  assert loaded.to_dict() == config.to_dict()
  # A saved config that contradicts its sensor (edited by hand) fails when it is read back.
  raw = json.loads(path.read_text())
  raw['data']['max_value'] = 2047.0
  path.write_text(json.dumps(raw))
  with pytest.raises(config_utils.ConfigError, match=r"data\.max_value=2047 disagrees .*'CAVE'"):
    config_utils.load_config(tmp_path / 'run')


def test_a_config_json_of_an_unknown_layout_is_one_clear_error(tmp_path):
  # Nothing was released before this layout: a config.json lacking a field is not migrated.
  config = _load('wv3.py').to_dict()
  del config['eval']['mode']
  del config['model']['spectral_bands']
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(config_utils.ConfigError) as e:
    config_utils.load_config(tmp_path)
  assert 'eval.mode is missing' in str(e.value)
  assert 'model.spectral_bands is missing' in str(e.value)


def test_finalize_fills_an_unlocked_config_and_is_idempotent():
  from configs import default

  config = default.get_config()
  assert config.model.spectral_bands is None and config.data.max_value is None
  config.data.sensor = 'harvard'
  out = config_utils.finalize(config)
  assert out is config
  assert (config.data.sensor, config.task, config.model.spectral_bands) == ('Harvard', 'hisr', 31)
  again = ml_collections.ConfigDict(config.to_dict())
  assert config_utils.finalize(again).to_dict() == config.to_dict()


def test_load_config_names_a_folder_that_is_not_a_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a u2net-jax workdir'):
    config_utils.load_config(tmp_path)


@pytest.mark.parametrize('sensor', ['GF2', 'WV2', 'Harvard'])
def test_demo_data_follow_the_sensor(sensor):
  from u2net_jax.data import demo

  info = toolbox.get_sensor(sensor)
  arrays = demo.make_split(sensor, 'train', 2, 16, seed=1)
  assert arrays['gt'].shape == (2, 16, 16, info['bands'])
  assert arrays['guide'].shape == (2, 16, 16, info['guide_bands'])
  assert demo.metadata(sensor)['max_value'] == info['max_value']
  assert demo.metadata(sensor)['task'] == info['task']


def test_demo_task_names_stand_for_their_sensors():
  from u2net_jax.data import demo

  for task, sensor in demo.DEMO_SENSORS.items():
    a, b = demo.make_split(task, 'valid', 1, 16, 2), demo.make_split(sensor, 'valid', 1, 16, 2)
    assert all((a[k] == b[k]).all() for k in a)
    assert toolbox.get_sensor(sensor)['task'] == task
