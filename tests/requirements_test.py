"""`requirements.txt` is generated from `pyproject.toml`, the one place dependencies are declared.

`python tests/requirements_test.py --write` regenerates it after an edit of `pyproject.toml`; the
test fails (naming that command) when the two disagree, so the README's install command and
`pip install -e .[test]` always install the same releases.
"""

import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ('test',)  # What the README's test command needs besides the runtime dependencies.
HEADER = """\
# GENERATED from pyproject.toml ([project] dependencies and the `test` extra) by
#   python tests/requirements_test.py --write
# Edit pyproject.toml, not this file. On GPU/TPU, also install the accelerator build of the same
# jax release: pip install "jax[cuda12]>=0.10,<0.11" (or "jax[tpu]>=0.10,<0.11").
"""


def generated() -> str:
  """The text `requirements.txt` must have, from `pyproject.toml`."""
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  lines = [HEADER.rstrip('\n'), *project['dependencies']]
  for extra in EXTRAS:
    lines += [f'# Extra `{extra}`.', *project['optional-dependencies'][extra]]
  return '\n'.join(lines) + '\n'


def test_requirements_txt_is_generated_from_pyproject():
  assert (REPO / 'requirements.txt').read_text() == generated(), (
    'requirements.txt differs from pyproject.toml: run `python tests/requirements_test.py --write`'
  )


def test_extras_used_by_ci_are_declared():
  # .ci/run installs these extras; a renamed extra would make pip warn and install nothing.
  extras = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['optional-dependencies']
  ci = (REPO / '.ci' / 'run').read_text()
  for name in ('test', 'torch', 'archive', 'tpu'):
    assert name in extras and name in ci


if __name__ == '__main__':
  if sys.argv[1:] == ['--write']:
    (REPO / 'requirements.txt').write_text(generated())
  else:
    sys.exit('usage: python tests/requirements_test.py --write')
