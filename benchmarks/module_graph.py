"""The package's shape: modules, lines, import arrows and import cycles of `u2net_jax`.

  python benchmarks/module_graph.py                    # the working tree
  python benchmarks/module_graph.py d348464 HEAD       # git revisions, side by side
  python benchmarks/module_graph.py HEAD --arrows      # and every arrow

Counted from the source alone (`ast`, nothing imported), over `git ls-tree -r --name-only REV
u2net_jax` (`git show REV:path`) or the working tree's `u2net_jax/**/*.py`:

- modules: the `.py` files other than `__init__.py`; lines: every line of every `.py` file,
  `__init__.py` included;
- arrows: distinct (importer, imported) pairs of modules (packages count as their
  `__init__.py`) from every `import u2net_jax...` and `from u2net_jax... import ...` in a module,
  at its top or inside a function (a function-level import is still a dependency); `from pkg
  import name` points at `pkg.name` when that is a module, else at `pkg`;
- cycles: the strongly connected components of the arrows with more than one module;
- large: modules over 600 lines (each needs its reason in its docstring).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LARGE = 600


def _sources(rev: str | None) -> dict[str, str]:
  """Path -> source of every `.py` file of the package at `rev` (None: the working tree)."""
  if rev is None:
    return {
      str(p.relative_to(REPO)): p.read_text(encoding='utf-8')
      for p in sorted((REPO / 'u2net_jax').rglob('*.py'))
    }
  listing = subprocess.run(
    ['git', 'ls-tree', '-r', '--name-only', rev, 'u2net_jax'],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return {
    path: subprocess.run(
      ['git', 'show', f'{rev}:{path}'], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for path in listing
    if path.endswith('.py')
  }


def _module(path: str) -> str:
  name = path[: -len('.py')].replace('/', '.')
  return name.removesuffix('.__init__')


def graph(rev: str | None = None) -> dict:
  """The package's modules, lines and arrows at `rev` (None: the working tree).

  Returns:
    {'modules': module -> lines, 'lines': total lines, 'arrows': sorted (importer, imported)
    pairs, 'init': the packages (`__init__.py`)}.
  """
  sources = _sources(rev)
  names = {_module(p): p for p in sources}
  arrows = set()
  for path, source in sources.items():
    me = _module(path)
    package = me if path.endswith('__init__.py') else me.rsplit('.', 1)[0]
    for node in ast.walk(ast.parse(source)):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # Relative: resolved against the importer's package.
          parts = package.split('.')[: len(package.split('.')) - node.level + 1]
          base = '.'.join(parts + ([base] if base else []))
        targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in names else base for a in node.names]
      for target in targets:
        if not target.startswith('u2net_jax'):
          continue
        while target not in names and '.' in target:
          target = target.rsplit('.', 1)[0]
        if target in names and target != me:
          arrows.add((me, target))
  return {
    'modules': {m: len(sources[p].splitlines()) for m, p in names.items()},
    'lines': sum(len(s.splitlines()) for s in sources.values()),
    'arrows': sorted(arrows),
    'init': {m for m, p in names.items() if p.endswith('__init__.py')},
  }


def cycles(arrows) -> list[list[str]]:
  """The strongly connected components of more than one module (each sorted), sorted."""
  after: dict[str, set[str]] = {}
  for a, b in arrows:
    after.setdefault(a, set()).add(b)
    after.setdefault(b, set())

  def reach(start):
    seen, todo = set(), [start]
    while todo:
      for nxt in after[todo.pop()] - seen:
        seen.add(nxt)
        todo.append(nxt)
    return seen

  reached = {m: reach(m) for m in after}
  found = {
    frozenset([m, *(o for o in reached[m] if m in reached[o])]) for m in after if m in reached[m]
  }
  return sorted(sorted(c) for c in found if len(c) > 1)


def summary(rev: str | None = None) -> dict:
  """Modules (without `__init__.py`), lines, arrows, cycles and the large modules at `rev`."""
  g = graph(rev)
  return {
    'rev': rev or 'working tree',
    'modules': len(g['modules']) - len(g['init']),
    'lines': g['lines'],
    'arrows': len(g['arrows']),
    'cycles': cycles(g['arrows']),
    'large': {m: n for m, n in sorted(g['modules'].items()) if n > LARGE},
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('revs', nargs='*', help='git revisions (default: the working tree)')
  parser.add_argument('--arrows', action='store_true', help='print every arrow too')
  args = parser.parse_args(argv)
  print('| revision | modules | lines | import arrows | cycles | modules over 600 lines |')
  print('|---|---|---|---|---|---|')
  for rev in args.revs or [None]:
    s = summary(rev)
    short = lambda m: m.removeprefix('u2net_jax.')  # noqa: E731
    loops = '; '.join(' ~ '.join(map(short, c)) for c in s['cycles']) or 'none'
    large = ', '.join(f'{short(m)} ({n})' for m, n in s['large'].items()) or 'none'
    print(f'| {s["rev"]} | {s["modules"]} | {s["lines"]:,} | {s["arrows"]} | {loops} | {large} |')
    if args.arrows:
      for a, b in graph(rev)['arrows']:
        print(f'  {short(a)} -> {short(b)}')


if __name__ == '__main__':
  sys.exit(main())
