"""Shared test fixtures and helpers: the `../shared` reference folder, configs, script runs.

Tests import the helpers directly (`from conftest import REPO, shared_path, load_config`); the
fixtures (`shared`, `shared_dir`) are found by pytest. Slow tests (end-to-end runs, subprocesses,
real-reference runs) carry `@pytest.mark.slow`: `python -m pytest -q -m "not slow"` is the quick
subset.
"""

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import ml_collections
import numpy as np
import pytest

# The suite compiles many small U2Net programs whose run time is negligible: XLA's backend
# optimisations halve the CPU compile time when switched off, without changing what is computed.
# Set before jax initialises its backend; subprocesses started by the tests inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
  ).strip()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'


def shared_path(*parts: str) -> Path:
  """A file under `../shared`; skips the calling test with the reason when it is absent.

  Args:
    *parts: the path below `../shared`, e.g. `shared_path('official', 'x.npz')`.

  Returns:
    The existing path.
  """
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'{path} is absent: reference files from ../shared are not available here')
  return path


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml), keeps a module on one worker
  when its tests share a module-scoped fixture (a trained workdir, a fused scene: built once, not
  once per worker) or when it starts several processes per test (`MULTIPROCESS_MODULES`: two
  of them at once would oversubscribe the cores and time out). Runs before xdist reads groups."""
  for item in items:
    module = item.nodeid.split('::')[0]
    defs = getattr(item, '_fixtureinfo', None)
    shared = defs is not None and any(
      d.scope == 'module' and d.baseid == module
      for fixture_defs in defs.name2fixturedefs.values()
      for d in fixture_defs
    )
    if Path(module).name in MULTIPROCESS_MODULES:
      item.add_marker(pytest.mark.xdist_group('multiprocess'))
    elif shared:
      item.add_marker(pytest.mark.xdist_group(module))


# Test modules whose tests each start several processes (JAX multi-process runs, a dask cluster,
# parallel TPU compiles): one group, so that no two of them run at once.
MULTIPROCESS_MODULES = {'multihost_test.py', 'archive_test.py', 'tpu_compile_test.py'}


@pytest.fixture(autouse=True, scope='session')
def _private_cache_dir(tmp_path_factory):
  """Keeps the value-check cache (`$XDG_CACHE_HOME/u2net_jax`) of the test runs out of ~/.cache."""
  old = os.environ.get('XDG_CACHE_HOME')
  os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('xdg_cache'))
  yield
  if old is None:
    os.environ.pop('XDG_CACHE_HOME', None)
  else:
    os.environ['XDG_CACHE_HOME'] = old


@pytest.fixture
def shared():
  """`shared_path` as a fixture: `def test_x(shared): shared('official', 'x.npz')`."""
  return shared_path


@pytest.fixture
def shared_dir() -> Path:
  """The `../shared` folder itself; skips the test when it is absent."""
  return shared_path()


def load_config(name: str = 'tiny', **overrides) -> ml_collections.ConfigDict:
  """`configs/<name>.py` (`name:arg` passes `arg`) with dotted-field overrides, finalized.

  Usage: `load_config('tiny', **{'train.num_epochs': 1, 'model.width': 8})`. The overrides are
  applied before `config_utils.finalize`, as `--config.FIELD=value` flags are.

  Args:
    name: the config file's stem, optionally with `:arg`.
    **overrides: 'section.field' -> value; an unknown field is an error, as on the command line.

  Returns:
    The finalized, locked ConfigDict.
  """
  from u2net_jax.run import config_utils

  stem, sep, arg = name.partition(':')
  return config_utils.load_config_file(f'{REPO / "configs" / stem}.py{sep}{arg}', overrides)


def script_env(
  extra: Mapping[str, str] | None = None, cache_dir: str | os.PathLike | None = None
) -> dict[str, str]:
  """The environment of a script run by a test: the CPU backend, this process's XLA flags.

  Args:
    extra: variables to add or replace.
    cache_dir: a JAX persistent compilation cache shared by the runs of one test (each run
      would otherwise compile the same programs again).

  Returns:
    The environment, for `subprocess`.
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu', **(extra or {}))
  if cache_dir:
    env.update(
      JAX_COMPILATION_CACHE_DIR=str(cache_dir),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    )
  return env


def run_script(
  *args: str,
  env: Mapping[str, str] | None = None,
  wait: bool = True,
  log: str | os.PathLike | None = None,
  timeout: float = 600,
):
  """Runs `python <args>` in the repository root, as a user runs a script.

  Args:
    *args: the script and its flags, e.g. `run_script('train.py', '--config=configs/tiny.py')`.
    env: the environment (default `script_env()`).
    wait: False starts it and returns the `Popen`, its output going to `log`.
    log: when not waiting, a file for its stdout and stderr (default: discarded). A file, not a
      pipe nobody reads: a full pipe would stall the script.
    timeout: seconds, when waiting.

  Returns:
    The `CompletedProcess` (text stdout/stderr), or the `Popen` when not waiting.
  """
  cmd = [sys.executable, *args]
  env = dict(env) if env is not None else script_env()
  if not wait:
    out = open(log, 'w') if log else subprocess.DEVNULL  # Closed below; the child keeps its copy.
    try:
      return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
      if log:
        out.close()
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def sensor_image(h: int, w: int, c: int, seed: int = 0, smooth: bool = True) -> np.ndarray:
  """A positive, spatially correlated (h, w, c) float64 test image on the 11-bit scale."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(h + 8, w + 8, c))
  if smooth:
    x = sum(np.roll(np.roll(x, i, 0), j, 1) for i in range(4) for j in range(4))
  x = x[:h, :w]
  return np.clip(900 + 120 * x + 60 * np.arange(c), 0, 2047)
