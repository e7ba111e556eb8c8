"""The paper's comparison table: classical methods and trained networks on the same test sets.

`compare(test_files, ...)` runs every requested classical method (`u2net_jax.methods.METHODS`,
the benchmark toolbox's methods) and every trained workdir on every test set, scores them with the
protocol the data imply (`eval_lib.image_metrics`: reduced resolution with `gt`, full resolution
without) and writes, per test set, into `out_dir/<test set>/`:

  table.txt, table.md, table.tex, table.csv   methods as rows, mean ± std per metric (the best in
                          bold and the second underlined, as the paper marks them; `*x*` / `_x_` in
                          the text table), the seconds per image, and the ideal value per column
  metrics.json            means, stds, per-image values, run times and the marks, per method
  per_image.csv           one line per image and method (`reporting.csv_text`)
  <method>/output_mulExm_{k}.mat   `sr` (H x W x C, sensor scale): float64 and not clipped for
                          the classical methods, as the toolbox returns it; for networks what
                          `evaluate.py` writes (float32, [0, 1] output times the maximum)
  figure_{k}.png          every method's natural-colour output and its error map (one colour
                          scale for all error maps of the image)

The classical methods get the toolbox demos' arguments from the reference values as stored
(`sources.Source.reference`, float64): `lms` = the file's `lms` (the demos' `I_MS`), `pan`,
`ms_lr` = the file's `ms`. Networks run as `evaluate.py` runs them (`tiling.Fuser` with the
workdir's `config.eval`). Test sets are those of `evaluate.py --test_files`; the bare name
'demo' is the SYNTHETIC demo set (no download). With `paper=True` (`compare.py --paper`) the
paper's published rows (`paper_tables`) follow the measured rows of the same methods.

Over 600 lines because the four table formats, the figure and the loop are one output, kept
together so each format reads beside the others; the published numbers live in `paper_tables`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from u2net_jax import errors, methods
from u2net_jax.infer import eval_lib, paper_tables, reporting, tiling
from u2net_jax.io import fileio, naming
from u2net_jax.run import checkpointing, config_utils

CLASSICAL = tuple(methods.METHODS)  # In the registry's order (the paper's families).
DEMO = 'demo'  # The bare test-set name of the SYNTHETIC demo set.
# The best value of each metric (PSNR: higher is better without bound).
IDEAL = {
  'PSNR': math.inf,
  'Q2n': 1.0,
  'Q_avg': 1.0,
  'SAM': 0.0,
  'ERGAS': 0.0,
  'SCC': 1.0,
  'SSIM': 1.0,
  'D_lambda': 0.0,
  'D_s': 0.0,
  'QNR': 1.0,
  'D_lambda_K': 0.0,
  'HQNR': 1.0,
}
DIGITS = 4  # Decimals of the tables (marks are decided on the printed values).
TEX_NAMES = {
  'Q_avg': r'Q\_avg',
  'D_lambda': r'$D_\lambda$',
  'D_s': r'$D_s$',
  'D_lambda_K': r'$D_\lambda^{K}$',
}


# ---------------------------------------------------------------------------------------------
# Arguments.


def parse_methods(spec: str | Iterable[str] | None) -> list[str]:
  """`--methods`: names of `methods.METHODS` (any case), 'classical' (all) or 'none'.

  Returns:
    The method names (lower case, as registered), in the given order, without repeats.

  Raises:
    errors.OptionError: an unknown name.
  """
  items = spec.split(',') if isinstance(spec, str) else list(spec or [])
  out: list[str] = []
  for item in (i.strip().lower() for i in items):
    if not item or item == 'none':
      continue
    names = CLASSICAL if item == 'classical' else (item,)
    if item not in CLASSICAL and item != 'classical':
      raise errors.OptionError(
        f'--methods: unknown method {item!r}; expected classical, none or some of '
        f'{",".join(CLASSICAL)}'
      )
    out += [n for n in names if n not in out]
  return out


def parse_workdirs(spec: str | Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
  """`--workdirs`: 'name=path' items (the name is the table row and the output folder).

  Raises:
    errors.OptionError: an item without a name or path, a repeated name, or a name of a
      classical method or one that cannot be a folder.
  """
  if isinstance(spec, Mapping):
    items = [f'{k}={v}' for k, v in spec.items()]
  else:
    items = spec.split(',') if isinstance(spec, str) else list(spec or [])
  out: dict[str, str] = {}
  for item in (i.strip() for i in items):
    if not item:
      continue
    name, sep, path = (s.strip() for s in item.partition('='))
    if not sep or not name or not path:
      raise errors.OptionError(f'--workdirs: {item!r} is not name=path (e.g. u2net=workdirs/x)')
    if name.lower() in CLASSICAL or name in out or name.startswith('.') or '/' in name:
      raise errors.OptionError(
        f'--workdirs: the name {name!r} is taken or cannot be a folder name (a classical '
        'method, a repeat, or a path); choose another'
      )
    out[name] = path
  return out


def base_config(sensor: str) -> ml_collections.ConfigDict:
  """The config the test sets are read and scored with: `configs/default.py`'s evaluation
  settings for `sensor`, and the demo set (4 images of 128 x 128, as configs/demo.py) as 'demo'.

  Raises:
    config_utils.ConfigError: an unknown sensor.
  """
  from configs import default  # The repository's configs, as train.py reads them.

  config = default.get_config()
  config.data.sensor = sensor
  config.data.source = 'demo'
  config.data.test_files = {DEMO: 'demo'}
  config.data.demo_test_size = 128
  config.data.demo_num_test = 4
  return config_utils.finalize(config)


# ---------------------------------------------------------------------------------------------
# Networks.


@dataclass
class Network:
  """A trained workdir, restored: its row name, config, step and `tiling.Fuser`."""

  name: str
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  fuser: tiling.Fuser


def load_network(name: str, workdir: str | Path, mode: str | None = None) -> Network:
  """Restores a workdir's best checkpoint (else the latest) as `evaluate.py` does.

  Raises:
    FileNotFoundError: no config or checkpoint (`errors.CheckpointError`).
  """
  config = config_utils.load_config(workdir)
  params, step, _ = checkpointing.restore_params(workdir, config.model)
  fuser = tiling.Fuser(
    config.model,
    params,
    mode=mode or config.eval.mode,
    tile_size=config.eval.tile_size,
    tile_pad=config.eval.tile_pad,
    tile_batch=config.eval.tile_batch,
  )
  return Network(name, str(workdir), config, int(step), fuser)


# ---------------------------------------------------------------------------------------------
# Tables.


def _cell(mean: float, std: float) -> str:
  return f'{mean:.{DIGITS}f}±{std:.{DIGITS}f}'


def marks(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
  """The paper's marks: per metric, 'best' (bold) and 'second' (underlined) rows.

  Decided on the printed means (rows that print the same value share the mark); the closest to
  `IDEAL` wins (PSNR: the highest). NaN means are never marked.

  Args:
    rows: row -> {'mean': metric -> value}.

  Returns:
    row -> metric -> 'best' or 'second' (unmarked cells absent).
  """
  out: dict[str, dict[str, str]] = {r: {} for r in rows}
  keys = next(iter(rows.values()))['mean'] if rows else {}
  for key in keys:
    ideal = IDEAL.get(key)
    if ideal is None:
      continue
    shown = {r: round(float(v['mean'][key]), DIGITS) for r, v in rows.items()}
    distance = {
      r: (-x if math.isinf(ideal) else abs(x - ideal)) for r, x in shown.items() if math.isfinite(x)
    }
    levels = sorted(set(distance.values()))
    for r, d in distance.items():
      if d == levels[0]:
        out[r][key] = 'best'
      elif len(levels) > 1 and d == levels[1]:
        out[r][key] = 'second'
  return out


def _ideal_text(key: str, tex: bool = False) -> str:
  value = IDEAL.get(key)
  if value is None:
    return '-'
  if math.isinf(value):
    return r'$+\infty$' if tex else '+inf'
  return f'{value:g}'


def format_tables(result: Mapping[str, Any]) -> dict[str, str]:
  """The comparison table as text, Markdown, LaTeX and CSV.

  Args:
    result: the `metrics.json` contents (methods -> mean, std, seconds; marks; protocol...).

  Returns:
    'txt', 'md', 'tex', 'csv' -> the file's text.
  """
  rows = result['methods']
  keys = list(next(iter(rows.values()))['mean'])
  paper = (result.get('paper') or {}).get('rows', {})  # Measured row -> its published row.
  shown = reporting._display_names(result['protocol'], result['bands'])
  heads = [shown.get(k, k) for k in keys]
  mark = result['marks']
  time_head = 'Time (s)'
  what = f'{result["protocol"]} resolution'
  title = (
    f'{result["test_set"]}: {what}, {result["num_images"]} images '
    f'{result["image_size"][0]}x{result["image_size"][1]}, sensor {result["sensor"]}'
  )
  note = (
    reporting.NOTES[result['protocol']]
    .format(crop=result['crop'])
    .replace(' EXP = the upsampled MS (lms).', ' EXP = interp23tap of the MS.' * ('EXP' in rows))
  )
  if result.get('paper'):  # --paper: the published rows' legend, or why there are none.
    note += '\n' + paper_tables.note(result['paper'])

  def cells(style: str) -> list[list[str]]:
    wrap = {
      'txt': ('*{}*', '_{}_'),
      'md': ('**{}**', '<u>{}</u>'),
      'tex': (r'$\mathbf{{{}}}$', r'$\underline{{{}}}$'),
    }[style]
    table = []
    for name, row in rows.items():
      line = [name.replace('_', r'\_') if style == 'tex' else name]
      for key in keys:
        text = _cell(row['mean'][key], row['std'][key])
        if style == 'tex':
          text = text.replace('±', r'\pm')
        m = mark[name].get(key)
        line.append(
          wrap[0].format(text)
          if m == 'best'
          else wrap[1].format(text)
          if m == 'second'
          else (f'${text}$' if style == 'tex' else text)
        )
      line.append(f'{row["seconds"]["per_image"]:.3f}')
      table.append(line)
      if name in paper:  # The published row, as printed in the paper, never marked.
        shown = paper_tables.row_name(name)
        line = [shown.replace('_', r'\_') if style == 'tex' else shown]
        for key in keys:
          text = paper[name]['text'].get(key, '-')
          if style == 'tex' and text != '-':
            text = '$' + text.replace('±', r'\pm') + '$'
          line.append(text)
        table.append([*line, '-'])
    table.append(['Ideal value', *(_ideal_text(k, style == 'tex') for k in keys), '-'])
    return table

  # Text: aligned columns.
  body = [['Method', *heads, time_head], *cells('txt')]
  widths = [max(len(r[i]) for r in body) for i in range(len(body[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body]
  lines.insert(1, '  '.join('-' * w for w in widths))
  lines.insert(-1, '  '.join('-' * w for w in widths))
  legend = '*x*: best, _x_: second best (on the printed means). Time: seconds per image.'
  txt = f'{title}\n' + '\n'.join(lines) + f'\n{note}\n{legend}\n'

  md_rows = cells('md')
  md = [f'**{title}**', '', '| Method | ' + ' | '.join(heads) + f' | {time_head} |']
  md.append('|' + '---|' * (len(heads) + 2))
  md += ['| ' + ' | '.join(r) + ' |' for r in md_rows]
  md_text = '\n'.join(md) + f'\n\n{note} **Bold**: best, <u>underlined</u>: second best.\n'

  tex_heads = [TEX_NAMES.get(k, shown.get(k, k)) for k in keys]
  tex_rows = cells('tex')
  tex = [
    f'% {title}. Needs \\usepackage{{booktabs}}.',
    r'\begin{tabular}{l' + 'c' * len(keys) + 'r}',
    r'\toprule',
    'Method & ' + ' & '.join(tex_heads) + r' & Time (s) \\',
    r'\midrule',
    *(' & '.join(r) + r' \\' for r in tex_rows[:-1]),
    r'\midrule',
    ' & '.join(tex_rows[-1]) + r' \\',
    r'\bottomrule',
    r'\end{tabular}',
  ]

  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(
    ['method', 'kind', *(f'{k}_{s}' for k in keys for s in ('mean', 'std')), 'seconds_per_image']
  )
  for name, row in rows.items():
    values = [repr(float(row[s][k])) for k in keys for s in ('mean', 'std')]
    writer.writerow([name, row['kind'], *values, repr(float(row['seconds']['per_image']))])
    if name in paper:
      published = paper[name]
      values = [
        repr(published[s][k]) if k in published[s] else '' for k in keys for s in ('mean', 'std')
      ]
      writer.writerow([paper_tables.row_name(name), 'paper', *values, ''])
  return {'txt': txt, 'md': md_text, 'tex': '\n'.join(tex) + '\n', 'csv': buf.getvalue()}


# ---------------------------------------------------------------------------------------------
# Figures.


def _nice_ceiling(x: float) -> float:
  """The smallest of 1, 2, 5 x 10^k at or above `x` (a readable colour-bar top)."""
  if not x > 0 or not math.isfinite(x):
    return 0.1
  e = math.floor(math.log10(x))
  for m in (1, 2, 5, 10):
    if m * 10.0**e >= x * (1 - 1e-12):
      return m * 10.0**e
  return 10.0 ** (e + 1)


def figure(
  outputs: Mapping[str, np.ndarray],
  ref: Mapping[str, np.ndarray],
  *,
  rgb: Sequence[int],
  max_value: float,
  error_max: float | None = None,
  per_row: int = 6,
) -> tuple[np.ndarray, float]:
  """One image's comparison figure: each output in natural colour above its error map.

  The reference ('gt', else 'lms') sets one 2-98% stretch for every picture; the error maps
  (band mean of |out - gt| / max) share one colour scale, with its bar at the end of each row.

  Args:
    outputs: row name -> (H, W, C) on the sensor scale.
    ref: 'lms', 'guide' and optionally 'gt' (sensor scale).
    rgb: the natural-colour bands (`reporting.rgb_bands`).
    max_value: the sensor maximum.
    error_max: top of the error scale (fraction of the maximum); None: the 99th percentile
      of all error maps' pixels rounded up to 1, 2 or 5 x 10^k.
    per_row: pictures per row of the grid.

  Returns:
    ((H', W', 3) uint8, the error scale used).
  """
  has_gt = 'gt' in ref
  anchor = ref['gt'] if has_gt else ref['lms']
  limits = reporting.stretch_limits(anchor, rgb)
  cells = [('gt (reference)' if has_gt else 'lms (upsampled MS)', anchor, None)]
  errs = (
    {n: np.abs(o - ref['gt']).mean(axis=-1) / max_value for n, o in outputs.items()}
    if has_gt
    else {}
  )
  if error_max is None:
    # The 99th percentile of all error pixels together: the worst method does not wash out the rest.
    top = float(np.nanpercentile(np.stack(list(errs.values())), 99)) if errs else 0.0
    error_max = _nice_ceiling(top)
  cells += [(n, o, errs.get(n)) for n, o in outputs.items()]
  h, w = anchor.shape[:2]
  zoom = max(1, math.ceil(reporting.PANEL_MIN_HEIGHT / h))
  font = reporting.load_font()
  gap, line, bar = reporting._GAP, reporting._FONT_SIZE + 6, reporting._BAR_WIDTH
  ticks = [0.0, error_max / 2, error_max]
  labels = [f'{t:.3g}' for t in ticks]
  cw = max(w * zoom, *(int(font.getlength(c[0])) + 2 for c in cells))
  ch = line + h * zoom + ((gap + h * zoom) if has_gt else 0)
  n_rows = -(-len(cells) // per_row)
  bar_w = (gap + bar + 4 + max(int(font.getlength(t)) for t in labels)) if has_gt else 0
  width = gap + min(len(cells), per_row) * (cw + gap) + bar_w
  height = gap + n_rows * (ch + gap) + line
  canvas = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(canvas)
  for i, (name, image, err) in enumerate(cells):
    x = gap + (i % per_row) * (cw + gap)
    y = gap + (i // per_row) * (ch + gap)
    draw.text((x, y), name, fill='black', font=font)
    picture = reporting.composite(image, rgb, limits)
    size = (w * zoom, h * zoom)
    canvas.paste(Image.fromarray(picture).resize(size, Image.Resampling.NEAREST), (x, y + line))
    if err is not None:
      e = Image.fromarray(reporting.colormap(err, error_max)).resize(size, Image.Resampling.NEAREST)
      canvas.paste(e, (x, y + line + h * zoom + gap))
    if has_gt and (i % per_row == per_row - 1 or i == len(cells) - 1):
      bx = gap + min(len(cells), per_row) * (cw + gap)
      top = y + line + h * zoom + gap
      reporting.colour_bar(canvas, draw, bx, top, h * zoom, ticks, labels, error_max, font)
  note = 'One 2-98% stretch (of the reference) for all pictures'
  note += '; below each output |out - gt| / max (band mean), one colour scale.' if has_gt else '.'
  draw.text((gap, height - line), note, fill='dimgray', font=font)
  return np.asarray(canvas), float(error_max)


# ---------------------------------------------------------------------------------------------
# The comparison.


def _row_name(method: str) -> str:
  return method.upper()  # The paper's spelling: 'MTF-GLP-HPM-R'.


def _check_network(network: Network, test_set: eval_lib.TestSet) -> None:
  """The network fits the test set's data (bands, maximum, ratio), or DataError."""
  where = f'--workdirs {network.name} on test set {test_set.name!r}'
  eval_lib.resolve_sensor(network.config, test_set.sensor, file_sensor=None, where=where)
  if network.config.model.scale != test_set.config.model.scale:
    raise eval_lib.DataError(
      f'{where}: the network fuses at ratio {network.config.model.scale}, the data have '
      f'{test_set.config.model.scale}'
    )


def compare_test_set(
  test_set: eval_lib.TestSet,
  method_names: Sequence[str],
  networks: Sequence[Network],
  out_dir: Path,
  *,
  error_max: float | None = None,
  paper: bool = False,
  verbose: bool = True,
) -> dict[str, Any]:
  """Runs, scores and saves every method on one test set into `out_dir/<name>` (atomically).

  Args:
    test_set: an open pansharpening test set ('reduced' or 'full' protocol).
    method_names: classical methods (`methods.METHODS` keys).
    networks: restored workdirs.
    out_dir: the output root.
    error_max: the figures' error scale (fraction of the maximum); None: per image, automatic.
    paper: add the paper's published rows (`paper_tables.for_test_set`) when the test set is
      the paper's.
    verbose: print the table.

  Returns:
    The `metrics.json` contents plus 'table' (the text table) and 'dir'.
  """
  if test_set.protocol not in ('reduced', 'full'):
    raise eval_lib.DataError(
      f'test set {test_set.name!r}: the comparison is for pansharpening (got {test_set.protocol})'
    )
  for network in networks:
    _check_network(network, test_set)
  logging.info('comparing on %s (%s, %d images, %s)', *test_set.describe())
  cfg = test_set.config
  max_value, ratio, sensor = float(cfg.data.max_value), int(cfg.model.scale), test_set.sensor
  rgb = reporting.rgb_bands(cfg.model.spectral_bands, sensor)
  n = len(test_set)
  rows: dict[str, dict[str, Any]] = {}
  final = naming.output_path(out_dir, test_set=test_set.name)
  with fileio.atomic_dir(final) as folder:
    refs = [test_set.source.reference(k, test_set.source.example(k)) for k in range(n)]
    outputs: list[dict[str, np.ndarray]] = [{} for _ in range(n)]

    def record(name, kind, folder_name, k, out, seconds, **extra):
      row = rows.setdefault(
        name, dict(kind=kind, dir=folder_name, per_image=[], seconds_per_image=[], **extra)
      )
      row['per_image'].append(eval_lib.image_metrics(test_set, refs[k], out.astype(np.float64)))
      row['seconds_per_image'].append(seconds)
      method_dir = naming.output_path(folder, method=folder_name)
      method_dir.mkdir(exist_ok=True)
      reporting.save_output(method_dir, k, out)
      outputs[k][name] = out

    for name in method_names:
      fn = methods.METHODS[name]
      for k, ref in enumerate(refs):
        start = time.perf_counter()
        out = fn(ref['lms'], ref['guide'][..., 0], ref['ms'], sensor=sensor, ratio=ratio)
        record(_row_name(name), 'classical', name, k, out, time.perf_counter() - start)
    for network in networks:
      start = time.perf_counter()
      for k, (_, fused) in enumerate(network.fuser.fuse_all(test_set.source)):
        sr = np.asarray(fused, np.float32) * np.float32(max_value)  # As evaluate.py writes it.
        now = time.perf_counter()  # Includes the first call's compilation, as a user waits.
        record(
          network.name,
          'network',
          network.name,
          k,
          sr,
          now - start,
          workdir=network.workdir,
          step=network.step,
          mode=network.fuser.mode,
        )
        start = time.perf_counter()
    scales = []
    for k in range(n):
      picture, scale = figure(
        outputs[k], refs[k], rgb=rgb, max_value=max_value, error_max=error_max
      )
      Image.fromarray(picture).save(naming.output_path(folder, 'figure', index=k), format='PNG')
      scales.append(scale)
      outputs[k] = {}
    for row in rows.values():
      row.update(reporting.summarize(row.pop('per_image')))
      per = row.pop('seconds_per_image')
      row['seconds'] = {'total': float(sum(per)), 'per_image': float(sum(per) / n)}
      row['seconds_each_image'] = per
    result = {
      'test_set': test_set.name,
      'file': str(test_set.file),
      'protocol': test_set.protocol,
      'sensor': sensor,
      'max_value': max_value,
      'bands': int(cfg.model.spectral_bands),
      'ratio': ratio,
      'num_images': n,
      'image_size': [int(s) for s in test_set.shape],
      'crop': int(cfg.eval.crop) if test_set.protocol == 'reduced' else 0,
      'methods': rows,
      'marks': marks(rows),
      'ideal': {k: _ideal_text(k) for k in next(iter(rows.values()))['mean']},
      'figure_error_max': scales,
    }
    if paper:
      result['paper'] = paper_tables.for_test_set(test_set, list(rows))
    tables = format_tables(result)
    for ext, text in tables.items():
      naming.output_path(folder, 'table', ext=ext).write_text(text, encoding='utf-8')
    metrics_text = json.dumps(result, indent=2) + '\n'
    naming.output_path(folder, 'metrics').write_text(metrics_text, encoding='utf-8')
    naming.output_path(folder, 'per_image').write_text(reporting.csv_text(rows), encoding='utf-8')
  if verbose:
    print(tables['txt'], flush=True)
  return dict(result, table=tables['txt'], dir=str(final))


def compare(
  test_files=DEMO,
  *,
  out_dir: str | Path,
  sensor: str | None = None,
  method_names: str | Iterable[str] | None = 'classical',
  workdirs: str | Mapping[str, str] | None = None,
  mode: str | None = None,
  error_max: float | None = None,
  paper: bool = False,
  config: ml_collections.ConfigDict | None = None,
  verbose: bool = True,
) -> dict[str, dict[str, Any]]:
  """Runs classical methods and trained networks on test sets; writes the comparison tables.

  Args:
    test_files: `eval_lib.parse_test_files` input: HDF5 paths, name=path pairs, or 'demo'.
    out_dir: each test set goes to `out_dir/<name>/`.
    sensor: the data's sensor (MTF gains, bands, maximum); default: the first workdir's, else
      WV3 (the demo's).
    method_names: `parse_methods` input ('classical', 'none', or names).
    workdirs: `parse_workdirs` input (name=path pairs or a dict).
    mode: network inference ('auto', 'tiled', 'whole'); default each workdir's config.eval.mode.
    error_max: the figures' error scale (fraction of the maximum); None: automatic per image.
    paper: print and write the paper's published rows (Tables 1-2) beside the measured ones
      when a test set is one of the paper's PanCollection files; else say why in one line.
    config: the base config (default `base_config(sensor)`; tests shrink the demo set).
    verbose: print each table.

  Returns:
    test set name -> its `metrics.json` contents plus 'table' and 'dir'.

  Raises:
    errors.OptionError: bad methods, workdirs or nothing to compare.
    DataError: a test set is missing or does not fit a network.
    FileNotFoundError: a workdir without config or checkpoint.
  """
  names = parse_methods(method_names)
  dirs = parse_workdirs(workdirs)
  if not names and not dirs:
    raise errors.OptionError('nothing to compare: --methods=none and no --workdirs')
  if mode is not None and mode not in tiling.MODES:
    raise errors.OptionError(f'--mode must be one of {tiling.MODES}, got {mode!r}')
  if error_max is not None and not error_max > 0:
    raise errors.OptionError(f'--error_max must be > 0, got {error_max}')
  out_dir = reporting.prepare_output_root(out_dir)
  networks = [load_network(name, path, mode) for name, path in dirs.items()]
  if config is None:
    config = base_config(sensor or (networks[0].config.data.sensor if networks else 'WV3'))
  results = {}
  with contextlib.ExitStack() as stack:
    test_sets = eval_lib.select_test_sets(config, test_files or DEMO, sensor)
    for test_set in test_sets:
      stack.callback(test_set.close)
    for test_set in test_sets:
      results[test_set.name] = compare_test_set(
        test_set, names, networks, out_dir, error_max=error_max, paper=paper, verbose=verbose
      )
  return results
