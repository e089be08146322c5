"""Checkpoints: round trip, keep-last-K, resumes refused by parameter tree and data stream
with the paths and fields named, bad files."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from gemini_mini import config as config_lib, parallel
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.train.checkpoint import Checkpointer, stream_differences
from gemini_mini.train.optimizer import make_optimizer
from gemini_mini.train.step import abstract_train_state, init_train_state

CONFIG = config_lib.load('configs/test.yaml')
OPTIMIZER = make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=1, weight_decay=0.1,
                           grad_clip=1.0)


def fresh_state(seed, config=CONFIG):
  mesh = parallel.make_mesh(config.mesh)
  _, shardings, _ = abstract_train_state(config.model, OPTIMIZER, mesh, seed)
  return init_train_state(config.model, OPTIMIZER, shardings, seed)


def abstract(config=CONFIG):
  """The restore target ``config`` builds (no allocation)."""
  return abstract_train_state(config.model, OPTIMIZER, parallel.make_mesh(config.mesh), 0)[2]


@pytest.fixture(scope='module')
def state():
  """A train state of ``CONFIG``, initialised once for the tests that only save one."""
  return fresh_state(0)


def save(directory, config, state):
  checkpointer = Checkpointer(directory, keep=1, config=config.to_dict())
  checkpointer.save(1, state, {'position': 1})
  checkpointer.close()


def refusal(directory, config) -> str:
  """The message of the error that resuming ``directory`` with ``config`` raises."""
  with pytest.raises(CheckpointError) as error:
    Checkpointer(directory, keep=1, config=config.to_dict()).restore(abstract(config))
  message = str(error.value)
  assert 'delete' not in message  # the checkpoint is good; the config is the problem
  return message


def assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_save_restore_round_trip_keeps_the_last_k(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=2, config=CONFIG.to_dict())
  states = {}
  for step in (1, 2, 3):
    states[step] = fresh_state(seed=step)
    checkpointer.save(step, states[step], {'position': step})
  checkpointer.close()
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
  step, state, data_state = Checkpointer(tmp_path, keep=2, config=CONFIG.to_dict()).restore(
      abstract())
  assert step == 3 and data_state == {'position': 3}
  assert_same(state, states[3])


@pytest.mark.parametrize('saved, resumed', [('true', 'false'), ('false', 'true')])
def test_a_resume_with_other_tied_embeddings_names_the_path_and_the_field(tmp_path, state,
                                                                          saved, resumed):
  config = config_lib.load('configs/test.yaml', [f'model.tie_embeddings={saved}'])
  save(tmp_path, config, state if config == CONFIG else fresh_state(0, config))
  message = refusal(tmp_path, config_lib.load('configs/test.yaml',
                                              [f'model.tie_embeddings={resumed}']))
  kind = ('built by the config, not in the checkpoint (1)' if saved == 'true'
          else 'in the checkpoint, not built by the config (1)')
  assert kind in message and 'text.unembedding_DV (64, 8192) float32' in message
  last = message.splitlines()[-1]
  assert last.startswith(f'model.tie_embeddings: {saved.title()} -> {resumed.title()}; ')
  assert last.endswith(f'resume with model.tie_embeddings={saved}, or start a new train.run_dir')


def test_a_resume_with_another_width_names_the_shape_differences(tmp_path, state):
  save(tmp_path, CONFIG, state)
  message = refusal(tmp_path, config_lib.load('configs/test.yaml', [
      'model.d_model=128', 'model.attention_kernel=dense']))
  assert 'shape or dtype differs (31)' in message and '... and 23 more' in message
  assert 'audio.proj_ID: saved (320, 64) float32, config (320, 128) float32' in message
  # Only the field that changes the tree is named, not the kernel (which does not).
  assert message.splitlines()[-1] == ('model.d_model: 64 -> 128; resume with model.d_model=64, '
                                      'or start a new train.run_dir')


def test_a_checkpoint_of_another_layout_names_the_paths_and_no_field(tmp_path, state):
  # What a change in the model code leaves: the saved paths differ though no field does.
  params = {('renamed' if key == 'text' else key): value for key, value in state.params.items()}
  save(tmp_path, CONFIG, dataclasses.replace(state, params=params))
  message = refusal(tmp_path, CONFIG)
  assert 'renamed.embedding_VD (8192, 64) float32' in message
  assert 'text.embedding_VD (8192, 64) float32' in message
  assert message.splitlines()[-1].startswith('model: no config field explains the difference')


def test_a_resume_with_another_data_stream_is_refused_by_field(tmp_path, state):
  save(tmp_path, CONFIG, state)
  other = config_lib.load('configs/test.yaml', ['train.batch_size=4', 'train.seed=3',
                                                 'train.steps=99', 'data.weights.haystack=0.2'])
  message = refusal(tmp_path, other)
  assert message.splitlines()[-1].endswith(
      'data.weights.haystack: 0 -> 0.2, train.batch_size: 2 -> 4, train.seed: 0 -> 3; resume '
      'with data.weights.haystack=0 train.batch_size=2 train.seed=0, or start a new '
      'train.run_dir')
  assert 'train.steps' not in message  # a longer run may resume a shorter one


def test_a_checkpoint_of_per_task_weight_fields_resumes_with_the_same_weights(tmp_path, state):
  saved = CONFIG.to_dict()  # as configs were saved before data.weights
  saved['data'] = {**{k: v for k, v in saved['data'].items() if k != 'weights'},
                   **{f'{task}_weight': weight for task, weight in CONFIG.data.weights.items()}}
  checkpointer = Checkpointer(tmp_path, keep=1, config=saved)
  checkpointer.save(1, state, {'position': 1})
  checkpointer.close()
  step, _, _ = Checkpointer(tmp_path, keep=1, config=CONFIG.to_dict()).restore(abstract())
  assert step == 1
  assert 'data.weights.text: 0.55 -> 0.3' in refusal(tmp_path, config_lib.load(
      'configs/test.yaml', ['data.weights.text=0.3']))


def test_a_resume_may_change_what_leaves_the_tree_and_the_stream_as_saved(tmp_path, state):
  save(tmp_path, CONFIG, state)
  other = config_lib.load('configs/test.yaml', [
      'model.attention_kernel=dense', 'model.moe_dispatch=capacity', 'model.remat=true',
      'train.steps=99', 'train.learning_rate=0.5', 'data.dir=elsewhere'])
  step, restored, _ = Checkpointer(tmp_path, keep=1, config=other.to_dict()).restore(
      abstract(other))
  assert step == 1
  assert_same(restored, state)


def test_stream_differences_ignore_free_fields():
  a = CONFIG.to_dict()
  b = dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, steps=50,
                                                            learning_rate=0.5)).to_dict()
  assert stream_differences(a, b) == {}


def test_a_corrupt_checkpoint_names_the_step_and_the_fix(tmp_path, state):
  checkpointer = Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict())
  checkpointer.save(1, state, {})
  checkpointer.close()
  for path in (tmp_path / '1' / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 0 and 'metadata' not in path.name:
      path.write_bytes(b'garbage')
  with pytest.raises(CheckpointError, match='/1: cannot read') as error:
    Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict()).restore(abstract())
  assert 'move' in str(error.value) and 'delete' not in str(error.value)


def test_no_checkpoint_is_an_error(tmp_path):
  with pytest.raises(CheckpointError, match='no complete checkpoint'):
    Checkpointer(tmp_path, keep=1, config=CONFIG.to_dict()).restore(abstract())


def test_an_unfinished_save_is_ignored(tmp_path, state):
  checkpointer = Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict())
  checkpointer.save(1, state, {'position': 1})
  checkpointer.close()
  # What a crash mid-save leaves: a temporary directory that was never renamed.
  shutil.copytree(tmp_path / '1', tmp_path / '2.orbax-checkpoint-tmp-1234')
  step, _, data_state = Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict()).restore(
      abstract())
  assert step == 1 and data_state == {'position': 1}


@pytest.mark.slow
def test_a_checkpoint_restores_onto_a_different_mesh(tmp_path):
  # Saved on (data 2 x fsdp 4), restored onto (fsdp 2 x expert 2 x tensor 2) of 8 fake devices.
  script = pathlib.Path(__file__).with_name('mesh_restore.py')
  result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, check=True)
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['all_equal'] and report['all_placed_as_asked']
  assert report['differently_sharded_leaves'] > 0
