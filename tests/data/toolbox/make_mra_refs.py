"""Makes the references of `tests/methods_mra_test.py`: the toolbox's own outputs on small crops.

The MATLAB toolbox runs unmodified in GNU Octave through the shared driver
(`../shared/toolbox/run_methods.py mat IN.mat DEST`, i.e. `run_methods.m`, which calls each
method as the demos do) on full-resolution crops of the shared real scenes, one per sensor the
toolbox knows. The driver's `I_MS` is `u2net_jax.toolbox.interp23tap(I_MS_LR, 4)` (equal to the
toolbox's own to ~1e-12), so that a test recomputes the exact input from `ms`. This script packs
each run into one compressed `mra_<name>.npz` here:

- `ms` (h, w, C) and `pan` (H, W): the crop, exact (integer DNs, stored as uint16);
- `sensor`, `ratio`, `crop` (R0, C0, H, W on the PAN grid of the scene), `source`;
- per method M (`AWLP`, `MTF-GLP`, ..., `SR-D`, and `TV` where the demo has parameters), as in
  `../shared/toolbox/refs` (full float64 outputs would not fit the repository's budget):
  `M/out_tl` = out[:K, :K] and `M/out_br` = out[-K:, -K:] (K = 16, float64: together they touch
  all four borders) and `M/band_sum`, `M/band_sumsq`, `M/band_min`, `M/band_max` per band over
  the whole output.

QB and GF-2 have no image among the shared data: the QB input is an IKONOS crop run with sensor
'QB'; the GF-2 input is a GeoEye-1 crop (8-bit) times 4, i.e. on GF-2's 10-bit scale, run with
sensor 'GF2' (the toolbox's `genMTF` has no GF-2 case and uses its default gain 0.3, which is
what the project's sensor table holds). TV has parameters for IKONOS, GeoEye1/WV4 and WV3 only.

It also prints, per input and method, the largest difference over every pixel between the
project's implementation (`u2net_jax.methods`) and the toolbox's full output, as a fraction of
the sensor's maximum; `--shared` adds the shared WV2 samples (`../shared/official/*.h5`, the
inputs of `../shared/toolbox/refs`), compared but not packed.

usage: python tests/data/toolbox/make_mra_refs.py [--work DIR] [--only NAME,...] [--shared]
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import scipy.io as sio

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
from u2net_jax import toolbox  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
SHARED = HERE.parents[2].parent / 'shared'
DRIVER = SHARED / 'toolbox' / 'run_methods.py'
METHODS = (
  'AWLP',
  'MTF-GLP',
  'MTF-GLP-FS',
  'MTF-GLP-HPM',
  'MTF-GLP-HPM-H',
  'MTF-GLP-HPM-R',
  'SR-D',
  'TV',
)
K = 16

# name: (scene file under ../shared/data, DN scale, sensor, crop R0 C0 H W on the PAN grid).
INPUTS = {
  'wv3_84x92': ('zpnn-wv3/WV3_example.mat', 1, 'WV3', (40, 24, 84, 92)),
  'ikonos_64': ('pnn-wv2-ikonos-geoeye1/imgIK.mat', 1, 'IKONOS', (400, 520, 64, 64)),
  'geoeye1_64': ('pnn-wv2-ikonos-geoeye1/imgGE1.mat', 1, 'GeoEye1', (600, 300, 64, 64)),
  'qb_64': ('pnn-wv2-ikonos-geoeye1/imgIK.mat', 1, 'QB', (640, 880, 64, 64)),
  'gf2_64': ('pnn-wv2-ikonos-geoeye1/imgGE1.mat', 4, 'GF2', (200, 700, 64, 64)),
}


def input_mat(path: pathlib.Path, scale: int, sensor: str, crop, dest: pathlib.Path) -> dict:
  """Writes the driver's input (.mat) for a crop of a scene; returns ms and pan."""
  m = sio.loadmat(path)
  ms = np.asarray(m['I_MS'] if 'I_MS' in m else m['I_MS_LR'], np.float64) * scale
  pan = np.asarray(m['I_PAN'], np.float64) * scale
  r0, c0, h, w = crop
  pan = pan[r0 : r0 + h, c0 : c0 + w]
  ms = ms[r0 // 4 : (r0 + h) // 4, c0 // 4 : (c0 + w) // 4]
  lms = toolbox.interp23tap(ms, 4)
  sio.savemat(dest, {'I_MS_LR': ms, 'I_MS': lms, 'I_PAN': pan, 'sensor': sensor, 'ratio': 4.0})
  return {'ms': ms, 'pan': pan}


def pack(name: str, run_dir: pathlib.Path, inp: dict, sensor: str, crop, source: str):
  arrays = {
    'ms': inp['ms'].astype(np.uint16),
    'pan': inp['pan'].astype(np.uint16),
    'sensor': sensor,
    'ratio': 4,
    'crop': np.asarray(crop),
    'source': source,
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
  dest = HERE / f'mra_{name}.npz'
  np.savez_compressed(dest, **arrays)
  return dest


SHARED_INPUTS = {
  'wv2_rr_sample_0': ('wv2_rr_sample.h5', 0),
  'wv2_rr_sample_1': ('wv2_rr_sample.h5', 1),
  'wv2_fr_sample_0': ('wv2_fr_sample.h5', 0),
}
OURS = {m: m.lower() for m in METHODS}


def compare(name: str, run_dir: pathlib.Path) -> None:
  """Prints max |ours - toolbox| / sensor maximum per method, over every pixel."""
  from u2net_jax import methods

  inp = np.load(run_dir / 'inputs.npz')
  sensor = toolbox.get_sensor(str(inp['sensor']))
  errors = []
  for method in METHODS:
    f = run_dir / f'{method}.npz'
    if not f.exists():
      continue
    ref = np.load(f)['out']
    out = methods.METHODS[OURS[method]](inp['lms'], inp['pan'], inp['ms'], sensor=sensor['name'])
    errors.append(f'{method} {np.abs(out - ref).max() / sensor["max_value"]:.1e}')
  print(f'max error / max value, {name}: ' + ', '.join(errors), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--work', default=None)
  ap.add_argument('--only', default=None)
  ap.add_argument('--shared', action='store_true', help='also compare on the shared WV2 samples')
  a = ap.parse_args(argv)
  work = pathlib.Path(a.work or tempfile.mkdtemp(prefix='mra_refs_'))
  work.mkdir(parents=True, exist_ok=True)
  names = a.only.split(',') if a.only else list(INPUTS)
  for name in names:
    src, scale, sensor, crop = INPUTS[name]
    in_mat = work / f'{name}_in.mat'
    inp = input_mat(SHARED / 'data' / src, scale, sensor, crop, in_mat)
    run_dir = work / name
    cmd = [sys.executable, str(DRIVER), 'mat', str(in_mat), str(run_dir)]
    cmd += ['--methods', ','.join(METHODS)]
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    source = f'{src} x{scale}' if scale != 1 else src
    dest = pack(name, run_dir, inp, sensor, crop, source)
    print(f'{dest}: {dest.stat().st_size} bytes', flush=True)
    compare(name, run_dir)
  for name, (h5, index) in SHARED_INPUTS.items() if a.shared else ():
    run_dir = work / name
    cmd = [sys.executable, str(DRIVER), 'h5', str(SHARED / 'official' / h5), str(index)]
    cmd += [str(run_dir), '--sensor', 'WV2', '--methods', ','.join(METHODS)]
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    compare(name, run_dir)


if __name__ == '__main__':
  main()
