"""Shared fixtures, and a compilation cache shared by every test process."""

import os
import tempfile

import jax
import pytest

# XLA programs compiled once are read back from disk by every later test, xdist worker and
# subprocess (train.py runs, the sharded scripts, the notebooks' kernels inherit the
# environment) that compiles the same program: most tests build the same tiny model, and a
# compilation is most of a short test's time. The executables are the same, so no result
# changes.
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), 'gemini_mini_tests_jax_cache')
os.environ['JAX_COMPILATION_CACHE_DIR'] = COMPILATION_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.2'
jax.config.update('jax_compilation_cache_dir', COMPILATION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)

from gemini_mini import config as config_lib

TEST_CONFIG = 'configs/test.yaml'


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """Every test's float32 matmuls in full float32. Tests compare against float64/numpy
  references at float32 tolerances; GPUs multiply float32 in TF32 by default (10-bit
  mantissa), which alone breaks those tolerances. On CPU this changes nothing."""
  with jax.default_matmul_precision('highest'):
    yield


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


@pytest.fixture(scope='session')
def tiny_run_dir(small_data_dir, tmp_path_factory):
  """A run of ``configs/test.yaml`` trained for 2 steps on the small data, with a checkpoint
  (built once per test session and xdist worker): the checkpoint the eval tests load."""
  from gemini_mini.train import loop
  run_dir = str(tmp_path_factory.mktemp('tiny_run'))
  loop.run(config_lib.load(TEST_CONFIG, [
      f'data.dir={small_data_dir}', f'train.run_dir={run_dir}', 'train.steps=2',
      'train.checkpoint_every=2', 'train.eval_every=0', 'data.weights.haystack=0.2']))
  return run_dir


def _tiny_post_training_run(small_data_dir, run_dir: str, init_from: str, overrides) -> str:
  """``configs/test.yaml`` fine-tuned from ``init_from`` for 2 steps on the small
  post-training items, with a checkpoint; rows long enough for every item's conversation."""
  from gemini_mini.train import loop
  loop.run(config_lib.load(TEST_CONFIG, [
      f'data.dir={small_data_dir}', f'train.run_dir={run_dir}', f'train.init_from={init_from}',
      'train.steps=2', 'train.checkpoint_every=2', 'train.eval_every=0', 'train.seq_len=512',
      'data.num_audio_frames=192', *overrides]))
  return run_dir


@pytest.fixture(scope='session')
def tiny_sft_run_dir(small_data_dir, tiny_run_dir, tmp_path_factory):
  """``tiny_run_dir`` fine-tuned on demonstrations (``train.stage=sft``) for 2 steps: the SFT
  model the preference stages and suites start from."""
  return _tiny_post_training_run(
      small_data_dir, str(tmp_path_factory.mktemp('tiny_sft_run')), tiny_run_dir,
      ['train.stage=sft', 'data.weights={demonstrations: 1.0}'])


@pytest.fixture(scope='session')
def tiny_reward_run_dir(small_data_dir, tiny_sft_run_dir, tmp_path_factory):
  """A reward model (``train.stage=reward``, a scalar head) trained from ``tiny_sft_run_dir``
  for 2 steps on the small preference pairs, up to 3 packed in a row."""
  return _tiny_post_training_run(
      small_data_dir, str(tmp_path_factory.mktemp('tiny_reward_run')), tiny_sft_run_dir,
      ['train.stage=reward', 'model.scalar_head=true', 'post.pairs_per_row=3'])
