"""What an archive output records about itself: identities, checksums, manifest, STAC Item.

Beside each output `<name>.tif` of `fuse.py --scenes` (`infer.archive`):

- `<name>.manifest.json`, written last (a scene is done exactly when its manifest is): the
  version, the inputs' identity (`file_identity`: path, size, mtime and a fast BLAKE2b of the
  first, middle and last MiB), the engine's identity (`infer.archive.engine_identity`: method,
  workdir, step, tile batch and `checkpoint_hash`, a BLAKE2b over the checkpoint's parameter
  files: each file's relative path and fast hash), the pixel options, the output's size, mtime
  and SHA-256 of the whole file, pixels, nodata pixels, seconds and the creation time;
- `<name>.stac.json` (`stac_item`): a STAC Item with the output asset, `derived_from` links to
  its inputs (and input STAC Item), the method and the weights.

A re-run skips a scene whose manifest matches (`quick_complete`: by stat alone, client side;
`complete`: by content, the output re-hashed, on a worker).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from u2net_jax.io import fileio, naming

if TYPE_CHECKING:
  from u2net_jax.data.scene_lists import Scene

MANIFEST_VERSION = 1
# The fast hash of an input reads this many bytes at its start, middle and end: a changed file
# almost always changes its size, mtime or one of these; reading whole multi-GB scenes again on
# every re-run would cost more than the check is worth.
HASH_CHUNK = 1 << 20


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
  """An input's identity: size, mtime (ns) and a BLAKE2b of its first, middle and last MiB."""
  path = Path(path)
  st = path.stat()
  digest = hashlib.blake2b(str(st.st_size).encode(), digest_size=16)
  with open(path, 'rb') as f:
    for offset in sorted(
      {0, max(0, st.st_size // 2 - HASH_CHUNK // 2), max(0, st.st_size - HASH_CHUNK)}
    ):
      f.seek(offset)
      digest.update(f.read(HASH_CHUNK))
  return {
    'path': str(path),
    'size': st.st_size,
    'mtime_ns': st.st_mtime_ns,
    'fast_hash': digest.hexdigest(),
  }


def sha256_file(path: str | os.PathLike) -> str:
  """The SHA-256 (hex) of a whole file, read by 8 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(8 << 20):
      digest.update(block)
  return digest.hexdigest()


def checkpoint_hash(folder: str | os.PathLike) -> str:
  """A BLAKE2b (hex) over a checkpoint's parameter files: each one's relative path and fast hash.

  The fast hash (`file_identity`) covers a file's size and its first, middle and last MiB, so a
  parameter file over 3 MiB is not read whole. `commit_success.txt` is left out: it holds the
  save's time, not the weights.

  Args:
    folder: the checkpoint's `params` folder.
  """
  folder = Path(folder)
  digest = hashlib.blake2b(digest_size=16)
  for path in sorted(p for p in folder.rglob('*') if p.is_file()):
    if path.name != 'commit_success.txt':
      digest.update(f'{path.relative_to(folder)}:{file_identity(path)["fast_hash"]};'.encode())
  return digest.hexdigest()


def manifest_path(out: str | os.PathLike) -> Path:
  """`<name>.manifest.json` beside the output `<name>.tif`."""
  return naming.beside_output(out, 'manifest')


def stac_path(out: str | os.PathLike) -> Path:
  """`<name>.stac.json` beside the output `<name>.tif`."""
  return naming.beside_output(out, 'stac_item')


def read_manifest(s: Scene, engine: dict, options: dict) -> dict | None:
  """The scene's manifest if it was made by the same engine and options (and its STAC Item and
  output exist), else None."""
  try:
    manifest = json.loads(manifest_path(s.out).read_text())
  except (OSError, ValueError):
    return None
  same = (
    isinstance(manifest, dict)
    and manifest.get('version') == MANIFEST_VERSION
    and manifest.get('engine') == engine
    and manifest.get('options') == options
    and Path(s.out).is_file()
    and stac_path(s.out).is_file()
  )
  return manifest if same else None


def _stat(path: str | os.PathLike) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def quick_complete(s: Scene, engine: dict, options: dict) -> dict | None:
  """The manifest when the output is complete by `stat` alone (client side, before any task).

  The inputs' and the output's sizes and mtimes equal the manifest's: skipped without reading a
  byte. Anything else (e.g. files copied with new mtimes) goes to a task, which compares the
  contents (`complete`).
  """
  manifest = read_manifest(s, engine, options)
  if manifest is None:
    return None
  try:
    inputs = manifest['inputs']
    same = (
      _stat(s.pan) == [inputs['pan']['size'], inputs['pan']['mtime_ns']]
      and _stat(s.ms) == [inputs['ms']['size'], inputs['ms']['mtime_ns']]
      and _stat(s.out) == [manifest['output']['size'], manifest['output']['mtime_ns']]
    )
  except (OSError, KeyError, TypeError):
    return None
  return manifest if same else None


def complete(s: Scene, inputs: dict, engine: dict, options: dict) -> dict | None:
  """The manifest of a complete output made from the same inputs (by size and fast hash), engine
  and options, its SHA-256 checked; the manifest is refreshed when only mtimes changed."""
  manifest = read_manifest(s, engine, options)
  if manifest is None:
    return None
  content = {r: (v['size'], v['fast_hash']) for r, v in inputs.items()}
  try:
    if content != {r: (v['size'], v['fast_hash']) for r, v in manifest['inputs'].items()}:
      return None
    if sha256_file(s.out) != manifest['output']['sha256']:
      return None  # Changed or damaged since: made again.
  except (OSError, KeyError, TypeError, AttributeError):
    return None
  manifest['inputs'] = inputs
  manifest['output'].update(zip(('size', 'mtime_ns'), _stat(s.out), strict=True))
  fileio.atomic_write_text(manifest_path(s.out), json.dumps(manifest, indent=1))
  return manifest


def stac_item(s: Scene, result: dict, engine: dict, options: dict) -> dict:
  """The output's STAC Item (as a dict): its asset, its inputs, the method and the weights."""
  import pystac
  import rasterio
  import rasterio.warp

  with rasterio.open(s.out) as f:
    bounds, crs = f.bounds, f.crs
  geometry = bbox = None
  if crs is not None:
    west, south, east, north = rasterio.warp.transform_bounds(crs, 'EPSG:4326', *bounds)
    bbox = [west, south, east, north]
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    geometry = {'type': 'Polygon', 'coordinates': [ring]}
  now = dt.datetime.now(dt.UTC)
  when = dt.datetime.fromisoformat(s.datetime) if s.datetime else now
  from u2net_jax import __version__

  item = pystac.Item(
    id=s.name,
    geometry=geometry,
    bbox=bbox,
    datetime=when,
    properties={
      'created': now.isoformat(),
      'u2net:method': engine['method'],
      'u2net:weights': {k: v for k, v in engine.items() if k != 'method'},
      'u2net:options': options,
      'u2net:software': f'u2net-jax {__version__}',
      'u2net:nodata_pixels': result['nodata_pixels'],
      'u2net:shape': result['shape'],
      'u2net:crs': crs.to_string() if crs is not None else None,
    },
  )
  item.add_asset(
    'fused',
    pystac.Asset(
      href=Path(s.out).name, media_type=pystac.MediaType.COG, roles=['data'], title='fused'
    ),
  )
  item.add_link(
    pystac.Link('derived_from', s.pan, media_type=pystac.MediaType.GEOTIFF, title='PAN')
  )
  item.add_link(pystac.Link('derived_from', s.ms, media_type=pystac.MediaType.GEOTIFF, title='MS'))
  if s.source:
    item.add_link(pystac.Link('derived_from', s.source, title='input STAC Item'))
  if engine.get('workdir'):
    item.add_link(pystac.Link('via', engine['workdir'], title='weights (workdir)'))
  return item.to_dict(include_self_link=False, transform_hrefs=False)


def write_manifest(
  s: Scene, inputs: dict, engine: dict, options: dict, result: dict[str, Any]
) -> dict[str, Any]:
  """Writes the scene's manifest (atomically, last of its files) and returns it.

  Args:
    s: the scene, its output complete.
    inputs: `{'pan': file_identity(...), 'ms': ...}` read before fusing.
    engine: the engine's identity; options: the pixel options.
    result: `network_fuser.fuse_files`' result (`shape`, `nodata_pixels`, `seconds`).
  """
  manifest = {
    'version': MANIFEST_VERSION,
    'scene': s.name,
    'inputs': inputs,
    'engine': engine,
    'options': options,
    'output': dict(zip(('size', 'mtime_ns'), _stat(s.out), strict=True), sha256=sha256_file(s.out)),
    'pixels': result['shape'][0] * result['shape'][1],
    'nodata_pixels': result['nodata_pixels'],
    'seconds': result['seconds'],
    'created': dt.datetime.now(dt.UTC).isoformat(),
  }
  fileio.atomic_write_text(manifest_path(s.out), json.dumps(manifest, indent=1))
  return manifest


def write_stac_item(s: Scene, result: dict, engine: dict, options: dict) -> None:
  """Writes the output's STAC Item `<name>.stac.json` (atomically)."""
  fileio.atomic_write_text(
    stac_path(s.out), json.dumps(stac_item(s, result, engine, options), indent=1)
  )
