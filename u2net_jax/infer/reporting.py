"""What an evaluation writes: tables, CSV/JSON, the official `.mat` outputs and PNG previews.

Per test set, into one folder (`eval_lib` makes it atomically with `fileio.atomic_dir`):

  table.txt               mean ± std per metric, the fused images and the upsampled MS ('EXP',
                          the `lms` baseline of the paper's tables)
  metrics.json            means, stds and per-image values of both rows, plus provenance
  per_image.csv           one line per image and row
  output_mulExm_{k}.mat   `sr`, H x W x C on the sensor scale, as the official `test.py` saves it
                          (k from 0), so the MATLAB toolbox can re-check the numbers
  preview_{k}_*.png       natural-colour composites of lms / fused / gt and the guide, the
                          absolute error map, and all of them side by side (`preview_{k}.png`:
                          each picture titled, the error map with its colour bar and scale)

The natural-colour bands come from the sensor table (`toolbox.get_sensor(...)['rgb_bands']`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image, ImageDraw, ImageFont

from u2net_jax import metrics, toolbox
from u2net_jax.io import fileio, naming

STRETCH_PERCENTILES = (2.0, 98.0)
NOTES = {
  'reduced': 'PSNR on the whole image; the others on the image cropped by {crop} px '
  '(config.eval.crop). EXP = the upsampled MS (lms).',
  'full': "HQNR is the paper's 'QNR' column (QNR: the classic D_lambda). EXP = the upsampled MS "
  '(lms).',
  'hisr': 'EXP = the upsampled HSI (lms).',
}


def prepare_output_root(path: str | Path) -> Path:
  """Creates the evaluation's output folder and proves it writable before any work is done.

  Raises:
    fileio.OutputError: the folder cannot be created or written.
  """
  return fileio.ensure_writable_dir(path, 'evaluation output folder')


# ---------------------------------------------------------------------------------------------
# Tables and files.


def _display_names(protocol: str, bands: int) -> dict[str, str]:
  if protocol == 'reduced':
    return {'Q2n': f'Q{2 ** math.ceil(math.log2(bands))}'}  # Q8 / Q4 as the tables call it.
  return {}


def format_report(result: Mapping[str, Any]) -> str:
  """The printed table of one test set: a title line, mean ± std per metric, notes.

  Args:
    result: the `metrics.json` contents (test_set, protocol, num_images, image_size, sensor,
      step, mode, bands, crop, and methods -> {'mean', 'std'}).

  Returns:
    The table text, ending with a newline.
  """
  names = _display_names(result['protocol'], result['bands'])
  rows = {
    method: {names.get(k, k): (agg['mean'][k], agg['std'][k]) for k in agg['mean']}
    for method, agg in result['methods'].items()
  }
  what = 'HISR' if result['protocol'] == 'hisr' else f'{result["protocol"]} resolution'
  title = (
    f'{result["test_set"]}: {what}, {result["num_images"]} images '
    f'{result["image_size"][0]}x{result["image_size"][1]}, sensor {result["sensor"]}, '
    f'step {result["step"]}, {result["mode"]} inference'
  )
  notes = NOTES[result['protocol']].format(crop=result['crop'])
  return f'{title}\n{metrics.format_table(rows)}\n{notes}\n'


def summarize(per_image: Sequence[Mapping[str, float]]) -> dict[str, Any]:
  """One row of the table: {'mean', 'std', 'per_image'} over the images (`metrics.aggregate`).

  Args:
    per_image: one metrics dict per image.
  """
  agg = metrics.aggregate(per_image)
  return {
    'mean': {k: v[0] for k, v in agg.items()},
    'std': {k: v[1] for k, v in agg.items()},
    'per_image': list(per_image),
  }


def csv_text(methods: Mapping[str, Mapping[str, Any]]) -> str:
  """`per_image.csv`: a header 'image,method,<metrics>', then one line per image and method.

  Args:
    methods: method -> {'per_image': [metrics dict per image]} (the `metrics.json` 'methods').
  """
  per_image = {m: v['per_image'] for m, v in methods.items()}
  first = next(iter(per_image.values()))
  keys = list(first[0])
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['image', 'method', *keys])
  for k in range(len(first)):
    for method, rows in per_image.items():
      # repr keeps every digit: the CSV gives back the JSON's floats exactly.
      writer.writerow([k, method, *(repr(float(rows[k][m])) for m in keys)])
  return buf.getvalue()


def write_summary(folder: str | Path, result: Mapping[str, Any]) -> str:
  """Writes `table.txt`, `metrics.json` and `per_image.csv` of one test set into `folder`.

  Args:
    folder: an existing folder (the temporary folder of `fileio.atomic_dir`).
    result: the `metrics.json` contents ('methods' as `summarize` makes them).

  Returns:
    The table (`format_report`).
  """
  folder = Path(folder)
  table = format_report(result)
  naming.output_path(folder, 'table', ext='txt').write_text(table, encoding='utf-8')
  naming.output_path(folder, 'metrics').write_text(
    json.dumps(result, indent=2) + '\n', encoding='utf-8'
  )
  naming.output_path(folder, 'per_image').write_text(csv_text(result['methods']), encoding='utf-8')
  return table


def write_image(
  folder: str | Path,
  index: int,
  fused: np.ndarray,
  ref: Mapping[str, np.ndarray],
  *,
  rgb: Sequence[int],
  max_value: float,
  error_max: float,
) -> None:
  """Writes `output_mulExm_{index}.mat` (as test.py) and the PNG previews of one image.

  Args:
    folder: an existing folder.
    index: the image's index k in the test set.
    fused: (H, W, C) float32 on the sensor scale (the `.mat` keeps this dtype, as test.py).
    ref: roles on the sensor scale ('lms', 'guide', and 'gt' when there is one).
    rgb: the natural-colour bands (`rgb_bands`).
    max_value: the sensor maximum.
    error_max: top of the error map's colour scale, as a fraction of `max_value`.
  """
  folder = Path(folder)
  save_output(folder, index, fused)
  pictures = previews(fused, ref, rgb=rgb, max_value=max_value, error_max=error_max)
  for what, picture in pictures.items():
    path = (
      naming.output_path(folder, 'preview', index=index)
      if what == 'panel'
      else naming.output_path(folder, 'preview_part', index=index, part=what)
    )
    Image.fromarray(picture).save(path, format='PNG')


def save_output(folder: str | Path, index: int, fused: np.ndarray) -> None:
  """Writes `output_mulExm_{index}.mat` with `sr` = `fused` (H x W x C), its dtype kept."""
  scipy.io.savemat(naming.output_path(folder, 'fused', index=index), {'sr': fused})


# ---------------------------------------------------------------------------------------------
# Pictures.


def rgb_bands(bands: int, sensor: str | None = None) -> tuple[int, ...]:
  """The bands shown as red, green, blue (0-based; one grey band below three bands).

  Args:
    bands: the image's band count.
    sensor: the sensor whose table entry names its natural-colour bands.

  Returns:
    The sensor's 'rgb_bands' when it has `bands` bands; else three bands spread over the
    spectrum (ascending wavelength assumed) or (0,) below three bands.
  """
  info = _sensor_info(sensor)
  if info is not None and info['bands'] == bands and info.get('rgb_bands'):
    return tuple(info['rgb_bands'])
  if bands < 3:
    return (0,)
  return (3 * bands // 4, bands // 2, bands // 4)


def _sensor_info(sensor: str | None) -> dict | None:
  if sensor is None:
    return None
  try:
    return toolbox.get_sensor(sensor)
  except ValueError:  # A dataset outside the table: a generic choice.
    return None


def stretch_limits(image: np.ndarray, bands: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Per-band 2% and 98% percentiles of `image` (H, W, C) over the chosen bands."""
  sel = image[..., list(bands)].reshape(-1, len(bands))
  lo, hi = np.percentile(sel, STRETCH_PERCENTILES, axis=0)
  return lo, np.maximum(hi, lo + 1e-12)


def composite(image: np.ndarray, bands: Sequence[int], limits) -> np.ndarray:
  """(H, W, C) -> (H, W, 3) uint8: the chosen bands linearly stretched between `limits`."""
  lo, hi = limits
  x = (image[..., list(bands)] - lo) / (hi - lo)
  x = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def colormap(values: np.ndarray, vmax: float) -> np.ndarray:
  """(H, W) -> (H, W, 3) uint8 with a jet-like colour map on [0, vmax] (dark blue to red)."""
  t = np.clip(values / vmax, 0.0, 1.0)
  rgb = np.stack([np.clip(1.5 - np.abs(4.0 * t - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], -1)
  return np.round(rgb * 255.0).astype(np.uint8)


def previews(
  fused: np.ndarray,
  ref: Mapping[str, np.ndarray],
  *,
  rgb: Sequence[int],
  max_value: float,
  error_max: float,
) -> dict[str, np.ndarray]:
  """The preview images of one example (all on the sensor scale).

  The same stretch (2%-98% of the reference, or of `lms` without one) is used for lms, fused and
  gt so that they compare. The error map is the mean over bands of |fused - gt| / max_value on a
  colour scale from 0 to `error_max`.

  Args:
    fused: (H, W, C) estimate.
    ref: 'lms', 'guide' and optionally 'gt'.
    rgb: the bands shown as red, green, blue (`rgb_bands`).
    max_value: the sensor maximum.
    error_max: top of the error colour scale, as a fraction of `max_value`.

  Returns:
    name -> (H, W, 3) uint8: 'lms', 'fused', 'gt' and 'error' (with a reference), 'guide', and
    'panel' (all side by side, 4-pixel white gaps).
  """
  anchor = ref['gt'] if 'gt' in ref else ref['lms']
  limits = stretch_limits(anchor, rgb)
  out = {'lms': composite(ref['lms'], rgb, limits), 'fused': composite(fused, rgb, limits)}
  if 'gt' in ref:
    out['gt'] = composite(ref['gt'], rgb, limits)
    err = np.abs(fused - ref['gt']).mean(axis=-1) / max_value
    out['error'] = colormap(err, error_max)
  guide = ref['guide']
  g_bands = (0, 1, 2) if guide.shape[-1] >= 3 else (0,)
  out['guide'] = composite(guide, g_bands, stretch_limits(guide, g_bands))
  out['panel'] = panel(
    out, error_max=error_max, guide_name='PAN' if guide.shape[-1] == 1 else 'RGB'
  )
  return out


# The panel: every picture titled, the error map with a colour bar.
PANEL_MIN_HEIGHT = 128  # Small pictures are enlarged (nearest neighbour) so the titles fit.
_GAP, _BAR_WIDTH, _FONT_SIZE = 6, 10, 12


def load_font(size: int = _FONT_SIZE):
  try:
    return ImageFont.load_default(size=size)  # A scalable font (Pillow >= 10.1).
  except TypeError:  # Older Pillow: the fixed bitmap font.
    return ImageFont.load_default()


def panel(
  pictures: Mapping[str, np.ndarray], *, error_max: float, guide_name: str = 'guide'
) -> np.ndarray:
  """lms, fused, gt, error and guide side by side, titled, the error map with its colour bar.

  Args:
    pictures: name -> (H, W, 3) uint8, as `previews` makes them ('gt' and 'error' optional).
    error_max: the top of the error map's colour scale (fraction of the sensor maximum).
    guide_name: what the guide is ('PAN' or 'RGB').

  Returns:
    (H', W', 3) uint8 on a white background.
  """
  titles = {
    'lms': 'lms (upsampled MS)',
    'fused': 'fused (U2Net)',
    'gt': 'gt (reference)',
    'error': '|fused - gt| / max',
    'guide': f'guide ({guide_name})',
  }
  names = [k for k in titles if k in pictures]
  h, w = pictures[names[0]].shape[:2]
  zoom = max(1, math.ceil(PANEL_MIN_HEIGHT / h))
  font = load_font()
  line = _FONT_SIZE + 6
  ticks = [0.0, error_max / 2, error_max]
  tick_text = [f'{t:.3g}' for t in ticks]
  bar_extra = _GAP + _BAR_WIDTH + 4 + max(int(font.getlength(t)) for t in tick_text)
  cell_w = w * zoom
  widths = [max(cell_w, int(font.getlength(titles[k])) + 2) for k in names]
  widths = [wd + (bar_extra if k == 'error' else 0) for k, wd in zip(names, widths, strict=True)]
  note = (
    'lms, fused and gt share one 2-98% stretch (of gt); the error is the band mean.'
    if 'gt' in pictures
    else 'lms and fused share one 2-98% stretch (of lms).'
  )
  total_w = max(sum(widths) + _GAP * (len(names) + 1), int(font.getlength(note)) + 2 * _GAP)
  total_h = _GAP + line + h * zoom + line + _GAP
  canvas = Image.new('RGB', (total_w, total_h), 'white')
  draw = ImageDraw.Draw(canvas)
  x, top = _GAP, _GAP + line
  for name, width in zip(names, widths, strict=True):
    draw.text((x, _GAP), titles[name], fill='black', font=font)
    picture = Image.fromarray(pictures[name]).resize((cell_w, h * zoom), Image.Resampling.NEAREST)
    canvas.paste(picture, (x, top))
    if name == 'error':
      colour_bar(canvas, draw, x + cell_w + _GAP, top, h * zoom, ticks, tick_text, error_max, font)
    x += width + _GAP
  draw.text((_GAP, top + h * zoom + 3), note, fill='dimgray', font=font)
  return np.asarray(canvas)


def colour_bar(
  canvas, draw, x: int, top: int, height: int, ticks, labels, vmax: float, font
) -> None:
  """A vertical colour bar (`colormap` from 0 at the bottom to `vmax` at the top) with ticks."""
  values = np.linspace(vmax, 0.0, height)[:, None].repeat(_BAR_WIDTH, axis=1)
  canvas.paste(Image.fromarray(colormap(values, vmax)), (x, top))
  draw.rectangle((x, top, x + _BAR_WIDTH - 1, top + height - 1), outline='black')
  for value, label in zip(ticks, labels, strict=True):
    y = top + round((1.0 - value / vmax) * (height - 1))
    draw.line((x + _BAR_WIDTH, y, x + _BAR_WIDTH + 3, y), fill='black')
    text_y = min(max(y - _FONT_SIZE // 2 - 1, top - 2), top + height - _FONT_SIZE - 1)
    draw.text((x + _BAR_WIDTH + 5, text_y), label, fill='black', font=font)
