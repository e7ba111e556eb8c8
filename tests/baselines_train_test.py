"""Training the DLPan-Toolbox baselines: recipes, losses, gradients against the toolbox's PyTorch.

The gradient checks run the toolbox's own `train_step` (its loss target: PNN's crop, PanNet's and
FusionNet's `lms +`, BDPN's first output) or APNN's pre-training loss in float64 on one small
batch with the released WV3 weights (BDPN: its own initialisation) and compare every gradient
with `losses.make_loss` through the Flax module in float64 mode.
"""

import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, load_config, shared_path
from flax import traverse_util

from u2net_jax import convert, models
from u2net_jax.run import config_utils, losses, train_lib

NETWORKS = ('pnn', 'pannet', 'dicnn', 'drpnn', 'msdcnn', 'fusionnet', 'apnn', 'bdpn')


def baseline(arg: str, **overrides):
  return config_utils.load_config_file(f'{REPO}/configs/baseline.py:{arg}', overrides)


def test_recipes_and_literal_option():
  """The recipes as config overrides; 'literal' gives what the toolbox's runner runs."""
  c = config_utils.load_config_file(f'{REPO}/configs/baseline.py:dicnn,wv3')
  assert (c.train.loss, c.optimizer.learning_rate, c.train.batch_size) == ('mse', 2e-4, 64)
  assert (c.optimizer.decay_every_epochs, c.optimizer.decay_factor) == (1500, 0.5)
  lit = config_utils.load_config_file(f'{REPO}/configs/baseline.py:dicnn,wv3,literal')
  assert lit.optimizer.decay_factor == 0.1
  pnn = config_utils.load_config_file(f'{REPO}/configs/baseline.py:pnn,wv3')
  assert pnn.optimizer.name == 'sgd' and abs(pnn.optimizer.learning_rate - 0.2312) < 1e-12
  assert pnn.optimizer.last_layer_lr_factor == 0.1 and pnn.train.loss_border == 8
  pannet = config_utils.load_config_file(f'{REPO}/configs/baseline.py:pannet,wv3,literal')
  assert pannet.train.l2_weight == 1e-5 and pannet.train.l2_literal
  with pytest.raises(config_utils.ConfigError, match='not one of'):
    config_utils.load_config_file(f'{REPO}/configs/baseline.py:pannet,wv9')


def test_default_loss_and_optimizer_are_u2nets():
  """U2Net's config: the very `losses.l1_loss` and plain Adam (bit for bit as before)."""
  config = load_config('tiny')
  assert losses.make_loss(config) is losses.l1_loss
  tx = losses.make_optimizer(config, 1e-3)
  params = {'a': jnp.ones(3)}
  grads = {'a': jnp.asarray([0.1, -0.2, 0.3])}
  expect, _ = optax.adam(1e-3).update(grads, optax.adam(1e-3).init(params), params)
  got, _ = tx.update(grads, tx.init(params), params)
  assert np.array_equal(np.asarray(got['a']), np.asarray(expect['a']))


def _toolbox():
  torch = pytest.importorskip('torch', reason='torch CPU is needed to run the toolbox code')
  code = shared_path('dlpan', 'code')
  if str(code) not in sys.path:
    sys.path.insert(0, str(code))
  import dlpan_loader

  return torch, dlpan_loader


def _torch_grads(name: str, batch: dict):
  """(loss, grads by state-dict key, state dict) of the toolbox's training loss in float64."""
  torch, dl = _toolbox()
  from scipy import ndimage

  f = torch.nn.functional
  if name == 'bdpn':
    net = dl.load_dlpan_model('bdpn', None, bands=8, seed=1)
  else:
    net = dl.load_dlpan_model(name, 'WV3')
  net = net.double().train()
  t = {
    k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2), np.float64))
    for k, v in batch.items()
  }
  data = {'gt': t['gt'], 'lms': t['lms'], 'ms': t['ms'], 'pan': t['guide']}
  if name == 'apnn':
    # main_pre_train_trainData_wv3.py: L1(net(cat[lms, pan]), (gt - lms) cropped by 8).
    x = torch.cat([data['lms'], data['pan']], 1)
    loss = f.l1_loss(net(x), (data['gt'] - data['lms'])[:, :, 8:-8, 8:-8])
  else:
    net.criterion = lambda sr, gt, *a, **k: {'loss': f.mse_loss(sr, gt)}
    if name == 'pannet':  # dataset_hp.py: the high-pass inputs (float64 here).

      def hp(a):
        a = a.numpy()
        return torch.from_numpy(a - ndimage.uniform_filter(a, (1, 1, 5, 5), mode='mirror'))

      data['ms_hp'], data['pan_hp'] = hp(data['ms']), hp(data['pan'])
    with dl._cuda_is_cpu():
      loss = net.train_step(data)['loss']
  loss.backward()
  grads = {k: p.grad.numpy() for k, p in net.named_parameters() if p.grad is not None}
  state = {k: v.detach().float().numpy() for k, v in net.state_dict().items()}
  return float(loss.detach()), grads, state


@pytest.mark.slow
@pytest.mark.parametrize('name', NETWORKS)
def test_gradient_equals_the_toolbox(name):
  """One step's loss and every gradient, float64, against the toolbox's training loss."""
  rng = np.random.default_rng(0)
  bands = 8
  batch = {
    'gt': rng.random((2, 24, 24, bands)),
    'lms': rng.random((2, 24, 24, bands)),
    'ms': rng.random((2, 6, 6, bands)),
    'guide': rng.random((2, 24, 24, 1)),
  }
  loss_t, grads_t, state = _torch_grads(name, batch)
  config = baseline(f'{name},wv3,literal')  # The toolbox's own behaviour (no L2 gradient).
  cfg = {'name': name, 'spectral_bands': bands, 'guide_bands': 1}
  if name == 'apnn':
    cfg['width'] = 48
  params = convert.torch_to_flax(state, cfg)
  grads_t = _to_flax64(grads_t, cfg)
  with jax.enable_x64(True):
    model = models.create_model({**cfg, 'dtype': 'float64'})
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    b64 = {k: jnp.asarray(v, jnp.float64) for k, v in batch.items()}
    loss_fn = losses.make_loss(config)
    loss, grads = jax.value_and_grad(loss_fn)(p64, models.BatchApply(model), b64)
    # PanNet's logged loss includes the toolbox's L2 value; its gradient does not.
    penalty = config.train.l2_weight * float(losses.l2_penalty(p64)) if name == 'pannet' else 0.0
    assert abs(float(loss) - penalty - loss_t) <= 1e-12 * max(1.0, abs(loss_t))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    ref = dict(jax.tree_util.tree_leaves_with_path(grads_t))
    scale = max(float(np.abs(np.asarray(v)).max()) for v in ref.values())
    for path, g in flat:
      assert np.abs(np.asarray(g) - np.asarray(ref[path])).max() <= 1e-9 * scale, path


def _to_flax64(grads: dict, cfg: dict) -> dict:
  """Torch gradients (state-dict keys) -> the Flax tree, kept in float64 (the weight table)."""
  table = models.get(cfg['name']).weights
  flat = {}
  for path in convert.param_shapes(cfg):
    key, axes = table.torch_key(path)
    flat[path] = grads[key] if axes is None else np.transpose(grads[key], axes)
  return traverse_util.unflatten_dict(flat, sep='/')


@pytest.mark.slow
@pytest.mark.parametrize('name', NETWORKS)
def test_trains_and_resumes_on_demo_data(name, tmp_path):
  """Two steps with the recipe on the demo data; a lost last checkpoint resumes exactly."""
  over = {
    'data.source': 'demo',
    'data.demo_size': 32,
    'data.demo_test_size': 64,
    'data.demo_num_train': 2,
    'data.demo_num_valid': 2,
    'data.demo_num_test': 1,
    'data.prefetch': 1,
    'data.read_threads': 1,
    'data.test_files': {'demo_test': 'demo'},
    'train.batch_size': 2,
    'train.num_epochs': 2,
    'train.eval_every_epochs': 2,
    'train.checkpoint_every_epochs': 1,
    'train.log_every_steps': 1,
  }
  config = baseline(f'{name},qb', **over)
  workdir = tmp_path / 'run'
  first = train_lib.train_and_evaluate(config, workdir)
  assert first['step'] == 2 and np.isfinite(first['valid']['valid_loss'])
  shutil.rmtree(workdir / 'checkpoints' / '2')  # As if killed before its last save.
  second = train_lib.train_and_evaluate(config, workdir)
  assert second['step'] == 2
  leaves = [jax.tree_util.tree_leaves(r['params']) for r in (first, second)]
  for a, b in zip(*leaves, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
