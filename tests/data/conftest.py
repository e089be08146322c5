"""The small text corpus, built once per test session (per xdist worker) in a temp dir."""

import pytest

from gemini_mini.data import prepare


@pytest.fixture(scope='session')
def small_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data'))
  prepare.ensure(data_dir, 'small')
  return data_dir
