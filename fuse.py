r"""Fuses a whole scene of any size: PAN + MS files -> a georeferenced fused image.

  python -m u2net_jax.convert --checkpoint u2net_wv3_200000_iter.pth --config configs/wv3.py \
      --workdir workdirs/official_wv3
  python fuse.py --workdir=workdirs/official_wv3 --pan=pan.tif --ms=ms.tif --out=fused.tif
  python fuse.py --method=mtf-glp-hpm --sensor=WV2 --pan=pan.tif --ms=ms.tif --out=fused.tif

`--method` fuses with a classical method of `u2net_jax.methods` instead of a network: the
sensor's table gives its MTF gains, bands and maximum; the method runs window by window with its
image-wide statistics gathered in a first pass (`u2net_jax.infer.classical_fuser`).

Inputs: GeoTIFF (read window by window), `.npy`, `.mat` or PanCollection `.h5` single images, on
the sensor scale (divided by `config.data.max_value` or `--max_value`). The pair is checked before
any work: same CRS, PAN pixel = MS pixel / 4, top-left corners within half a PAN pixel, PAN 4x the
MS, band counts of the model; the output must not exist (`--overwrite`), be writable and be
neither input. Every flag is checked before any work. Values are checked while streaming, as
train.py and evaluate.py check theirs: data already divided to [0, 1], above the sensor maximum
or negative are refused naming the file, band, window and value (`--allow_off_scale` fuses them
anyway). Nodata (NaN, infinite, the files' nodata or `--nodata`) is filled before fusing and
written as the output's declared nodata value; the JSON summary counts those pixels.
SIGTERM / SIGINT remove the temporary output and end with one line; a later run on the same
output removes the temporaries of killed runs. With `--resume`, a run keeps a partial output and a
journal beside the output and a re-run (after a kill, SIGKILL included) continues after the last
finished window, to the same file (`u2net_jax.infer.scene_resume`).
The scene is fused with the official tiling (64-px tiles, 4-px margins) in windows of `--window`
PAN pixels, memory bounded by the window; the output (GeoTIFF with the PAN's georeference, or
`.npy`/`.mat`) appears under its name only when complete. The logic lives in
`u2net_jax.infer.scene`.
"""

import json
import math
import signal
import sys

from absl import app, flags, logging

from u2net_jax import errors
from u2net_jax.infer import scene

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir of a training run or of converted official weights.')
# A classical method instead of a workdir (u2net_jax.infer.classical_fuser, methods.streaming).
flags.DEFINE_string('method', None, 'A classical method (e.g. mtf-glp-hpm) instead of --workdir.')
flags.DEFINE_string('sensor', None, 'With --method: the sensor (WV3, WV2, QB, GF2, IKONOS, ...).')
flags.DEFINE_integer(
  'whole_image_limit',
  None,
  'With --method: the largest scene (PAN pixels) a whole-image method (c-gsa, tv, sr-d) reads '
  'at once (default 4096^2).',
)
flags.DEFINE_string('pan', None, 'PAN (or RGB guide) file: .tif, .npy, .mat or .h5.')
flags.DEFINE_string('ms', None, 'MS (or HSI) file: .tif, .npy, .mat or .h5.')
flags.DEFINE_string('out', None, 'Output file: .tif (GeoTIFF), .npy or .mat.')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the best one, else the latest).')
flags.DEFINE_enum('which', 'best', ['best', 'latest'], 'Checkpoint to use when --step is unset.')
flags.DEFINE_float('max_value', None, 'Sensor maximum (default: config.data.max_value).')
flags.DEFINE_string('dtype', None, 'Output dtype, e.g. float32 (default: the MS dtype).')
flags.DEFINE_bool(
  'rescale_output',
  False,
  'With an integer --dtype narrower than the data (e.g. uint8 for 11-bit): map 0..max_value '
  "onto the dtype's range instead of refusing.",
)
flags.DEFINE_float(
  'nodata',
  None,
  "Nodata value of inputs that declare none, and of the output (default: the inputs', else 0 "
  'for integer outputs, NaN for float ones).',
)
flags.DEFINE_bool(
  'allow_off_scale',
  False,
  'Fuse values off the 0..max_value scale (already in [0, 1], above the maximum, negative) '
  'instead of refusing them.',
)
flags.DEFINE_integer(
  'window',
  1024,
  'PAN pixels per window side, a multiple of the tile size (the width is rounded to a multiple '
  'of the tile batch: network_fuser.window_tiles).',
)
flags.DEFINE_integer('tile_batch', None, 'Tiles per jitted call (default: config.eval.tile_batch).')
flags.DEFINE_bool('overwrite', False, 'Replace an existing output file.')
flags.DEFINE_bool(
  'resume',
  False,
  'Keep a partial output and its journal beside --out (.NAME.partial.npy/.json) and, when a run '
  'of the same inputs, weights and options left them, continue after its last finished window.',
)
flags.DEFINE_bool('cog', False, 'Write a Cloud-Optimized GeoTIFF (with overviews).')
flags.DEFINE_string('pan_key', None, 'PAN array name inside .mat/.h5 inputs.')
flags.DEFINE_string('ms_key', None, 'MS array name inside .mat/.h5 inputs.')
flags.DEFINE_bool('progress', True, 'Show a progress bar (tiles/s, ETA) on stderr.')
# Many scenes on a Dask cluster (u2net_jax.infer.archive; README "Many scenes on a cluster").
flags.DEFINE_string('scenes', None, 'Many: CSV (pan,ms[,out]), "PAN_GLOB,MS_GLOB" or STAC JSON.')
flags.DEFINE_string('out_dir', None, 'With --scenes: the folder of the outputs and the summary.')
flags.DEFINE_integer('workers', None, 'With --scenes: LocalCluster worker processes.')
flags.DEFINE_integer('threads_per_worker', None, 'With --scenes: threads per worker.')
flags.DEFINE_string('scheduler', None, 'With --scenes: an existing Dask scheduler address.')
flags.DEFINE_string('dashboard_address', ':8787', 'With --scenes: the LocalCluster dashboard.')
flags.DEFINE_string('pan_asset', 'pan', 'With a STAC --scenes: the PAN asset key.')
flags.DEFINE_string('ms_asset', 'ms', 'With a STAC --scenes: the MS asset key.')
flags.register_multi_flags_validator(
  ['workdir', 'method'],
  lambda f: (f['workdir'] is None) != (f['method'] is None),
  message='give --workdir (a network) or --method (a classical method), one of them',
)
flags.register_multi_flags_validator(
  ['pan', 'ms', 'out', 'scenes'],
  lambda f: f['scenes'] is not None or None not in (f['pan'], f['ms'], f['out']),
  message='give --pan, --ms and --out (one scene) or --scenes and --out_dir (many)',
)


def _stop(signum, frame):
  # Raised where the main thread is: every `finally` on the way out removes the temporary.
  name = signal.Signals(signum).name
  raise errors.Interrupted(name, 128 + signum)


def _fuse_with_method():
  """`--method`: the classical method over the scene by windows (`infer.classical_fuser`)."""
  from u2net_jax.infer import classical_fuser

  fuser = classical_fuser.from_flags(FLAGS)
  return scene.fuse_files_with(
    fuser,
    FLAGS.pan,
    FLAGS.ms,
    FLAGS.out,
    **classical_fuser.scene_options(FLAGS, fuser),
    resume=FLAGS.resume,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('sensor', 'whole_image_limit'):
    if FLAGS.method is None and FLAGS[name].value is not None:
      sys.exit(f'error: --{name} goes with --method (a workdir names its own sensor)')
  if FLAGS.scenes is not None:
    from u2net_jax.infer import archive  # dask is imported only for archive runs.

    sys.exit(archive.run_from_flags(FLAGS))
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _stop)
  try:
    if FLAGS.method is not None:
      result = _fuse_with_method()  # NumPy only: JAX is not imported (~2 s of start-up).
    else:
      import jax

      from u2net_jax.infer import network_fuser

      logging.info('JAX devices: %s', jax.devices())
      result = network_fuser.fuse_files(
        FLAGS.workdir,
        FLAGS.pan,
        FLAGS.ms,
        FLAGS.out,
        step=FLAGS.step,
        which=FLAGS.which,
        max_value=FLAGS.max_value,
        dtype=FLAGS.dtype,
        window=FLAGS.window,
        tile_batch=FLAGS.tile_batch,
        overwrite=FLAGS.overwrite,
        cog=FLAGS.cog,
        pan_key=FLAGS.pan_key,
        ms_key=FLAGS.ms_key,
        progress=FLAGS.progress,
        nodata=FLAGS.nodata,
        allow_off_scale=FLAGS.allow_off_scale,
        rescale_output=FLAGS.rescale_output,
        resume=FLAGS.resume,
      )
  except (*errors.user_errors(), FileNotFoundError) as e:
    # What a user can fix (inputs, the output path, the workdir): one line, no traceback.
    sys.exit(f'error: {e} (nothing written)')
  except KeyboardInterrupt as e:  # SIGTERM (errors.Interrupted) or Ctrl-C.
    name, status = (
      (e.signal_name, e.status) if isinstance(e, errors.Interrupted) else ('SIGINT', 130)
    )
    kept = 'the partial output kept for --resume' if FLAGS.resume else 'nothing written'
    print(f'error: stopped by {name}; {kept}, the temporary output removed', file=sys.stderr)
    sys.exit(status)
  if isinstance(result.get('nodata'), float) and math.isnan(result['nodata']):
    result['nodata'] = 'nan'  # JSON has no NaN.
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
