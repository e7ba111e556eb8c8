r"""Compares classical pansharpening methods and trained networks: the paper's comparison table.

  python compare.py --test_files=demo --out=/tmp/compare     # the SYNTHETIC demo set, ~1 min
  python compare.py --test_files=wv2_rr=../shared/official/wv2_rr_sample.h5 --sensor=WV2 \
      --methods=classical --out=compare
  python compare.py --test_files=wv2_reduced=test_wv2_multiExm1.h5 --sensor=WV2 \
      --methods=exp,bt-h,bdsd-pc,mtf-glp-fs --workdirs=u2net=workdirs/official_wv3 --out=compare
  python compare.py --test_files=test_wv2_multiExm1.h5 --sensor=WV2 --methods=none \
      --workdirs=U2Net=workdirs/official_wv3,PNN=workdirs/pnn_wv3 --paper --out=compare

Every method runs on every test set with the protocol the file implies (reduced resolution with
`gt`, full resolution without); results go to `OUT/<test set>/` (tables as text, Markdown, LaTeX
and CSV, metrics.json, per-image CSV, `<method>/output_mulExm_{k}.mat`, one figure per image).
`--paper` adds the paper's published rows ("U2Net (paper)", from
`u2net_jax.infer.paper_tables`) when a test file is one of the paper's PanCollection test files.
The logic lives in `u2net_jax.infer.compare`.
"""

import sys

from absl import app, flags

from u2net_jax import errors
from u2net_jax.infer import compare, tiling
from u2net_jax.run import logging_utils

FLAGS = flags.FLAGS
flags.DEFINE_list(
  'test_files',
  ['demo'],
  'Test sets, as evaluate.py takes them: path.h5 (named by the stem), name=path.h5, or demo '
  '(the SYNTHETIC demo set).',
)
flags.DEFINE_string(
  'sensor', None, "The data's sensor (MTF gains, bands); default: the first workdir's, else WV3."
)
flags.DEFINE_list(
  'methods',
  ['classical'],
  f'Classical methods: classical (all), none, or some of {",".join(compare.CLASSICAL)}.',
)
flags.DEFINE_list('workdirs', [], 'Trained networks as name=workdir (the name is the row).')
flags.DEFINE_enum('mode', None, list(tiling.MODES), "Network inference (default: the workdir's).")
flags.DEFINE_float(
  'error_max', None, "Top of the figures' error scale, fraction of the maximum (default: auto)."
)
flags.DEFINE_bool(
  'paper',
  False,
  "Also print and write the paper's published rows (Tables 1-2) beside the measured ones when a "
  "test file is one of the paper's PanCollection test files (else one line says why not).",
)
flags.DEFINE_string('out', None, 'Output folder: one subfolder per test set.')
flags.mark_flag_as_required('out')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging_utils.configure()  # Library chatter (orbax) hidden unless -v 1.
  try:
    compare.compare(
      FLAGS.test_files,
      out_dir=FLAGS.out,
      sensor=FLAGS.sensor,
      method_names=FLAGS.methods,
      workdirs=FLAGS.workdirs,
      mode=FLAGS.mode,
      error_max=FLAGS.error_max,
      paper=FLAGS.paper,
    )
  except (*errors.user_errors(), FileNotFoundError) as e:
    # What a user can fix (a flag, a data file, a workdir): one line, no traceback.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
