"""Runs `notebooks/quickstart.ipynb` top to bottom on the CPU with small settings (nbclient).

The settings go in as papermill does it: a cell inserted after the one tagged 'parameters'. The
test points the weights cell at `../shared/official` when present (no download); without it the
download is switched off and the weights cells say they skip. Any cell that raises fails the run:
shown on a deliberately broken notebook and on the quickstart with a config that does not exist
(its `run` helper turns a failed command into an exception).
"""

import json
import textwrap

import pytest
from conftest import REPO, SHARED

nbformat = pytest.importorskip('nbformat', reason='nbformat (with nbclient) runs the notebook')
nbclient = pytest.importorskip('nbclient', reason='nbclient is a test dependency')
pytest.importorskip('ipykernel', reason='ipykernel provides the notebook kernel')

NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'


def _with_parameters(nb, **params):
  """`nb` with a cell setting `params` after the 'parameters' cell (papermill's convention)."""
  index = next(
    i for i, cell in enumerate(nb.cells) if 'parameters' in cell.metadata.get('tags', [])
  )
  source = '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  cell = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
  nb.cells.insert(index + 1, cell)
  return nb


def _execute(nb, monkeypatch, timeout=300):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # The kernel and its commands inherit it.
  client = nbclient.NotebookClient(
    nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(REPO)}}
  )
  return client.execute()


def _text(nb) -> str:
  """Every stream and text output of the executed notebook."""
  out = []
  for cell in nb.cells:
    for output in cell.get('outputs', []):
      out.append(output.get('text', ''))
      out.append(output.get('data', {}).get('text/plain', ''))
  return '\n'.join(out)


def _images(nb) -> int:
  return sum(
    'image/png' in output.get('data', {}) for cell in nb.cells for output in cell.get('outputs', [])
  )


def test_notebook_is_valid_and_colab_ready():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  sources = [cell.source for cell in nb.cells]
  assert sum('parameters' in cell.metadata.get('tags', []) for cell in nb.cells) == 1
  assert 'colab-badge' in sources[0] and 'REPO_URL' in '\n'.join(sources)
  # Stored without outputs: the repository holds the recipe, not one machine's run.
  assert all(not cell.get('outputs') for cell in nb.cells if cell.cell_type == 'code')
  assert 'tpu-vm' in sources[-1] and 'configs/wv3.py' in sources[-1]


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  weights = SHARED / 'official' / 'u2net_wv3_200000_iter.pth'
  sample = SHARED / 'official' / 'official_io_wv3_real.npz'
  local = weights.exists() and sample.exists()
  nb = _with_parameters(
    nbformat.read(NOTEBOOK, as_version=4),
    CONFIG='configs/tiny.py',
    CONFIG_OVERRIDES=['--config.train.num_epochs=2', '--config.train.eval_every_epochs=1'],
    WORKDIR=str(tmp_path / 'tiny'),
    OFFICIAL_WEIGHTS=str(weights) if local else '',
    DOWNLOAD=False,  # CI is offline: only the download is skipped.
    OFFICIAL_WORKDIR=str(tmp_path / 'official_wv3'),
    REAL_SAMPLE=str(sample) if local else '',
    SHOW_TENSORBOARD=False,  # No server in CI.
  )
  executed = _execute(nb, monkeypatch)
  text = _text(executed)
  # Training: the compile line, the closing summary; evaluation: the table; TensorBoard images.
  assert 'compiling the train step (first step)...' in text
  assert 'Training finished at step 8' in text and 'lms baseline' in text
  assert 'tiny_test: reduced resolution' in text and 'EXP' in text
  assert 'WARNING' not in text
  assert (tmp_path / 'tiny' / 'eval' / 'tiny_test' / 'preview_0.png').exists()
  if local:
    assert (tmp_path / 'official_wv3' / 'config.json').exists()
    diff = next(line for line in text.splitlines() if 'official PyTorch output' in line)
    assert float(diff.split('=')[-1]) < 1e-4  # The released weights reproduce the official run.
    assert _images(executed) >= 4  # Two previews, one TensorBoard image, the real fusion.
  else:
    assert 'the next cell is skipped' in text
    assert _images(executed) >= 3
  # What a user sees is saved beside the run (inspect it when the test fails).
  (tmp_path / 'executed.ipynb').write_text(json.dumps(executed), encoding='utf-8')


@pytest.mark.slow
def test_a_cell_that_raises_fails_the_run(monkeypatch):
  cells = [
    nbformat.v4.new_code_cell('x = 1'),
    nbformat.v4.new_code_cell("raise ValueError('this cell is broken')"),
    nbformat.v4.new_code_cell("open('never_written', 'w')"),
  ]
  nb = nbformat.v4.new_notebook(cells=cells)
  with pytest.raises(nbclient.exceptions.CellExecutionError, match='this cell is broken'):
    _execute(nb, monkeypatch, timeout=60)
  assert not (REPO / 'never_written').exists()


@pytest.mark.slow
def test_a_failing_command_fails_the_quickstart(tmp_path, monkeypatch):
  nb = _with_parameters(
    nbformat.read(NOTEBOOK, as_version=4),
    CONFIG='configs/no_such_config.py',
    WORKDIR=str(tmp_path / 'w'),
    DOWNLOAD=False,
    SHOW_TENSORBOARD=False,
  )
  with pytest.raises(nbclient.exceptions.CellExecutionError) as failure:
    _execute(nb, monkeypatch, timeout=120)
  message = str(failure.value)
  assert 'train.py exited with status' in message, textwrap.shorten(message, 2000)
  assert not (tmp_path / 'w' / 'eval').exists()  # Nothing after the failed cell ran.
