"""Shared fixtures."""

import pytest

from gemini_mini import config as config_lib

TEST_CONFIG = 'configs/test.yaml'


@pytest.fixture
def test_config():
  return config_lib.load(TEST_CONFIG)


@pytest.fixture(scope='session')
def small_data_dir(tmp_path_factory):
  """The small text corpus, built once per test session (per xdist worker) in a temp dir."""
  from gemini_mini.data import prepare
  data_dir = str(tmp_path_factory.mktemp('data'))
  prepare.ensure(data_dir, 'small')
  return data_dir
