"""Fusing an archive of scenes on a Dask cluster: one task per scene, restartable, summarized.

  python fuse.py --workdir=W --scenes=scenes.csv --out_dir=OUT [--workers=N | --scheduler=ADDR]

  scenes = scene_lists.read_scenes('scenes.csv', 'OUT')
  summary = archive.run(scenes, archive.Engine(workdir='W'), 'OUT', workers=2)

Scenes come from `data.scene_lists.read_scenes` (a CSV, a pair of glob patterns or a STAC
ItemCollection). Each scene is one Dask task (`fuse_task`) that runs today's streaming fuser
(`network_fuser.fuse_files`) with the weights kept once per worker process (`_load`: restored and
compiled once per workdir, step and tile shape, not per scene). What fuses is an `Engine`: a
workdir's weights, or a classical method (`Engine(method=..., sensor=...)`: a fresh
`classical_fuser.ClassicalWindowFuser` per scene, `scene.fuse_files_with`; nothing to load).

Outputs in the output folder, per scene (`io.manifests`): `<name>.tif` (a Cloud-Optimized
GeoTIFF), `<name>.stac.json` (a STAC Item: the output asset, `derived_from` links to its inputs,
the method and the weights) and `<name>.manifest.json`, written last: the inputs' identity (size,
mtime, a fast hash of their first, middle and last MiB), the engine's identity (workdir, step,
tile batch and a BLAKE2b over the checkpoint's parameter files: each file's path and fast hash),
the options and the output's SHA-256. A re-run skips a scene whose manifest matches all of these
(the output re-hashed) and redoes the others; a scene without a valid manifest is fused again,
replacing its output. Outputs are renamed into place only when complete (`fileio.atomic_file`),
so a killed worker leaves no output under the final name; the scheduler reschedules its scene on
another worker (`distributed.scheduler.allowed-failures` times), which continues after the last
window the killed one finished (`network_fuser.fuse_files(resume='restart')`: the partial output
and its journal, `infer.scene_resume`; a journal of other options is started over).

A scene that fails (unreadable, misregistered, anything its task raises) fails alone: its reason
is in the summary and the others finish. `OUT/summary.csv` and `OUT/summary.json` list every
scene (scene, status: done/skipped/failed, seconds, pixels, nodata pixels, error).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import glob
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from u2net_jax import errors
from u2net_jax.data import DataError
from u2net_jax.data.scene_lists import Scene, read_scenes
from u2net_jax.io import fileio, manifests, naming

SUMMARY_FIELDS = ('scene', 'status', 'seconds', 'pixels', 'nodata_pixels', 'error', 'output')


def _dask():
  """`distributed`, or a DataError saying how to install it (an optional dependency)."""
  try:
    import distributed
  except ImportError as e:
    raise DataError(
      'many scenes (--scenes) need dask and distributed: pip install "u2net-jax[archive]"'
    ) from e
  return distributed


# ---------------------------------------------------------------------------------------------
# What fuses, loaded once per worker process.


@dataclasses.dataclass(frozen=True)
class Engine:
  """What fuses each scene: a workdir's weights or a classical method (`--method`).

  Attributes:
    workdir: a training run's or converted weights' workdir.
    method: a classical method's name (`u2net_jax.methods.METHODS`), instead of a workdir.
    step, which: the checkpoint (`checkpointing.select_step`).
    tile_batch: tiles per jitted call (default `config.eval.tile_batch`; it is part of the
      output's identity: a tile's last bit can depend on its batch position).
    sensor: with `method`, the sensor (`toolbox.SENSORS`: MTF gains, bands, ratio).
    whole_image_limit: with `method`, the largest scene a whole-image method reads at once.
  """

  workdir: str | None = None
  method: str | None = None
  step: int | None = None
  which: str = 'best'
  tile_batch: int | None = None
  sensor: str | None = None
  whole_image_limit: int | None = None

  def __post_init__(self):
    if (self.workdir is None) == (self.method is None):
      raise ValueError('an Engine takes a workdir or a method, not both or neither')
    if self.method is not None and self.sensor is None:
      raise ValueError('an Engine with a method takes its sensor (sensor=...)')
    if self.workdir is not None:
      object.__setattr__(self, 'workdir', str(Path(self.workdir).expanduser().resolve()))


_LOADED: dict[Engine, tuple[Any, int]] = {}
_LOAD_LOCK = threading.Lock()  # Worker threads share the cache: one load per process.
LOADS = {'count': 0}  # Loads in this process (the tests check: once per worker, not per scene).


def _load(engine: Engine) -> tuple[Any, int]:
  """This process's (fuser, step) for `engine`, restored and built on first use.

  The `tiling.Fuser` keeps one compiled function per tile shape, so a worker compiles each shape
  once for all its scenes.
  """
  with _LOAD_LOCK:
    if engine not in _LOADED:
      from u2net_jax.infer import tiling
      from u2net_jax.run import checkpointing, config_utils

      config = config_utils.load_config(engine.workdir)
      step = checkpointing.select_step(engine.workdir, engine.step, engine.which)
      params, step, _ = checkpointing.restore_params(engine.workdir, config.model, step=step)
      fuser = tiling.Fuser(
        config.model,
        params,
        tile_size=int(config.eval.tile_size),
        tile_pad=int(config.eval.tile_pad),
        tile_batch=engine.tile_batch or int(config.eval.tile_batch),
      )
      _LOADED[engine] = (fuser, int(step))
      LOADS['count'] += 1
  return _LOADED[engine]


def _classical(engine: Engine):
  """A fresh `ClassicalWindowFuser` (one per scene: its statistics are the scene's)."""
  from u2net_jax.infer import classical_fuser
  from u2net_jax.methods import streaming

  limit = engine.whole_image_limit or streaming.DEFAULT_WHOLE_IMAGE_LIMIT
  return classical_fuser.ClassicalWindowFuser(engine.method, engine.sensor, limit)


def _fuse_classical(s: Scene, engine: Engine, options: dict[str, Any]) -> dict[str, Any]:
  """`fuse.py --method` on one scene, as a COG (the sensor's maximum unless `max_value`)."""
  from u2net_jax import toolbox
  from u2net_jax.infer import scene as scene_lib

  max_value = options.get('max_value') or float(toolbox.get_sensor(engine.sensor)['max_value'])
  return scene_lib.fuse_files_with(
    _classical(engine),
    s.pan,
    s.ms,
    s.out,
    max_value=max_value,
    dtype=options.get('dtype'),
    window=options.get('window', 1024),
    overwrite=True,
    cog=True,
    progress=False,
    resume='restart',  # A killed worker's scene continues after its last finished window.
  )


# ---------------------------------------------------------------------------------------------
# Identities and manifests.


def engine_identity(engine: Engine) -> tuple[Engine, dict[str, Any]]:
  """What made an output, without loading the weights: the engine with its step fixed.

  Args:
    engine: as given (`step` None: the best or latest checkpoint now).

  Returns:
    (engine with the chosen step, so every worker restores the same one; its identity: method,
    workdir, step, the tile batch and `manifests.checkpoint_hash` of the checkpoint's parameter
    files).

  Raises:
    errors.CheckpointError, FileNotFoundError: no config or checkpoint in the workdir.
  """
  if engine.method is not None:
    fuser = _classical(engine)  # Checks the method and the sensor before any scene runs.
    return engine, fuser.identity()
  from u2net_jax.run import checkpointing, config_utils

  config = config_utils.load_config(engine.workdir)
  step = checkpointing.select_step(engine.workdir, engine.step, engine.which)
  folder = checkpointing.checkpoint_dir(engine.workdir) / str(step) / 'params'
  identity = {
    'method': 'u2net',
    'workdir': engine.workdir,
    'step': int(step),
    'checkpoint_hash': manifests.checkpoint_hash(folder),
    'tile_batch': int(engine.tile_batch or config.eval.tile_batch),
  }
  return dataclasses.replace(engine, step=int(step)), identity


def _peak_rss_mb() -> float | None:
  """This process's peak resident set (VmHWM) in MB, where /proc has it."""
  try:
    for line in Path('/proc/self/status').read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


# ---------------------------------------------------------------------------------------------
# The per-scene task.


def fuse_task(
  s: Scene, engine: Engine, identity: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
  """Fuses one scene unless its output is already complete; never raises for the scene's faults.

  Runs on a worker. The output, then its STAC Item, then its manifest are written, each renamed
  into place when complete: a scene is done exactly when its manifest is.

  Args:
    s: the scene.
    engine: what fuses (loaded once per worker process), its step fixed (`engine_identity`).
    identity: the engine's identity, recorded in the manifest.
    options: `network_fuser.fuse_files` options that change the output's pixels (`max_value`,
      `dtype`) and the `window`.

  Returns:
    The summary row: scene, status ('done', 'skipped' or 'failed'), seconds, pixels,
    nodata_pixels, error ('' unless failed), output, plus the worker's pid and peak RSS (MB).
  """
  from u2net_jax.infer import network_fuser

  start = time.perf_counter()
  row = {'scene': s.name, 'status': 'failed', 'pixels': 0, 'nodata_pixels': 0, 'error': ''}
  try:
    for role, path in (('PAN', s.pan), ('MS', s.ms)):
      if '://' in path:
        raise DataError(f'{role} {path}: only local (or mounted) files can be read')
      if not Path(path).is_file():
        raise DataError(f'{role} {path}: file not found')
    inputs = {'pan': manifests.file_identity(s.pan), 'ms': manifests.file_identity(s.ms)}
    pixel_options = {k: options.get(k) for k in ('max_value', 'dtype')}
    manifest = manifests.complete(s, inputs, identity, pixel_options)
    if manifest is not None:
      row.update(
        status='skipped', pixels=manifest['pixels'], nodata_pixels=manifest['nodata_pixels']
      )
    else:
      # Not complete until a new manifest is written.
      manifests.manifest_path(s.out).unlink(missing_ok=True)
      out = Path(s.out)
      # A killed worker's temporaries of this output (only this task writes them).
      for stale in out.parent.glob(f'.{glob.escape(out.name)}.*.tmp*'):
        stale.unlink(missing_ok=True)
      if engine.method is not None:
        result = _fuse_classical(s, engine, options)
      else:
        fuser, step = _load(engine)
        result = network_fuser.fuse_files(
          engine.workdir,
          s.pan,
          s.ms,
          s.out,
          max_value=options.get('max_value'),
          dtype=options.get('dtype'),
          window=options.get('window', 1024),
          overwrite=True,  # Only an output without a matching manifest gets here: redo it.
          cog=True,
          progress=False,
          loaded=(fuser, step),
          resume='restart',  # A killed worker's scene continues after its last finished window.
        )
      manifests.write_stac_item(s, result, identity, pixel_options)
      manifest = manifests.write_manifest(s, inputs, identity, pixel_options, result)
      row.update(status='done', pixels=manifest['pixels'], nodata_pixels=result['nodata_pixels'])
  except (*errors.user_errors(), FileNotFoundError) as e:
    row['error'] = str(e)
  except Exception as e:  # A hostile file can break a reader in any way: it fails alone.
    logging.getLogger(__name__).exception('scene %s failed', s.name)
    row['error'] = f'{type(e).__name__}: {e}'
  row.update(
    seconds=round(time.perf_counter() - start, 3),
    output=s.out,
    worker_pid=os.getpid(),
    worker_peak_rss_mb=_peak_rss_mb(),
  )
  return row


# ---------------------------------------------------------------------------------------------
# The client: cluster, progress, summary.


def default_workers() -> tuple[int, int]:
  """(worker processes, threads each) for a LocalCluster on this machine.

  With an accelerator (`/dev/nvidia0`, a TPU's `/dev/accel0`): one worker, which splits each
  tile batch over all the local devices. On CPU: single-threaded workers, one per core up to 2
  cores and one per 2 cores beyond (XLA runs a worker's batches on several threads; on 2 cores, 2
  workers gave 1.35x the scenes per hour of 1 in `benchmarks/archive_benchmark.py`, README).
  """
  if any(Path(p).exists() for p in ('/dev/nvidia0', '/dev/accel0')):
    return 1, 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  cores = cores or 1
  return (cores if cores <= 2 else cores // 2), 1


class _Progress:
  """One line per update on `stream`, at most every `every` seconds (and a last one)."""

  def __init__(self, total: int, stream, every: float):
    self.total, self.stream, self.every = total, stream, every
    self.start = self.last = time.monotonic()
    self.dashboard: str | None = None
    self.printed = ''
    self.counts = {'done': 0, 'skipped': 0, 'failed': 0}

  def line(self, running: int) -> str:
    c = self.counts
    finished = sum(c.values())
    elapsed = time.monotonic() - self.start
    worked = c['done'] + c['failed']  # Skipped scenes take no time: not in the rate.
    rate = worked / elapsed * 3600 if elapsed > 0 else 0.0
    left = self.total - finished
    eta = f'{dt.timedelta(seconds=round(left / rate * 3600))}' if rate and left else '-'
    text = (
      f'scenes: {finished}/{self.total} finished ({c["done"]} done, {c["skipped"]} skipped, '
      f'{c["failed"]} failed), {running} running, {rate:.1f} scenes/h, ETA {eta}'
    )
    return text + (f', dashboard {self.dashboard}' if self.dashboard else '')

  def update(self, status: str, running: Callable[[], int], force: bool = False) -> None:
    if status:
      self.counts[status] += 1
    now = time.monotonic()
    if self.stream is not None and (force or now - self.last >= self.every):
      line = self.line(running())
      if line != self.printed:  # The closing update repeats nothing.
        print(line, file=self.stream, flush=True)
      self.last, self.printed = now, line


def _dashboard(client) -> str | None:
  try:
    import bokeh  # noqa: F401  (the dashboard's dependency)
  except ImportError:
    return None
  return client.dashboard_link


def write_summary(out_dir: str | os.PathLike, rows: Sequence[dict], extra: dict) -> dict:
  """Writes `summary.csv` and `summary.json` (the rows plus totals and `extra`) atomically."""
  out_dir = Path(out_dir)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, SUMMARY_FIELDS, extrasaction='ignore', lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  fileio.atomic_write_text(naming.output_path(out_dir, 'summary', ext='csv'), buffer.getvalue())
  totals = {k: sum(r['status'] == k for r in rows) for k in ('done', 'skipped', 'failed')}
  summary = dict(extra, scenes=len(rows), **totals, rows=list(rows))
  fileio.atomic_write_text(
    naming.output_path(out_dir, 'summary', ext='json'), json.dumps(summary, indent=1)
  )
  return summary


def run(
  scenes: Sequence[Scene],
  engine: Engine,
  out_dir: str | os.PathLike,
  *,
  options: dict[str, Any] | None = None,
  workers: int | None = None,
  threads_per_worker: int | None = None,
  scheduler: str | None = None,
  dashboard_address: str = ':8787',
  progress_every: float = 10.0,
  stream=sys.stderr,
) -> dict[str, Any]:
  """Fuses `scenes` on a Dask cluster, one task per scene; writes the summary.

  Args:
    scenes: from `read_scenes`.
    engine: what fuses.
    out_dir: the output folder (created; checked writable before any work).
    options: `max_value`, `dtype`, `window` for `network_fuser.fuse_files`.
    workers, threads_per_worker: the LocalCluster (default `default_workers()`).
    scheduler: an existing scheduler's address (`tcp://host:8786`) instead of a LocalCluster.
    dashboard_address: the LocalCluster's dashboard (':0' a free port).
    progress_every: seconds between progress lines; stream: where they go (None: silent).

  Returns:
    The summary (`write_summary`): counts, seconds, scenes_per_hour and a row per scene.
  """
  distributed = _dask()
  out_dir = fileio.ensure_writable_dir(Path(out_dir).expanduser())
  options = dict(options or {})
  # Worker processes log every start and stop at INFO: keep the progress lines readable
  # (workers read the variable when they start; a user's own setting wins).
  os.environ.setdefault('DASK_LOGGING__DISTRIBUTED', 'warning')
  logging.getLogger('distributed').setLevel(logging.WARNING)
  start = time.perf_counter()
  engine, identity = engine_identity(engine)
  pixel_options = {k: options.get(k) for k in ('max_value', 'dtype')}
  rows: dict[str, dict] = {}
  for s in scenes:  # Complete outputs by stat alone: no task, no cluster when all are.
    manifest = manifests.quick_complete(s, identity, pixel_options)
    if manifest is not None:
      rows[s.name] = {
        'scene': s.name,
        'status': 'skipped',
        'seconds': 0.0,
        'pixels': manifest.get('pixels', 0),
        'nodata_pixels': manifest.get('nodata_pixels', 0),
        'error': '',
        'output': s.out,
      }
  todo = [s for s in scenes if s.name not in rows]
  bar = _Progress(len(scenes), stream, progress_every)
  bar.counts['skipped'] = len(rows)
  if todo:
    _run_tasks(
      todo,
      engine,
      identity,
      options,
      rows,
      bar,
      distributed,
      workers=workers,
      threads_per_worker=threads_per_worker,
      scheduler=scheduler,
      dashboard_address=dashboard_address,
    )
  else:
    bar.update('', lambda: 0, force=True)
  seconds = time.perf_counter() - start
  ordered = [rows[s.name] for s in scenes if s.name in rows]
  worked = sum(r['status'] in ('done', 'failed') for r in ordered)
  return write_summary(
    out_dir,
    ordered,
    {
      'engine': identity,
      'options': options,
      'seconds': round(seconds, 3),
      'scenes_per_hour': round(worked / seconds * 3600, 2) if worked else None,
    },
  )


def _run_tasks(
  todo,
  engine,
  identity,
  options,
  rows,
  bar,
  distributed,
  *,
  workers,
  threads_per_worker,
  scheduler,
  dashboard_address,
) -> None:
  """Submits one task per scene of `todo` and collects their rows into `rows` as they finish."""
  cluster = None
  if scheduler:
    try:
      client = distributed.Client(scheduler, timeout='30s')
    except (OSError, TimeoutError) as e:
      raise errors.DistributedError(f'--scheduler={scheduler}: cannot connect ({e})') from e
  else:
    n, threads = default_workers()
    cluster = distributed.LocalCluster(
      n_workers=workers or n,
      threads_per_worker=threads_per_worker or threads,
      processes=True,
      dashboard_address=dashboard_address,
    )
    client = distributed.Client(cluster)
  try:
    bar.dashboard = _dashboard(client)
    if bar.stream is not None:
      print(
        f'fusing {len(todo)} scenes ({bar.counts["skipped"]} already complete) on '
        f'{len(client.scheduler_info()["workers"])} workers ({client.scheduler.address}); '
        f'dashboard: {bar.dashboard or "none (pip install bokeh)"}',
        file=bar.stream,
        flush=True,
      )
    run_id = uuid.uuid4().hex[:8]
    futures = {
      client.submit(
        fuse_task, s, engine, identity, options, key=f'fuse-{s.name}-{run_id}', pure=False
      ): s
      for s in todo
    }

    def running():
      try:
        return sum(len(v) for v in client.processing().values())
      except Exception:  # A progress line is not worth failing the run.
        return 0

    for future in distributed.as_completed(futures):
      s = futures[future]
      try:
        row = future.result()
      except Exception as e:  # KilledWorker: its worker died `allowed-failures` times.
        row = {
          'scene': s.name,
          'status': 'failed',
          'seconds': 0.0,
          'pixels': 0,
          'nodata_pixels': 0,
          'error': f'{type(e).__name__}: {e} (its worker process died while fusing it)',
          'output': s.out,
        }
      rows[s.name] = row
      bar.update(row['status'], running)
    bar.update('', running, force=True)
  finally:
    client.close()
    if cluster is not None:
      cluster.close()


def run_from_flags(flags) -> int | str:
  """`fuse.py --scenes=...`: runs the archive and returns the exit status for `sys.exit`.

  Args:
    flags: absl's FLAGS of `fuse.py`.

  Returns:
    The number of failed scenes (0 when all succeeded; capped at 125), or an `error: ...` line
    (exit status 1) when the run cannot start.
  """
  from absl import logging as absl_logging

  # absl's default (INFO) would print the checkpoint library's many lines per load between the
  # progress lines; warnings and errors still show, and --verbosity=1 still shows everything.
  if absl_logging.get_verbosity() == absl_logging.INFO:
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    if not flags.out_dir:
      raise DataError('--scenes needs --out_dir (the outputs, manifests and summary go there)')
    for name in ('pan', 'ms', 'out'):
      if flags[name].value is not None:
        raise DataError(f'--{name} fuses one scene; with --scenes give the pairs in the list')
    if flags.scheduler and (flags.workers or flags.threads_per_worker):
      raise DataError(
        "--scheduler uses that cluster's workers; drop --workers/--threads_per_worker"
      )
    if flags.workers is not None and flags.workers < 1:
      raise DataError(f'--workers={flags.workers} must be at least 1')
    scenes = read_scenes(
      flags.scenes, flags.out_dir, pan_asset=flags.pan_asset, ms_asset=flags.ms_asset
    )
    if flags.method is not None:
      from u2net_jax.infer import classical_fuser

      fuser = classical_fuser.from_flags(flags)  # The flags' checks, before any cluster.
      engine = Engine(
        method=fuser.method, sensor=fuser.sensor, whole_image_limit=fuser.whole_image_limit
      )
    else:
      engine = Engine(
        workdir=flags.workdir, step=flags.step, which=flags.which, tile_batch=flags.tile_batch
      )
    summary = run(
      scenes,
      engine,
      flags.out_dir,
      options={'max_value': flags.max_value, 'dtype': flags.dtype, 'window': flags.window},
      workers=flags.workers,
      threads_per_worker=flags.threads_per_worker,
      scheduler=flags.scheduler,
      dashboard_address=flags.dashboard_address,
      stream=sys.stderr if flags.progress else None,
    )
  except (*errors.user_errors(), FileNotFoundError) as e:
    return f'error: {e}'
  brief = {k: v for k, v in summary.items() if k != 'rows'}
  print(json.dumps(brief), flush=True)
  if summary['failed']:
    print(
      f'error: {summary["failed"]} of {summary["scenes"]} scenes failed (reasons in '
      f'{naming.output_path(flags.out_dir, "summary", ext="csv")})',
      file=sys.stderr,
      flush=True,
    )
  return min(summary['failed'], 125)
