"""Shared fixtures."""

import pytest

from gemini_mini import config as config_lib

TEST_CONFIG = 'configs/test.yaml'


@pytest.fixture
def test_config():
  return config_lib.load(TEST_CONFIG)
