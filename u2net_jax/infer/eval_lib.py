"""Evaluation: the paper's protocols on a workdir's checkpoint.

`evaluate(config, workdir)` restores the best (or a given) checkpoint of a workdir -- a training
run or official weights converted by `python -m u2net_jax.convert` -- fuses every image of each
test set (`tiling.Fuser`: the official tiled `test.py` procedure by default) and writes, per test
set, into `workdir/eval/<test set>/` the table, JSON, CSV, `.mat` files and PNG previews that
`u2net_jax.infer.reporting` describes. The table is also printed.

Protocols (`u2net_jax.metrics`, the conventions of `../shared/metrics/README.md`), chosen per test
set from the task and the data:
  'reduced' (pansharpening, the file has `gt`): PSNR, Q2n (Q8 / Q4), Q_avg, SAM, ERGAS, SCC;
  'full' (pansharpening, no `gt`): D_lambda, D_s, QNR, D_lambda_K and HQNR (the paper's "QNR");
  'hisr': PSNR, SSIM, SAM, ERGAS.
Two rows are scored: the fused image ('U2Net') as test.py saves it (the [0, 1] output times the
sensor maximum, float32), and the upsampled MS ('EXP', the `lms` baseline of the paper's tables).

Sensor policy (`resolve_sensor`): the sensor table (`toolbox.get_sensor`) is the single source of
bands, maximum and MTF gains; `--sensor` evaluates another sensor's data with its conventions
(the paper's generalisation test: WV2 files through a WV3 model) when they fit the model.

Test sets (`TestSet`) are opened and validated before anything runs; their data come through the
data layer's one interface, `data.sources.Source` (HDF5 files, toolbox `.mat` images, demo data,
TFDS splits, any registered reader): one open handle for the whole evaluation, the examples in
[0, 1] for the network, and the reference arrays on the sensor scale (read back from the file when
there is one: the toolbox sees the file's values).

A failed run leaves no half-written results: each test set's folder is written whole or not at
all (`fileio.atomic_dir`; an earlier result stays until the new one is complete).

The protocols, the sensor policy and the test sets are the evaluation's own concerns; the data
are `data.sources`, inference is `tiling` and every output `reporting`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from u2net_jax import metrics, toolbox
from u2net_jax.data import DataError, sources
from u2net_jax.infer import reporting, tiling
from u2net_jax.io import fileio, naming
from u2net_jax.run import checkpointing, config_utils, distributed

MODES = tiling.MODES
METHOD, BASELINE = 'U2Net', 'EXP'  # Row names: the fused images and the upsampled MS (`lms`).


# ---------------------------------------------------------------------------------------------
# Test-set sources.


def open_source(config, split: str) -> sources.Source:
  """The `sources.Source` of a test set of `config` (the data layer's one entry).

  Raises:
    DataError: the data are missing or do not match the config.
  """
  return sources.open_source(sources.spec_from_config(config, split))


# ---------------------------------------------------------------------------------------------
# Sensor policy.


def _canonical_sensor(name: str) -> str:
  try:
    return toolbox.get_sensor(name)['name']
  except ValueError:
    return str(name).strip()


def resolve_sensor(config, sensor: str | None, *, file_sensor: str | None, where: str) -> str:
  """The sensor whose conventions (MTF gains, RGB bands) are used for one test set.

  Args:
    config: the workdir's config (`config.data.sensor`: the model's sensor).
    sensor: the `--sensor` override (e.g. WV2 data through a WV3 model, the paper's
      generalisation test) or None.
    file_sensor: the test file's `sensor` attribute, if it has one.
    where: the test set and file, for messages.

  Returns:
    The canonical sensor name.

  Raises:
    DataError: an unknown pansharpening sensor (its MTF gains are needed), a sensor whose band
      count or maximum differs from the model's, or a file that says it comes from another
      sensor.
  """
  used = _canonical_sensor(sensor or config.data.sensor)
  try:
    info = toolbox.get_sensor(used)
  except ValueError as e:
    if config.task != 'hisr':  # HISR metrics need nothing from the table.
      raise DataError(f'{where}: {e}') from e
    info = None
  if info is not None:
    for field, key in (('spectral_bands', 'bands'), ('guide_bands', 'guide_bands')):
      if info[key] != config.model[field]:
        raise DataError(
          f'{where}: sensor {used} has {info[key]} {key.replace("_", " ")} but the model has '
          f'{field}={config.model[field]} (config.data.sensor = {config.data.sensor})'
        )
    if float(info['max_value']) != float(config.data.max_value):
      raise DataError(
        f'{where}: sensor {used} is on a 0..{info["max_value"]:g} scale but the model uses '
        f'config.data.max_value = {config.data.max_value:g}'
      )
  if file_sensor is not None and _canonical_sensor(file_sensor) != used:
    raise DataError(
      f"{where}: the file's sensor attribute is {file_sensor!r} but the evaluation uses sensor "
      f'{used!r} (the model is for {config.data.sensor}); pass --sensor {file_sensor} to '
      'evaluate it with its own MTF gains'
    )
  if used != _canonical_sensor(config.data.sensor):
    logging.warning(
      '%s: the model was configured for %s; evaluating %s data with %s conventions '
      '(generalisation test)',
      where,
      config.data.sensor,
      used,
      used,
    )
  return used


# ---------------------------------------------------------------------------------------------
# Test sets.


def _is_path(item: str) -> bool:
  """A plain path (a reader's suffix, a folder part or an existing file), not a test-set name."""
  return (
    item.lower().endswith(sources.suffixes())
    or '/' in item
    or os.sep in item
    or Path(item).is_file()
  )


def parse_test_files(spec: str | Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
  """Parses `--test_files`: HDF5 paths, 'name=path.h5' pairs and bare test-set names.

  A plain path `dir/test_wv3.h5` is named by its file stem (`test_wv3`, the folder under
  `workdir/eval`); `name=path` names it explicitly; a bare name (no '=', no HDF5 suffix, no folder)
  is a test set of the config, or a TFDS split when `config.data.source == 'tfds'`.

  Args:
    spec: 'a.h5,b.h5', 'name=path.h5,...', a list of such items, or a dict name -> path.

  Returns:
    name -> path ('' for a bare name), in order.

  Raises:
    ValueError: an empty path, or two items with the same name (the message says how to name
      them apart).
  """
  if not spec:
    return {}
  if isinstance(spec, Mapping):
    return {str(k): str(v) for k, v in spec.items()}
  items = spec.split(',') if isinstance(spec, str) else list(spec)
  out: dict[str, str] = {}
  given: dict[str, str] = {}  # name -> the item that gave it, for the clash message.
  for item in (i.strip() for i in items):
    if not item:
      continue
    name, sep, path = item.partition('=')
    name, path = name.strip(), path.strip()
    if sep and not path:
      raise config_utils.ConfigError(
        f'--test_files: {item!r} has an empty path (expected name=path.h5)'
      )
    if not sep and _is_path(item):
      name, path = Path(item).stem, item
    if name in out:
      raise config_utils.ConfigError(
        f'--test_files: {given[name]!r} and {item!r} are both named {name!r} (results go to '
        f'eval/{name}); name them apart with name=path, e.g. '
        f'--test_files={name}_1={out[name] or name},{name}_2={path or name}'
      )
    out[name], given[name] = path, item
  return out


def _check_name(name: str) -> None:
  if not name or name.startswith('.') or '/' in name or os.sep in name or name != name.strip():
    raise config_utils.ConfigError(
      f'test set name {name!r} cannot be a folder name under workdir/eval'
    )


class TestSet:
  """One test set: its source, protocol and sensor (validated before any inference).

  Attributes:
    name: the test set's name (its output folder).
    config: the config with this test set's data settings.
    source: its `sources.Source` (open until `close`).
    file: where the data come from.
    sensor: the canonical sensor whose conventions are used.
    protocol: 'reduced', 'full' or 'hisr'.
    shape: (H, W) of the images.
  """

  __test__ = False  # Not a pytest class.

  def __init__(self, config, name: str, path: str, sensor: str | None):
    _check_name(name)
    self.name = name
    self.config = _test_set_config(config, name, path)
    self.source = open_source(self.config, name)
    try:
      self._validate(config, path, sensor)
    except BaseException:
      self.source.close()
      raise

  def _validate(self, config, path: str, sensor: str | None) -> None:
    self.file = self.source.file or path or self.config.data.test_files.get(self.name, '')
    where = f'test set {self.name!r} ({self.file or self.config.data.source})'
    if not len(self.source):
      raise DataError(f'{where}: no examples')
    self.sensor = resolve_sensor(config, sensor, file_sensor=self.source.sensor, where=where)
    first = self.source.example(0)
    has_gt = 'gt' in first
    self.protocol = 'hisr' if config.task == 'hisr' else 'reduced' if has_gt else 'full'
    if self.protocol == 'hisr' and not has_gt:
      raise DataError(f'{where}: HISR evaluation needs the reference (role gt)')
    self.shape = first['guide'].shape[:2]
    h, w = self.shape
    block, crop = config.eval.block, config.eval.crop
    if self.protocol == 'full' and (h % block or w % block):
      raise DataError(
        f'{where}: {h}x{w} images; full-resolution metrics need multiples of '
        f'config.eval.block = {block}'
      )
    if self.protocol == 'reduced' and min(h, w) - 2 * crop + 1 < block:
      raise DataError(
        f'{where}: {h}x{w} images cropped by config.eval.crop = {crop} are smaller than '
        f'config.eval.block = {block}'
      )

  def __len__(self) -> int:
    return len(self.source)

  def describe(self) -> tuple[str, str, int, str]:
    """(name, file, number of images, protocol), for logs."""
    return self.name, self.file, len(self), self.protocol

  def close(self) -> None:
    self.source.close()


def _test_set_config(config, name: str, path: str):
  """The config whose data section reads test set `name` (a file given on the command line, a
  configured test set, or any TFDS split)."""
  cfg = copy.deepcopy(config)
  if path:
    with cfg.unlocked():
      cfg.data.source = 'hdf5'
      cfg.data.test_files = {name: path}
  elif name not in config.data.test_files:
    if config.data.source != 'tfds':
      raise DataError(
        f'unknown test set {name!r}: the config has {sorted(config.data.test_files.keys())}; '
        'give a file as path.h5 or name=path.h5'
      )
    with cfg.unlocked():
      cfg.data.test_files[name] = ''
  return cfg


def select_test_sets(config, test_files=None, sensor: str | None = None) -> list[TestSet]:
  """Opens and validates every test set before anything runs (close them with `close`).

  Args:
    config: the workdir's config.
    test_files: `parse_test_files` input; None or empty: every test set of the config.
    sensor: the `--sensor` override.

  Raises:
    DataError: no test sets, or one that is missing or does not match the model.
  """
  spec = parse_test_files(test_files) or {k: '' for k in config.data.test_files.keys()}
  if not spec:
    raise DataError('no test sets: config.data.test_files is empty and none were given')
  opened: list[TestSet] = []
  try:
    for name, path in spec.items():
      opened.append(TestSet(config, name, path, sensor))
  except BaseException:
    for test_set in opened:
      test_set.close()
    raise
  return opened


# ---------------------------------------------------------------------------------------------
# The protocols and the loop.


def image_metrics(test_set: TestSet, ref: Mapping[str, np.ndarray], out: np.ndarray) -> dict:
  """The protocol's metrics of one image.

  Args:
    test_set: the test set (protocol, sensor, config).
    ref: roles on the sensor scale (float64), from `sources.Source.reference`.
    out: (H, W, C) estimate on the sensor scale.

  Returns:
    metric name -> value.
  """
  cfg = test_set.config
  max_value = float(cfg.data.max_value)
  if test_set.protocol == 'reduced':
    return metrics.reduced_resolution_metrics(
      ref['gt'], out, max_value, ratio=cfg.model.scale, crop=cfg.eval.crop, block=cfg.eval.block
    )
  if test_set.protocol == 'full':
    return metrics.full_resolution_metrics(
      out, ref['lms'], ref['guide'][..., 0], test_set.sensor, cfg.model.scale, cfg.eval.block
    )
  return metrics.hisr_metrics(ref['gt'] / max_value, out / max_value, ratio=cfg.model.scale)


def evaluate_test_set(
  test_set: TestSet,
  fuser: tiling.Fuser,
  out_dir: Path | None,
  *,
  step: int,
  save_images: bool = True,
  error_max: float = 0.1,
  verbose: bool = True,
) -> dict[str, Any]:
  """Fuses, scores and saves one test set into `out_dir/<name>` (atomically).

  Args:
    test_set: an open test set.
    fuser: the model.
    out_dir: the output root; None writes nothing (processes other than the first).
    step: the checkpoint step, for the record.
    save_images: write the `.mat` files and PNG previews.
    error_max: top of the error maps' colour scale (fraction of the sensor maximum).
    verbose: print the table.

  Returns:
    The contents of `metrics.json` plus 'table' and 'dir'.
  """
  logging.info('evaluating %s (%s, %d images, %s)', *test_set.describe())
  cfg = test_set.config
  max_value = float(cfg.data.max_value)
  rgb = reporting.rgb_bands(cfg.model.spectral_bands, test_set.sensor)
  per_image = {METHOD: [], BASELINE: []}
  times = dict.fromkeys(('inference', 'metrics', 'files'), 0.0)
  final = None if out_dir is None else naming.output_path(out_dir, test_set=test_set.name)
  with contextlib.nullcontext() if final is None else fileio.atomic_dir(final) as folder:
    start = time.perf_counter()
    for k, (example, fused) in enumerate(fuser.fuse_all(test_set.source)):
      t0 = time.perf_counter()
      sr = np.asarray(fused, np.float32) * np.float32(max_value)  # As test.py: x max value.
      ref = test_set.source.reference(k, example)
      per_image[METHOD].append(image_metrics(test_set, ref, sr.astype(np.float64)))
      per_image[BASELINE].append(image_metrics(test_set, ref, ref['lms']))
      t1 = time.perf_counter()
      if save_images and folder is not None:
        reporting.write_image(folder, k, sr, ref, rgb=rgb, max_value=max_value, error_max=error_max)
      logging.info('%s: image %d/%d %s', test_set.name, k + 1, len(test_set), per_image[METHOD][-1])
      times['inference'] += t0 - start
      times['metrics'] += t1 - t0
      start = time.perf_counter()
      times['files'] += start - t1
    result = {
      'test_set': test_set.name,
      'file': str(test_set.file),
      'protocol': test_set.protocol,
      'sensor': test_set.sensor,
      'model_sensor': cfg.data.sensor,
      'max_value': max_value,
      'bands': int(cfg.model.spectral_bands),
      'mode': fuser.mode,
      'step': int(step),
      'num_images': len(per_image[METHOD]),
      'image_size': [int(s) for s in test_set.shape],
      'crop': int(cfg.eval.crop) if test_set.protocol == 'reduced' else 0,
      'methods': {method: reporting.summarize(rows) for method, rows in per_image.items()},
      'seconds': times,
    }
    table = reporting.format_report(result)
    if folder is not None:
      reporting.write_summary(folder, result)
  if verbose:
    print(table, flush=True)
  return dict(result, table=table, dir=str(final or ''))


def evaluate(
  config: ml_collections.ConfigDict | None,
  workdir: str | Path,
  *,
  step: int | None = None,
  which: str = 'best',
  test_files=None,
  sensor: str | None = None,
  mode: str | None = None,
  tile_batch: int | None = None,
  output_dir: str | Path | None = None,
  save_images: bool | None = None,
  verbose: bool = True,
) -> dict[str, dict[str, Any]]:
  """Evaluates a workdir's checkpoint on test sets with the paper's protocols.

  Args:
    config: the run's config; None reads `workdir/config.json`.
    workdir: a training run's or a converted checkpoint's workdir.
    step: the checkpoint step; None: the best one by validation loss (else the latest).
    which: 'best' or 'latest' when `step` is None.
    test_files: 'name=path.h5,...' / bare test-set or TFDS split names / a dict; None: every
      test set of `config.data.test_files`.
    sensor: evaluate as this sensor's data (MTF gains of HQNR, RGB bands) instead of
      `config.data.sensor`, e.g. WV2 files through a WV3 model.
    mode: 'auto', 'tiled' or 'whole' (default `config.eval.mode`; 'auto' is the network's own
      test procedure).
    tile_batch: tiles per jitted call (default `config.eval.tile_batch`).
    output_dir: default `workdir/eval`; each test set goes to `output_dir/<name>/`.
    save_images: write the `.mat` and PNG files (default `config.eval.save_images`).
    verbose: print each test set's table.

  Returns:
    test set name -> its `metrics.json` contents plus 'table' and 'dir'; {} on processes other
    than the first (process 0 evaluates alone).

  Raises:
    FileNotFoundError: no config or no checkpoint in the workdir (`errors.CheckpointError`
      also when every checkpoint is damaged).
    DataError: a test set is missing or does not match the model (bands, sensor, sizes).
    fileio.OutputError: the output folder cannot be written.
  """
  workdir = Path(workdir)
  if config is None:
    config = config_utils.load_config(workdir)
  mode = mode or config.eval.mode
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  requested = step
  step = checkpointing.select_step(workdir, step, which)  # Fails before any data are read.
  with contextlib.ExitStack() as stack:
    test_sets = select_test_sets(config, test_files, sensor)
    for test_set in test_sets:
      stack.callback(test_set.close)
    results = {}
    # Several processes: the first one restores, fuses, scores and writes everything, so that
    # no host repeats the work (checkpoint reads involve no other process); the others return {}.
    if jax.process_index() == 0:
      out_dir = Path(output_dir) if output_dir else naming.output_path(workdir, 'evaluation')
      reporting.prepare_output_root(out_dir)
      # Onto this process's devices, whatever topology saved it; a damaged best / latest step
      # falls back to the newest intact one (with a warning), an explicit --step does not.
      params, step, _ = checkpointing.restore_params(
        workdir,
        config.model,
        step=step,
        fallback=requested is None,
        chosen_by_select=requested is None,
      )
      fuser = tiling.Fuser(
        config.model,
        params,
        mode=mode,
        tile_size=config.eval.tile_size,
        tile_pad=config.eval.tile_pad,
        tile_batch=tile_batch or config.eval.tile_batch,
      )
      if save_images is None:
        save_images = bool(config.eval.save_images)
      for test_set in test_sets:
        results[test_set.name] = evaluate_test_set(
          test_set,
          fuser,
          out_dir,
          step=step,
          save_images=save_images,
          error_max=float(config.eval.error_max),
          verbose=verbose,
        )
  # The other processes wait here rather than in JAX's shutdown barrier, whose timeout a long
  # evaluation would exceed.
  distributed.wait_for_all('evaluation')
  return results
