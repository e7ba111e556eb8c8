"""The paper's published pansharpening tables (Tables 1 and 2) as data, and when they apply.

Typed from the U2Net paper (Peng et al., ACM MM 2023; `../shared/paper/u2net-mm2023.md`):

- **Table 1** (Section 4.2): 20 reduced-resolution and 20 full-resolution WorldView-3 samples
  of PanCollection (`test_wv3_multiExm1.h5`, PAN 256 x 256; `test_wv3_OrigScale_multiExm1.h5`,
  PAN 512 x 512); PSNR, Q8, SAM, ERGAS and D_lambda, D_s, QNR, mean ± std.
- **Table 2** (Section 4.3, generalisation): the DL methods *trained on WV3* tested on the 20
  reduced-resolution WorldView-2 samples (`test_wv2_multiExm1.h5`); PSNR, Q8, SAM, ERGAS. It has
  no classical rows and no full-resolution part.

Each cell keeps the text the paper prints (its digits), so a published row reads as published.
The paper's full-resolution columns are the toolbox's hybrid ones: its D_lambda is Khan's
`D_lambda_K` and its QNR is `HQNR` = (1 - D_lambda_K)(1 - D_s) (U2Net: 0.9822 x 0.9687 = 0.9514);
`PAPER_KEYS` maps each column to the key of `u2net_jax.metrics`.

`published_for(...)` says whether a test set is one of those PanCollection files (by file name,
protocol, sensor, number of images and size) and returns its published rows, or the reason none
applies. `match_rows` pairs measured rows with published ones by name (case and punctuation
ignored; DiCNN1 is the paper's DiCNN); `for_test_set`, `note` and `row_name` are what
`compare.py --paper` writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Paper column -> `u2net_jax.metrics` key.
PAPER_KEYS = {
  'PSNR': 'PSNR',
  'Q8': 'Q2n',
  'SAM': 'SAM',
  'ERGAS': 'ERGAS',
  'D_lambda': 'D_lambda_K',
  'D_s': 'D_s',
  'QNR': 'HQNR',
}

# Table 1, reduced resolution: method, PSNR, Q8, SAM, ERGAS.
_TABLE_1_RR = """
BT-H         33.080±2.880 0.832±0.094 4.920±1.425 4.580±1.496
TV           32.381±2.328 0.795±0.120 5.692±1.808 4.855±1.434
MTF-GLP-HPM  33.095±2.800 0.835±0.092 5.333±1.761 4.616±1.503
MTF-GLP-FS   32.963±2.753 0.833±0.092 5.315±1.765 4.700±1.597
BDSD-PC      32.970±2.784 0.829±0.097 5.428±1.822 4.697±1.617
PNN          37.313±2.646 0.893±0.092 3.677±0.762 2.681±0.647
PanNet       37.346±2.688 0.891±0.093 3.613±0.766 2.664±0.688
MSDCNN       37.068±2.686 0.890±0.090 3.777±0.803 2.760±0.689
DiCNN        37.390±2.761 0.900±0.087 3.592±0.762 2.672±0.662
BDPN         36.191±2.702 0.871±0.100 4.201±0.857 3.046±0.732
FusionNet    38.047±2.589 0.904±0.090 3.324±0.698 2.465±0.644
MUCNN        38.262±2.703 0.911±0.089 3.206±0.681 2.400±0.617
LAGNet       38.592±2.778 0.910±0.091 3.103±0.558 2.292±0.607
PMACNet      38.595±2.882 0.912±0.092 3.073±0.623 2.293±0.532
U2Net        39.117±3.009 0.920±0.085 2.888±0.581 2.149±0.525
"""

# Table 1, full resolution: method, D_lambda, D_s, QNR.
_TABLE_1_FR = """
BT-H         0.0574±0.0232 0.0810±0.0374 0.8670±0.0540
TV           0.0234±0.0061 0.0393±0.0227 0.9383±0.0269
MTF-GLP-HPM  0.0206±0.0082 0.0630±0.0284 0.9180±0.0346
MTF-GLP-FS   0.0197±0.0078 0.0630±0.0289 0.9187±0.0347
BDSD-PC      0.0625±0.0235 0.0730±0.0356 0.8698±0.0531
PNN          0.0213±0.0080 0.0428±0.0147 0.9369±0.0212
PanNet       0.0165±0.0074 0.0470±0.0210 0.9374±0.0271
MSDCNN       0.0230±0.0091 0.0467±0.0199 0.9316±0.0271
DiCNN        0.0362±0.0111 0.0462±0.0175 0.9195±0.0258
BDPN         0.0364±0.0142 0.0459±0.0192 0.9196±0.0308
FusionNet    0.0239±0.0090 0.0364±0.0137 0.9406±0.0197
MUCNN        0.0258±0.0111 0.0327±0.0140 0.9424±0.0205
LAGNet       0.0368±0.0148 0.0418±0.0152 0.9230±0.0247
PMACNet      0.0540±0.0232 0.0336±0.0115 0.9143±0.0281
U2Net        0.0178±0.0072 0.0313±0.0075 0.9514±0.0115
"""

# Table 2: method, reduced resolution (PSNR Q8 SAM ERGAS); WV3-trained networks on WV2 data.
_TABLE_2 = """
PNN          28.045±1.865 0.762±0.093 7.115±1.682 5.615±0.943
PanNet       30.276±2.290 0.840±0.080 5.495±0.713 4.337±0.520
DiCNN        27.200±2.327 0.721±0.075 6.921±0.788 6.251±0.574
MSDCNN       29.441±2.227 0.824±0.080 6.006±0.638 4.744±0.494
BDPN         28.973±1.714 0.824±0.093 7.089±0.864 4.856±0.570
FusionNet    28.735±2.460 0.796±0.074 6.426±0.860 5.136±0.515
MUCNN        27.839±2.328 0.777±0.088 7.504±0.539 5.517±0.299
LAGNet       28.050±2.239 0.805±0.084 6.955±0.474 5.326±0.318
PMACNet      19.160±4.512 0.509±0.128 15.95±3.329 15.69±3.307
U2Net        30.740±2.173 0.849±0.085 5.250±0.545 4.070±0.392
"""

_REDUCED = ('PSNR', 'Q8', 'SAM', 'ERGAS')
_FULL = ('D_lambda', 'D_s', 'QNR')
# Other spellings of the paper's method names (normalised by `normalise`).
ALIASES = {'dicnn1': 'dicnn', 'u2netwv3': 'u2net'}


@dataclass(frozen=True)
class Cell:
  """One published cell: mean, std and the text as printed in the paper."""

  mean: float
  std: float
  text: str


def _parse(text: str, columns: tuple[str, ...]) -> dict[str, dict[str, Cell]]:
  rows: dict[str, dict[str, Cell]] = {}
  for line in text.strip().splitlines():
    name, *cells = line.split()
    assert len(cells) == len(columns), line  # The typed table itself.
    row = {}
    for column, cell in zip(columns, cells, strict=True):
      mean, std = cell.split('±')
      row[PAPER_KEYS[column]] = Cell(float(mean), float(std), cell)
    rows[name] = row
  return rows


@dataclass(frozen=True)
class Published:
  """One published table part: its caption and method -> metric key -> `Cell`."""

  table: str  # 'Table 1 (reduced resolution)', ...
  caption: str
  rows: Mapping[str, Mapping[str, Cell]]


TABLE_1_REDUCED = Published(
  'Table 1 (reduced resolution)',
  'WV3, 20 reduced-resolution PanCollection images; Section 4.2',
  _parse(_TABLE_1_RR, _REDUCED),
)
TABLE_1_FULL = Published(
  'Table 1 (full resolution)',
  'WV3, 20 full-resolution PanCollection images; Section 4.2',
  _parse(_TABLE_1_FR, _FULL),
)
TABLE_2 = Published(
  'Table 2',
  'WV3-trained networks on 20 reduced-resolution PanCollection WV2 images; Section 4.3',
  _parse(_TABLE_2, _REDUCED),
)


@dataclass(frozen=True)
class TestFile:
  """A PanCollection test file the paper reports on: what it holds and its published table."""

  __test__ = False  # Not a pytest class.

  sensor: str
  protocol: str  # 'reduced' or 'full'.
  num_images: int
  size: int  # PAN height = width.
  published: Published


# PanCollection's test files (lower-case names), as the paper used them (Section 4.1: reduced
# resolution PAN 256 x 256, full resolution 512 x 512; 20 images each).
PANCOLLECTION = {
  'test_wv3_multiExm1.h5': TestFile('WV3', 'reduced', 20, 256, TABLE_1_REDUCED),
  'test_wv3_OrigScale_multiExm1.h5': TestFile('WV3', 'full', 20, 512, TABLE_1_FULL),
  'test_wv2_multiExm1.h5': TestFile('WV2', 'reduced', 20, 256, TABLE_2),
}
_NOT_PUBLISHED = {
  'test_wv2_OrigScale_multiExm1.h5': 'the paper publishes no full-resolution WV2 table '
  '(Table 2 is reduced resolution only)',
}


def normalise(name: str) -> str:
  """A method name for matching: lower case, letters and digits only, aliases resolved."""
  key = re.sub(r'[^0-9a-z]', '', name.lower())
  return ALIASES.get(key, key)


def published_for(
  file: str | Path | None,
  *,
  protocol: str,
  sensor: str,
  num_images: int,
  image_size: Iterable[int],
) -> tuple[Published | None, str]:
  """The published table part of a test set, if it is one of the paper's PanCollection files.

  Args:
    file: the test set's file (None or '' for the demo set or a TFDS split).
    protocol: 'reduced' or 'full' (the test set's).
    sensor: the sensor whose conventions score it.
    num_images: its number of images.
    image_size: (H, W) of its PAN images.

  Returns:
    (the `Published` part, '') when it applies; else (None, the reason, one sentence).
  """
  name = Path(str(file)).name if file else ''
  spec = {k.lower(): v for k, v in PANCOLLECTION.items()}.get(name.lower())
  if spec is None:
    unpublished = {k.lower(): v for k, v in _NOT_PUBLISHED.items()}
    if name.lower() in unpublished:
      return None, f'{name}: {unpublished[name.lower()]}'
    known = ', '.join(PANCOLLECTION)
    what = f'{name} is not' if name else 'the data are not read from an HDF5 file, so not'
    return None, f"{what} one of the paper's PanCollection test files ({known})"
  size = tuple(int(s) for s in image_size)
  found = {
    'protocol': (protocol, spec.protocol),
    'sensor': (sensor, spec.sensor),
    'images': (int(num_images), spec.num_images),
    'size': (size, (spec.size, spec.size)),
  }
  wrong = [f'{k} {got} (expected {want})' for k, (got, want) in found.items() if got != want]
  if wrong:
    return None, (
      f"{name} is named like PanCollection's but is not the paper's test set: "
      + ', '.join(str(w) for w in wrong)
    )
  return spec.published, ''


def match_rows(
  published: Published, names: Iterable[str]
) -> dict[str, tuple[str, Mapping[str, Cell]]]:
  """Pairs measured rows with published rows of the same method.

  Args:
    published: the table part.
    names: the measured rows (classical methods as `compare` names them, workdir names).

  Returns:
    measured row -> (the paper's method name, its cells), for the rows present in both.
  """
  by_key = {normalise(m): (m, row) for m, row in published.rows.items()}
  return {n: by_key[normalise(n)] for n in names if normalise(n) in by_key}


def row_name(name: str) -> str:
  """The table row of the published numbers beside measured row `name`."""
  return f'{name} (paper)'


def for_test_set(test_set, row_names: Sequence[str]) -> dict[str, Any]:
  """The `metrics.json` 'paper' entry of a test set: the published rows of its methods.

  Args:
    test_set: an open `eval_lib.TestSet` (file, protocol, sensor, shape, its config's source).
    row_names: the measured rows.

  Returns:
    {'applies': True, 'table', 'caption', 'rows': measured row -> {'method' (the paper's name),
    'mean', 'std', 'text' (metric key -> value / the paper's printed cell)}}; or
    {'applies': False, 'reason': one sentence}.
  """
  from_file = test_set.config.data.source == 'hdf5'
  published, reason = published_for(
    test_set.file if from_file else None,
    protocol=test_set.protocol,
    sensor=test_set.sensor,
    num_images=len(test_set),
    image_size=test_set.shape,
  )
  if published is None:
    return {'applies': False, 'reason': reason}
  matched = match_rows(published, row_names)
  if not matched:
    return {
      'applies': False,
      'reason': f'{published.table} has none of these methods (its rows: '
      f'{", ".join(published.rows)})',
    }
  rows = {
    name: {
      'method': method,
      'mean': {k: c.mean for k, c in cells.items()},
      'std': {k: c.std for k, c in cells.items()},
      'text': {k: c.text for k, c in cells.items()},
    }
    for name, (method, cells) in matched.items()
  }
  return {'applies': True, 'table': published.table, 'caption': published.caption, 'rows': rows}


def note(paper: Mapping[str, Any]) -> str:
  """The line under a table about the published rows (or why none apply)."""
  if not paper.get('applies'):
    return f'--paper: no published table applies: {paper["reason"]}.'
  return (
    f'"NAME (paper)": the paper\'s {paper["table"]} ({paper["caption"]}) as printed there; '
    'not measured here, never marked.'
  )
