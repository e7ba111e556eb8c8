"""The DLPan-Toolbox deep baselines against the toolbox's own PyTorch code and released weights.

Reference outputs (`../shared/dlpan/io/`) were made by the toolbox's code with its released
weights, whole images, float32; the live checks run that code (`../shared/dlpan/code`, loaded at
run time, never copied) in float64 through `torch`. Every released model is checked: WV3 and WV2
weights on the WV2 samples, QB and WV4 weights on the IKONOS 4-band case. Bounds: 2e-5 (float32,
on the [0, 1] scale; the toolbox's own float32 output sits up to 7.3e-6 from its float64 one) and
1e-9 (float64 mode against the PyTorch code in float64).
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path

from u2net_jax import convert, models
from u2net_jax.io import pth_reader
from u2net_jax.models import apnn as apnn_lib
from u2net_jax.models import dlpan_layers

NETS = ('pnn', 'pannet', 'dicnn', 'drpnn', 'msdcnn', 'fusionnet', 'apnn')
SENSORS = ('WV3', 'WV2', 'QB', 'WV4')
FILES = {
  'pnn': 'pnn.pth',
  'pannet': 'pannet.pth',
  'dicnn': 'dicnn1.pth',
  'drpnn': 'drpnn.pth',
  'msdcnn': 'msdcnn.pth',
  'fusionnet': 'fusionnet.pth',
  'apnn': '{s}_PNNplus_model.pth.tar',
}
TOL32, TOL64 = 2e-5, 1e-9


def weight_path(name: str, sensor: str):
  f = 'panet.pth' if (name, sensor) == ('pannet', 'QB') else FILES[name].format(s=sensor)
  return shared_path('dlpan', 'weights', sensor, f)


def nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


@functools.cache
def released(name: str, sensor: str):
  """(model config, Flax params) of a release, read by the project's reader and weight table."""
  sd = pth_reader.load_torch_state_dict(weight_path(name, sensor))
  key = 'conv5.weight' if name == 'msdcnn' else 'conv3.weight'
  cfg = {'name': name, 'spectral_bands': int(sd[key].shape[0]), 'guide_bands': 1}
  if name == 'apnn':
    cfg['width'] = int(sd['conv1.weight'].shape[0])  # 48 (WV3) or 64.
  return cfg, convert.torch_to_flax(sd, cfg)


@functools.cache
def _forward(cfg_items: tuple):
  model = models.create_model(dict(cfg_items))
  return jax.jit(lambda params, batch: models.apply(model, params, batch))


def run(cfg: dict, params, batch: dict, dtype: str = 'float32') -> np.ndarray:
  """The Flax network's whole-image output on `batch` (NHWC), in `dtype`."""
  cfg = {**cfg, 'dtype': dtype}
  if dtype == 'float64':
    with jax.enable_x64(True):
      b = {k: jnp.asarray(v, jnp.float64) for k, v in batch.items()}
      return np.asarray(_forward(tuple(sorted(cfg.items())))(params, b))
  b = {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
  return np.asarray(_forward(tuple(sorted(cfg.items())))(params, b))


def wv2_batch(which: str = 'rr'):
  inp = np.load(shared_path('dlpan', 'io', 'inputs_wv2_samples.npz'))
  return {
    'ms': nhwc(inp[f'{which}_ms']),
    'lms': nhwc(inp[f'{which}_lms']),
    'guide': nhwc(inp[f'{which}_pan']),
  }


def ikonos_batch():
  io = np.load(shared_path('dlpan', 'io', 'ikonos_rr_4band.npz'))
  raw = {k: np.asarray(io[f'raw_{k}'], np.float64) / 2047.0 for k in ('ms', 'lms', 'pan')}
  return {
    'ms': nhwc(raw['ms']).astype(np.float32),
    'lms': nhwc(raw['lms']).astype(np.float32),
    'guide': nhwc(raw['pan']).astype(np.float32),
  }


def expected_image(name: str, out: np.ndarray, lms: np.ndarray) -> np.ndarray:
  """The toolbox's image from its raw stored network output (README of ../shared/dlpan/io)."""
  return out + lms if name in ('pannet', 'fusionnet', 'apnn') else out


# ----------------------------------------------------------------------------------------------
# Against the stored reference outputs (no torch needed).


@pytest.mark.parametrize('name', NETS)
def test_wv3_release_equals_the_toolbox_output(name):
  """WV3 weights on the two reduced-resolution WV2 samples (128 x 128), whole images, float32."""
  ref = np.load(shared_path('dlpan', 'io', f'{name}_wv3.npz'))
  batch = wv2_batch('rr')
  out = run(*released(name, 'WV3'), batch)
  expect = expected_image(name, nhwc(ref['rr_out']), batch['lms'])
  assert out.shape == expect.shape
  assert np.abs(out - expect).max() <= TOL32


@pytest.mark.parametrize(('name', 'sensor'), [('pannet', 'QB'), ('apnn', 'QB'), ('apnn', 'WV4')])
def test_four_band_releases_equal_the_toolbox_output(name, sensor):
  """QB/WV4 weights on the IKONOS 4-band case; APNN's WV4 network is the only live APNN."""
  io = np.load(shared_path('dlpan', 'io', 'ikonos_rr_4band.npz'))
  batch = ikonos_batch()
  if name == 'apnn':
    # APNN's own loader divides in float32 (main_test_wv3.py:70-83); its fed input is stored.
    x = nhwc(io['apnn_x'])
    batch = {'lms': x[:, 8:-8, 8:-8, :-1], 'guide': x[:, 8:-8, 8:-8, -1:]}
    expect = nhwc(io[f'apnn_{sensor.lower()}_out']) + batch['lms']
  else:
    expect = nhwc(io['pannet_qb_out']) + nhwc(io['pannet_qb_lms'])
    batch['lms'] = nhwc(io['pannet_qb_lms'])
  out = run(*released(name, sensor), batch)
  assert np.abs(out - expect).max() <= TOL32
  if (name, sensor) == ('apnn', 'WV4'):
    assert out.std(axis=(0, 1, 2)).min() > 0.01  # Alive, unlike the WV3/WV2/QB releases.


def test_pannet_high_pass_equals_get_edge():
  """`dlpan_layers.high_pass` in float64 = the toolbox's get_edge (its float32-stored result)."""
  ref = np.load(shared_path('dlpan', 'io', 'pannet_wv3.npz'))
  inp = np.load(shared_path('dlpan', 'io', 'inputs_wv2_samples.npz'))
  with jax.enable_x64(True):
    # The toolbox high-passes the raw values / 2047 in float64 (ps_evaluate.py:83-89).
    raw_ms = nhwc(inp['rr_ms']).astype(np.float64)
    hp = np.asarray(dlpan_layers.high_pass(jnp.asarray(raw_ms)))
  assert np.abs(hp - nhwc(ref['rr_ms_hp'])).max() < 1e-6


def test_apnn_checkpoints_read_safely():
  """The .pth.tar files pickle a whole nn.Module: read as inert placeholders; widths 48 / 64."""
  widths = {s: released('apnn', s)[0]['width'] for s in SENSORS}
  assert widths == {'WV3': 48, 'WV2': 64, 'QB': 64, 'WV4': 64}


def test_apnn_finetune_matches_the_wv4_script():
  """WV4's test-time fine-tuning: the Wald input, the 50 losses, the kept epoch, the output."""
  io = np.load(shared_path('dlpan', 'io', 'ikonos_rr_4band.npz'))
  x_ref, target_ref = nhwc(io['apnn_wv4_ft_x']), nhwc(io['apnn_wv4_ft_target'])
  ms = np.asarray(io['raw_ms'], np.float32)[0].transpose(1, 2, 0) / np.float32(2047.0)
  pan = np.asarray(io['raw_pan'], np.float32)[0, 0] / np.float32(2047.0)
  x, target = apnn_lib.wald_input(ms, pan, 'WV4')
  assert np.abs(x - x_ref).max() < 1e-5
  assert np.abs(target - target_ref).max() < 1e-5
  cfg, params = released('apnn', 'WV4')
  model = models.create_model(cfg)
  res = apnn_lib.finetune(model, params, x_ref, target_ref, apnn_lib.FINETUNE_RECIPES['WV4'])
  np.testing.assert_allclose(res['losses'], io['apnn_wv4_ft_losses'], rtol=1e-4)
  assert res['best_epoch'] == int(io['apnn_wv4_ft_best_epoch'])
  xin = nhwc(io['apnn_x'])
  batch = {'lms': xin[:, 8:-8, 8:-8, :-1], 'guide': xin[:, 8:-8, 8:-8, -1:]}
  out = run(cfg, res['params'], batch)
  expect = nhwc(io['apnn_wv4_ft_out']) + batch['lms']
  # Float32 and float64 runs of the whole fine-tuning differ by 3.0e-6 (README of ../shared/dlpan).
  assert np.abs(out - expect).max() < 2e-5


# ----------------------------------------------------------------------------------------------
# Live: the toolbox's PyTorch code in float64 (torch CPU).


def _toolbox():
  torch = pytest.importorskip('torch', reason='torch CPU is needed to run the toolbox code')
  code = shared_path('dlpan', 'code')
  if str(code) not in sys.path:
    sys.path.insert(0, str(code))
  import dlpan_loader

  return torch, dlpan_loader


def _torch_reference(name: str, sensor: str, batch: dict) -> np.ndarray:
  """The toolbox network's image in float64 (its val_step's input preparation, NHWC out)."""
  torch, dl = _toolbox()
  from scipy import ndimage

  net = dl.load_dlpan_model(name, sensor).double()
  t = {
    k: torch.from_numpy(np.ascontiguousarray(np.transpose(v, (0, 3, 1, 2)), np.float64))
    for k, v in batch.items()
  }
  lms, pan, ms = t['lms'], t['guide'], t['ms']
  with torch.no_grad():
    if name in ('pnn', 'apnn'):
      x = torch.nn.functional.pad(torch.cat([lms, pan], 1), (8,) * 4, mode='replicate')
      out = net(x) + (lms if name == 'apnn' else 0)
    elif name == 'pannet':
      # get_edge (ps_evaluate.py:31-43) = x - 5x5 box mean, BORDER_REFLECT_101 (scipy 'mirror').
      def hp(a):
        return a - ndimage.uniform_filter(a, size=(1, 1, 5, 5), mode='mirror')

      hp_ms, hp_pan = (torch.from_numpy(hp(a.numpy())) for a in (ms, pan))
      out = lms + net(hp_ms, hp_pan)
    elif name == 'fusionnet':
      out = lms + net(lms, pan)
    else:
      out = net(lms, pan)
  return out.numpy().transpose(0, 2, 3, 1)


def _crop(batch: dict, size: int = 32) -> dict:
  """A `size`^2 PAN-grid crop, a whole image for the network (keeps float64 torch fast)."""
  return {
    'ms': batch['ms'][:1, : size // 4, : size // 4],
    'lms': batch['lms'][:1, :size, :size],
    'guide': batch['guide'][:1, :size, :size],
  }


@pytest.mark.slow
@pytest.mark.parametrize('sensor', SENSORS)
@pytest.mark.parametrize('name', NETS)
def test_every_release_equals_the_toolbox_in_float64(name, sensor):
  """Each of the 28 releases: float64 mode <= 1e-9 and float32 <= 2e-5 from PyTorch in float64."""
  batch = wv2_batch('rr') if sensor in ('WV3', 'WV2') else ikonos_batch()
  batch = _crop(batch)
  expect = _torch_reference(name, sensor, batch)
  cfg, params = released(name, sensor)
  assert np.abs(run(cfg, params, batch, 'float64') - expect).max() <= TOL64
  assert np.abs(run(cfg, params, batch, 'float32') - expect).max() <= TOL32


@pytest.mark.slow
@pytest.mark.parametrize('name', NETS)
def test_wv3_release_full_resolution_image(name):
  """WV3 weights on the full-resolution sample (PAN 256 x 256), float32, against the stored ref."""
  ref = np.load(shared_path('dlpan', 'io', f'{name}_wv3.npz'))
  batch = wv2_batch('fr')
  out = run(*released(name, 'WV3'), batch)
  assert np.abs(out - expected_image(name, nhwc(ref['fr_out']), batch['lms'])).max() <= TOL32


@pytest.mark.slow
def test_bdpn_equals_the_toolbox_code():
  """BDPN (no released weights): the toolbox's own initialisation (seed 1), float64.

  Its initialisation makes outputs of order 1e5 on [0, 1] inputs: the bound is relative.
  """
  torch, dl = _toolbox()
  net = dl.load_dlpan_model('bdpn', None, bands=4, seed=1).double()
  sd = {k: v.detach().float().numpy() for k, v in net.state_dict().items()}
  cfg = {'name': 'bdpn', 'spectral_bands': 4, 'guide_bands': 1}
  params = convert.torch_to_flax(sd, cfg)
  rng = np.random.default_rng(0)
  batch = {'ms': rng.random((1, 4, 4, 4)), 'guide': rng.random((1, 16, 16, 1))}
  with torch.no_grad():
    expect = net(
      torch.from_numpy(batch['ms'].transpose(0, 3, 1, 2).copy()),
      torch.from_numpy(batch['guide'].transpose(0, 3, 1, 2).copy()),
    )[0].numpy()
  # The toolbox initialises in float32: its .double() copy holds exactly the float32 values.
  out = run(cfg, params, batch, 'float64')
  expect = expect.transpose(0, 2, 3, 1)
  assert np.abs(out - expect).max() <= TOL64 * np.abs(expect).max()
