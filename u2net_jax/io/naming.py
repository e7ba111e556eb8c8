"""The names of the output files: one rule for what evaluate.py, compare.py and fuse.py write.

  naming.output_path(root, test_set='test_wv3')                   # root/test_wv3
  naming.output_path(folder, 'fused', index=0)                    # folder/output_mulExm_0.mat
  naming.output_path(folder, 'fused', method='GS', index=0)       # folder/GS/output_mulExm_0.mat
  naming.output_path(out_dir, 'scene', scene='a_pan')             # out_dir/a_pan.tif
  naming.output_path(out_dir, 'manifest', scene='a_pan')          # out_dir/a_pan.manifest.json

Who writes what (`OUTPUTS` holds the templates):

- `evaluate.py` (`infer.eval_lib`, `infer.reporting`): per test set, `<root>/<test set>/`
  (`<root>` by default `<workdir>/eval`) holds `table.txt`, `metrics.json`, `per_image.csv`,
  `output_mulExm_{k}.mat` (the official `test.py`'s name, k from 0, so the MATLAB toolbox reads
  them as it reads the authors' outputs), `preview_{k}.png` and `preview_{k}_{part}.png`;
- `compare.py` (`infer.compare`): `<out>/<test set>/` holds `table.{txt,md,tex,csv}`,
  `metrics.json`, `per_image.csv`, `figure_{k}.png` and `<method>/output_mulExm_{k}.mat`;
- `fuse.py --scenes` (`infer.archive`, `io.manifests`): `<out_dir>/<scene>.tif` (the scene is
  the PAN's stem, the STAC item id or the CSV's `out`; a name ending in `.tif`/`.tiff` is kept as
  given), `<scene>.stac.json`, `<scene>.manifest.json`, and `summary.csv` / `summary.json`.

The folder parts (`test_set`, `method`) and the `scene` must be single names: a path there is a
bug of the caller (users' names are checked, with their flag in the message, where they are read).
"""

from __future__ import annotations

import os
from pathlib import Path

OUTPUTS = {
  'evaluation': 'eval',  # The default output root of evaluate.py under the workdir.
  'table': 'table.{ext}',
  'metrics': 'metrics.json',
  'per_image': 'per_image.csv',
  'fused': 'output_mulExm_{index}.mat',
  'preview': 'preview_{index}.png',
  'preview_part': 'preview_{index}_{part}.png',
  'figure': 'figure_{index}.png',
  'scene': '{scene}.tif',
  'stac_item': '{scene}.stac.json',
  'manifest': '{scene}.manifest.json',
  'summary': 'summary.{ext}',
}
TIFF_SUFFIXES = ('.tif', '.tiff')


def is_name(name: str) -> bool:
  """Whether `name` is one file or folder name (not empty, not '.' or '..', no separator)."""
  return (
    bool(name)
    and name not in ('.', '..')
    and '/' not in name
    and '\\' not in name
    and os.sep not in name
  )


def output_path(
  folder: str | os.PathLike,
  kind: str | None = None,
  *,
  test_set: str | None = None,
  method: str | None = None,
  **fields: object,
) -> Path:
  """Where an output goes: `folder[/test_set][/method]/<the name of kind>`.

  Args:
    folder: the output root (or an output folder already).
    kind: a key of `OUTPUTS`, or None for the folder itself.
    test_set: the test set's folder (evaluate.py, compare.py).
    method: the method's folder inside it (compare.py's `.mat` outputs).
    **fields: the template's fields: `index` (the image's k), `part` (a preview's picture), `ext`
      (a table's or summary's format), `scene` (an archive output's stem).

  Returns:
    The path (nothing is created).

  Raises:
    KeyError: an unknown kind, or a field its template needs is missing.
    ValueError: a folder part or scene that is not a single name.
  """
  path = Path(folder)
  for part in (test_set, method, fields.get('scene')):
    if part is not None and not is_name(str(part)):
      raise ValueError(f'output name {part!r} must be a single file name (no folder)')
  for part in (test_set, method):
    if part is not None:
      path = path / part
  if kind is None:
    return path
  scene = str(fields.get('scene', ''))
  if kind == 'scene' and Path(scene).suffix.lower() in TIFF_SUFFIXES:
    return path / scene  # The CSV's `out` column named it with its suffix.
  return path / OUTPUTS[kind].format(**fields)


def scene_name(out: str | os.PathLike) -> str:
  """The scene of an archive output `<scene>.tif` (`.tiff`): its stem."""
  return Path(out).stem


def beside_output(out: str | os.PathLike, kind: str) -> Path:
  """The `stac_item` or `manifest` file beside the archive output `out` (`<scene>.tif`)."""
  out = Path(out)
  return output_path(out.parent, kind, scene=scene_name(out))
