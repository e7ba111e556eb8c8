"""Scene lists for archive fusion (`fuse.py --scenes`): which PAN/MS pairs, and their outputs.

  scenes = scene_lists.read_scenes('scenes.csv', 'OUT')

Three forms: a CSV with `pan,ms` columns and an optional `out` (a file name under the output
folder; by default the PAN's stem + `.tif`), a pair of glob patterns `'PAN_GLOB,MS_GLOB'` (paired
in sorted order; the parts the wildcards match must agree, e.g. `a` in `a_pan.tif` and
`a_ms.tif`), or a STAC ItemCollection JSON whose items carry a PAN and an MS asset (the output is
named after the item id). Relative paths are resolved against the CSV's or the JSON's folder. A
bad list is one `DataError` naming the file, the line or item and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import os
import re
from pathlib import Path

from u2net_jax.data import DataError
from u2net_jax.io import naming


@dataclasses.dataclass(frozen=True)
class Scene:
  """One PAN/MS pair and where its output goes.

  Attributes:
    name: the output's stem (unique in a run): the summary's `scene`.
    pan, ms: absolute input paths.
    out: the absolute output path (`.tif`).
    source: the STAC Item the pair came from (a path or URL), or None.
    datetime: the acquisition time (ISO 8601) from the STAC Item, or None.
  """

  name: str
  pan: str
  ms: str
  out: str
  source: str | None = None
  datetime: str | None = None


def _resolve(path: str, base: Path) -> str:
  if re.match(r'^[a-z][a-z0-9+.-]*://', path):
    return path  # A URL: refused by the task with a clear reason (inputs are local files).
  p = Path(path).expanduser()
  return str(p if p.is_absolute() else (base / p).resolve())


def _output(out_dir: Path, name: str, where: str) -> tuple[str, str]:
  if not naming.is_name(name):
    raise DataError(f'{where}: output {name!r} must be a file name (no folder)')
  path = naming.output_path(out_dir, 'scene', scene=name)
  return naming.scene_name(path), str(path.resolve())


def _from_csv(path: Path, out_dir: Path) -> list[Scene]:
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'--scenes {path}: cannot read it ({e})') from e
  reader = csv.DictReader(io.StringIO(text))
  columns = [c.strip() for c in reader.fieldnames or []]
  if not {'pan', 'ms'} <= set(columns):
    raise DataError(
      f'--scenes {path}: needs the columns pan,ms (and optionally out); has {columns}'
    )
  scenes = []
  for line, row in enumerate(reader, start=2):
    row = {(k or '').strip(): (v or '').strip() for k, v in row.items()}
    if not row['pan'] or not row['ms']:
      raise DataError(f'--scenes {path}, line {line}: empty pan or ms')
    name, out = _output(out_dir, row.get('out') or Path(row['pan']).stem, f'{path}, line {line}')
    scenes.append(
      Scene(name, _resolve(row['pan'], path.parent), _resolve(row['ms'], path.parent), out)
    )
  return scenes


def _glob_regex(pattern: str) -> re.Pattern:
  """The pattern as a regex capturing what each `*` / `?` matches (for the pairing check)."""
  parts = []
  for token in re.split(r'(\*+|\?)', pattern):
    if token.startswith('*'):
      parts.append('(.*)')
    elif token == '?':
      parts.append('(.)')
    else:
      parts.append(re.escape(token))
  return re.compile(''.join(parts) + '$')


def _from_globs(spec: str, out_dir: Path) -> list[Scene]:
  patterns = [p.strip() for p in spec.split(',')]
  if len(patterns) != 2 or not all(patterns):
    raise DataError(f'--scenes {spec!r}: expected a CSV, a STAC JSON or "PAN_GLOB,MS_GLOB"')
  found = [sorted(glob.glob(os.path.expanduser(p))) for p in patterns]
  for pattern, files in zip(patterns, found, strict=True):
    if not files:
      raise DataError(f'--scenes: the pattern {pattern!r} matches no file')
  if len(found[0]) != len(found[1]):
    raise DataError(
      f'--scenes: {len(found[0])} PAN files match {patterns[0]!r} but {len(found[1])} MS files '
      f'match {patterns[1]!r}; they are paired in sorted order'
    )
  regexes = [_glob_regex(os.path.expanduser(p)) for p in patterns]
  scenes = []
  for pan, ms in zip(*found, strict=True):
    keys = [r.match(f) for r, f in zip(regexes, (pan, ms), strict=True)]
    if keys[0] and keys[1] and keys[0].groups() != keys[1].groups():
      raise DataError(
        f'--scenes: sorted pairing gives PAN {pan} with MS {ms}, whose wildcard parts differ '
        f'({keys[0].groups()} vs {keys[1].groups()}); a file is missing on one side'
      )
    name, out = _output(out_dir, Path(pan).stem, pan)
    scenes.append(Scene(name, str(Path(pan).resolve()), str(Path(ms).resolve()), out))
  return scenes


def _from_stac(path: Path, out_dir: Path, pan_asset: str, ms_asset: str) -> list[Scene]:
  try:
    import pystac
  except ImportError as e:
    raise DataError('STAC scene lists need pystac: pip install "u2net-jax[archive]"') from e
  try:
    items = pystac.ItemCollection.from_file(str(path))
  except Exception as e:  # pystac raises many types for a file that is not an ItemCollection.
    raise DataError(f'--scenes {path}: not a readable STAC ItemCollection ({e})') from e
  scenes = []
  for item in items:
    hrefs = []
    for key, flag in ((pan_asset, '--pan_asset'), (ms_asset, '--ms_asset')):
      if key not in item.assets:
        raise DataError(
          f'--scenes {path}: item {item.id!r} has no asset {key!r} ({flag}); its assets: '
          f'{sorted(item.assets)}'
        )
      hrefs.append(_resolve(item.assets[key].href, path.parent))
    name, out = _output(out_dir, item.id, f'{path}, item {item.id!r}')
    when = item.datetime or item.common_metadata.start_datetime
    source = item.get_self_href() or f'{path.resolve()}#{item.id}'
    scenes.append(Scene(name, *hrefs, out, source, when.isoformat() if when else None))
  return scenes


def read_scenes(
  spec: str, out_dir: str | os.PathLike, *, pan_asset: str = 'pan', ms_asset: str = 'ms'
) -> list[Scene]:
  """The scenes of `--scenes`: a CSV, `'PAN_GLOB,MS_GLOB'` or a STAC ItemCollection JSON.

  Args:
    spec: the `--scenes` value.
    out_dir: the output folder (outputs are named inside it).
    pan_asset, ms_asset: the STAC asset keys of the PAN and the MS.

  Returns:
    The scenes, in the order given.

  Raises:
    DataError: an unreadable list, a bad pairing, or two scenes with the same output name.
  """
  out_dir = Path(out_dir).expanduser()
  path = Path(spec).expanduser()
  if path.suffix.lower() in ('.json', '.geojson') and path.is_file():
    scenes = _from_stac(path, out_dir, pan_asset, ms_asset)
  elif path.is_file():
    scenes = _from_csv(path, out_dir)
  elif ',' in spec:
    scenes = _from_globs(spec, out_dir)
  else:
    raise DataError(f'--scenes {spec}: no such file (a CSV, a STAC JSON or "PAN_GLOB,MS_GLOB")')
  if not scenes:
    raise DataError(f'--scenes {spec}: no scenes listed')
  seen: dict[str, Scene] = {}
  for s in scenes:
    if s.name in seen:
      raise DataError(
        f'--scenes {spec}: two scenes write {s.name}.tif ({seen[s.name].pan} and {s.pan}); give '
        'an out column (CSV) or unique names'
      )
    seen[s.name] = s
  return scenes
