"""Shared test fixtures: the `../shared` reference folder and small helpers."""

from pathlib import Path

import pytest

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
