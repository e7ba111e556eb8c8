"""The project's one linter and formatter (ruff, configured in pyproject.toml) must pass."""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def _ruff(*args):
  exe = shutil.which('ruff')
  cmd = [exe, *args] if exe else [sys.executable, '-m', 'ruff', *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize('args', [('check', '.'), ('format', '--check', '.')])
def test_ruff(args):
  result = _ruff(*args)
  assert result.returncode == 0, result.stdout + result.stderr
