"""The notebooks in notebooks/: stored without outputs, and each one runs top to bottom.

Each notebook runs in a fresh kernel (nbclient) started in notebooks/, as Jupyter starts it;
the notebooks move to the repository root themselves and read its data/ (the small sample,
built first if missing) and configs/; what they write goes to pytest's temporary directory.
A failing cell fails the test with that cell's source and traceback.
"""

import fcntl
import os
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / 'notebooks'
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob('*.ipynb'))
CELL_TIMEOUT_S = 600  # per cell; a whole notebook takes about 1-2 minutes on 2 CPU cores
ANSI_COLOUR = re.compile(r'\x1b\[[0-9;]*m')  # the kernel colours its tracebacks


def test_the_notebooks_are_found():
  assert {path.name for path in NOTEBOOKS} >= {
      'quickstart.ipynb', 'haystack.ipynb', 'moe_routing.ipynb', 'post_training.ipynb'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  dirty = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == 'code'
           and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, (
      f'{path.name}: cells {dirty} hold outputs or execution counts; clear them before '
      'committing (Jupyter: Edit > Clear Outputs of All Cells, then save)')


@pytest.fixture(scope='session')
def repo_small_data():
  """The small data sample under data/, built at most once even when several pytest-xdist
  workers ask at the same time (a lock file serialises them)."""
  from gemini_mini.data import prepare
  data_dir = ROOT / 'data'
  data_dir.mkdir(exist_ok=True)
  with open(data_dir / '.notebooks.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    prepare.ensure(str(data_dir), 'small')


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, repo_small_data, tmp_path):
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOK_DIR)}})
  try:
    # The notebooks' runs and results (tempfile) land in pytest's temporary directory.
    client.execute(env={**os.environ, 'TMPDIR': str(tmp_path)})
  except CellExecutionError as error:
    pytest.fail(f'{path.name} failed in a cell:\n{ANSI_COLOUR.sub("", str(error))}',
                pytrace=False)
