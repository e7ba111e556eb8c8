"""The README's code map names every module of the package, and only modules that exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _code_map() -> str:
  readme = (REPO / 'README.md').read_text(encoding='utf-8')
  start = readme.index('## Code map')
  return readme[start : readme.index('\n## ', start + 1)]


def _listed() -> set[str]:
  """Module paths the table names: `u2net_jax/x/y.py`, and `a.py` after one in the same cell."""
  listed = set()
  for line in _code_map().splitlines():
    if not line.startswith('| `u2net_jax/'):
      continue
    cell = line.split('|')[1]
    folder = ''
    for name in re.findall(r'`([^`]+\.py)`', cell):
      if '/' in name:
        folder = name.rsplit('/', 1)[0]
        listed.add(name)
      else:
        listed.add(f'{folder}/{name}')
  return listed


def test_every_module_is_in_the_code_map_and_every_entry_exists():
  modules = {
    str(p.relative_to(REPO)) for p in (REPO / 'u2net_jax').rglob('*.py') if p.name != '__init__.py'
  }
  listed = _listed()
  assert not modules - listed, (
    f'modules missing from the README code map: {sorted(modules - listed)}'
  )
  assert not listed - modules, f'code map entries with no module: {sorted(listed - modules)}'


def test_every_package_is_a_row_of_the_code_map():
  packages = {
    str(p.parent.relative_to(REPO)) + '/' for p in (REPO / 'u2net_jax').rglob('__init__.py')
  } - {'u2net_jax/'}
  table = _code_map()
  assert all(f'`{p}`' in table for p in packages), sorted(packages)
