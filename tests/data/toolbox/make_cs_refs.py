"""Makes the references of `tests/methods_cs_test.py`: the toolbox's own outputs on small crops.

The MATLAB toolbox runs unmodified in GNU Octave through the shared driver
(`../shared/toolbox/run_methods.py mat IN.mat DEST`, i.e. `run_methods.m`, which calls each
method as the demos do) on full-resolution crops of the shared real scenes, one per sensor the
toolbox knows, plus a non-square WV2 crop whose width is twice its height (BDSD's demo block size
is the height: two blocks). The driver's `I_MS` is `u2net_jax.toolbox.interp23tap(I_MS_LR, 4)`
(equal to the toolbox's own to ~1e-12), so that a test recomputes the exact input from `ms`.
C-GSA's segmentation (`S_seg` of the driver's input) is `kmeans_segmentation(I_MS, 5, seed=0)`
of `u2net_jax.methods.component_substitution`, stored as `seg`. This script packs each run into
one compressed `cs_<name>.npz` here:

- `ms` (h, w, C) and `pan` (H, W): the crop, exact (integer DNs, stored as uint16);
- `sensor` (the project's name), `toolbox_sensor` (the name given to the toolbox), `ratio`,
  `crop` (R0, C0, H, W on the PAN grid of the scene), `source`, `seg` (uint8), `errors` (the
  driver's error lines: BDSD refuses a height that does not divide the width);
- per method M (`EXP`, `BT-H`, `BDSD`, `BDSD-PC`, `GS`, `GSA`, `C-GSA`, `PRACS`), as in
  `../shared/toolbox/refs` (full float64 outputs would not fit the repository's budget):
  `M/out_tl` = out[:K, :K] and `M/out_br` = out[-K:, -K:] (K = 16, float64: together they touch
  all four borders) and `M/band_sum`, `M/band_sumsq`, `M/band_min`, `M/band_max` per band over
  the whole output.

QB and GF-2 have no image among the shared data: the QB input is an IKONOS crop run with sensor
'QB'; the GF-2 input is a GeoEye-1 crop (8-bit) times 4, i.e. on GF-2's 10-bit scale. The toolbox
knows no GF-2: `genMTF` falls back to 0.3 per band and `MTF_PAN` fails on an unknown name but has
'none' (0.15); these are the project's GF2 gains, so the toolbox runs with sensor 'none'.

PRACS calls `regress` (Octave's statistics package). Where that package is not installed, this
script installs a stand-in package named statistics holding only `regress` (b = R \\ (Q' y) of
an economy QR, as octave-statistics 1.5.3 computes it) into a private Octave HOME under the work
folder; with it the driver reproduces the shared `refs/wv2_rr_sample_0/PRACS.npz` (made with the
real package) to 1.0e-11 on 0..2047.

usage: python tests/data/toolbox/make_cs_refs.py [--work /tmp/cs_refs] [--only NAME,...]
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import scipy.io as sio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from u2net_jax import toolbox  # noqa: E402
from u2net_jax.methods import component_substitution as cs  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
SHARED = HERE.parents[2].parent / 'shared'
DRIVER = SHARED / 'toolbox' / 'run_methods.py'
METHODS = ('EXP', 'BT-H', 'BDSD', 'BDSD-PC', 'GS', 'GSA', 'C-GSA', 'PRACS')
K = 16

# name: (scene under ../shared/data, DN scale, sensor, toolbox sensor, crop R0 C0 H W on PAN grid).
INPUTS = {
  'ikonos_84x92': ('pnn-wv2-ikonos-geoeye1/imgIK.mat', 1, 'IKONOS', 'IKONOS', (400, 600, 84, 92)),
  'wv3_64': ('zpnn-wv3/WV3_example.mat', 1, 'WV3', 'WV3', (32, 40, 64, 64)),
  'qb_64': ('pnn-wv2-ikonos-geoeye1/imgIK.mat', 1, 'QB', 'QB', (640, 880, 64, 64)),
  'geoeye1_64': ('pnn-wv2-ikonos-geoeye1/imgGE1.mat', 1, 'GeoEye1', 'GeoEye1', (600, 300, 64, 64)),
  'gf2_64': ('pnn-wv2-ikonos-geoeye1/imgGE1.mat', 4, 'GF2', 'none', (200, 700, 64, 64)),
  'wv2_64x128': ('pnn-wv2-ikonos-geoeye1/imgWV2.mat', 1, 'WV2', 'WV2', (512, 256, 64, 128)),
}

_REGRESS = """function b = regress(y, X)
  % stand-in: the coefficients of octave-statistics' regress (economy QR least squares)
  [Q, R] = qr(X, 0);
  b = R \\ (Q' * y);
end
"""
_DESCRIPTION = """Name: statistics
Version: 0.0.1
Date: 2026-01-01
Author: stand-in
Maintainer: stand-in
Title: regress stand-in
Description: regress only, for the PRACS references of make_cs_refs.py.
Categories: Statistics
License: GPLv3+
"""


def octave_env(work: pathlib.Path) -> dict:
  """The environment for the driver: a private HOME with the regress stand-in if needed."""
  probe = subprocess.run(
    ['octave', '--no-gui', '-q', '--eval', 'pkg load statistics'], capture_output=True, text=True
  )
  if 'not installed' not in probe.stdout + probe.stderr:
    return dict(os.environ)
  home = work / 'octave_home'
  pkg = work / 'statistics'
  (pkg / 'inst').mkdir(parents=True, exist_ok=True)
  (pkg / 'DESCRIPTION').write_text(_DESCRIPTION)
  (pkg / 'COPYING').write_text('stand-in\n')
  (pkg / 'inst' / 'regress.m').write_text(_REGRESS)
  tar = work / 'statistics-0.0.1.tar.gz'
  with tarfile.open(tar, 'w:gz') as t:
    t.add(pkg, arcname='statistics')
  home.mkdir(exist_ok=True)
  env = dict(os.environ, HOME=str(home))
  subprocess.run(
    ['octave', '--no-gui', '-q', '--eval', f"pkg install -local '{tar}'"], env=env, check=False
  )
  return env


def input_mat(path, scale, toolbox_sensor, crop, dest) -> dict:
  """Writes the driver's input (.mat) for a crop of a scene; returns ms, pan and seg."""
  m = sio.loadmat(path)
  ms = np.asarray(m['I_MS'] if 'I_MS' in m else m['I_MS_LR'], np.float64) * scale
  pan = np.asarray(m['I_PAN'], np.float64) * scale
  r0, c0, h, w = crop
  pan = pan[r0 : r0 + h, c0 : c0 + w]
  ms = ms[r0 // 4 : (r0 + h) // 4, c0 // 4 : (c0 + w) // 4]
  lms = toolbox.interp23tap(ms, 4)
  seg = cs.kmeans_segmentation(lms, 5, seed=0)
  sio.savemat(
    dest,
    {
      'I_MS_LR': ms,
      'I_MS': lms,
      'I_PAN': pan,
      'sensor': toolbox_sensor,
      'ratio': 4.0,
      'S_seg': seg.astype(np.float64),
    },
  )
  return {'ms': ms, 'pan': pan, 'seg': seg}


def pack(name, run_dir, inp, sensor, toolbox_sensor, crop, source, errors):
  arrays = {
    'ms': inp['ms'].astype(np.uint16),
    'pan': inp['pan'].astype(np.uint16),
    'seg': inp['seg'].astype(np.uint8),
    'sensor': sensor,
    'toolbox_sensor': toolbox_sensor,
    'ratio': 4,
    'crop': np.asarray(crop),
    'source': source,
    'errors': errors,
  }
  assert np.array_equal(arrays['ms'], inp['ms']) and np.array_equal(arrays['pan'], inp['pan'])
  for method in METHODS:
    f = run_dir / f'{method}.npz'
    if not f.exists():
      continue
    out = np.load(f)['out']
    arrays[f'{method}/out_tl'] = out[:K, :K]
    arrays[f'{method}/out_br'] = out[-K:, -K:]
    arrays[f'{method}/band_sum'] = out.sum(axis=(0, 1))
    arrays[f'{method}/band_sumsq'] = (out * out).sum(axis=(0, 1))
    arrays[f'{method}/band_min'] = out.min(axis=(0, 1))
    arrays[f'{method}/band_max'] = out.max(axis=(0, 1))
  dest = HERE / f'cs_{name}.npz'
  np.savez_compressed(dest, **arrays)
  return dest


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--work', default=None)
  ap.add_argument('--only', default=None)
  a = ap.parse_args(argv)
  work = pathlib.Path(a.work or tempfile.mkdtemp(prefix='cs_refs_')).resolve()
  work.mkdir(parents=True, exist_ok=True)
  env = octave_env(work)
  names = a.only.split(',') if a.only else list(INPUTS)
  for name in names:
    src, scale, sensor, toolbox_sensor, crop = INPUTS[name]
    in_mat = work / f'{name}_in.mat'
    inp = input_mat(SHARED / 'data' / src, scale, toolbox_sensor, crop, in_mat)
    run_dir = work / name
    cmd = [sys.executable, str(DRIVER), 'mat', str(in_mat), str(run_dir)]
    cmd += ['--methods', ','.join(METHODS)]
    print(' '.join(cmd), flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    print(p.stdout, p.stderr, flush=True)
    errors = p.stderr.split('FAILED:', 1)[1].strip() if 'FAILED:' in p.stderr else ''
    source = f'{src} x{scale}' if scale != 1 else src
    dest = pack(name, run_dir, inp, sensor, toolbox_sensor, crop, source, errors)
    print(f'{dest}: {dest.stat().st_size} bytes', flush=True)


if __name__ == '__main__':
  main()
