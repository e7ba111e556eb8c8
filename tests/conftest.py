"""Shared test fixtures: the `../shared` reference folder and small helpers."""

import os
from pathlib import Path

import pytest

# The suite compiles many small U2Net programs whose run time is negligible: XLA's backend
# optimisations halve the CPU compile time when switched off, without changing what is computed.
# Set before jax initialises its backend; subprocesses started by the tests inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
  ).strip()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'


def shared_path(*parts: str) -> Path:
  """A file under `../shared`; skips the calling test with the reason when it is absent."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'{path} is absent: reference files from ../shared are not available here')
  return path


@pytest.fixture
def shared():
  return shared_path
