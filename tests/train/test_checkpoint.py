"""Checkpoints: round trip, keep-last-K, incompatible configs refused by field, bad files."""

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
from gemini_mini.train.checkpoint import CheckpointError, Checkpointer, config_differences
from gemini_mini.train.optimizer import make_optimizer
from gemini_mini.train.step import abstract_train_state, init_train_state

CONFIG = config_lib.load('configs/test.yaml')
OPTIMIZER = make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=1, weight_decay=0.1,
                           grad_clip=1.0)


def fresh_state(seed):
  mesh = parallel.make_mesh(CONFIG.mesh)
  _, shardings, abstract = abstract_train_state(CONFIG.model, OPTIMIZER, mesh, seed)
  return init_train_state(CONFIG.model, OPTIMIZER, shardings, seed), abstract


def assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_save_restore_round_trip_keeps_the_last_k(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=2, config=CONFIG.to_dict())
  states = {}
  for step in (1, 2, 3):
    states[step], abstract = fresh_state(seed=step)
    checkpointer.save(step, states[step], {'position': step})
  checkpointer.close()
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
  step, state, data_state = Checkpointer(tmp_path, keep=2, config=CONFIG.to_dict()).restore(abstract)
  assert step == 3 and data_state == {'position': 3}
  assert_same(state, states[3])


def test_incompatible_config_is_refused_by_field(tmp_path):
  state, abstract = fresh_state(0)
  checkpointer = Checkpointer(tmp_path, keep=1, config=CONFIG.to_dict())
  checkpointer.save(1, state, {})
  checkpointer.close()
  other = config_lib.load('configs/test.yaml', ['model.d_ff=256', 'train.batch_size=4',
                                                 'train.steps=99'])
  with pytest.raises(CheckpointError) as error:
    Checkpointer(tmp_path, keep=1, config=other.to_dict()).restore(abstract)
  message = str(error.value)
  assert 'model.d_ff: 128 -> 256' in message and 'train.batch_size: 2 -> 4' in message
  assert 'train.steps' not in message  # a longer run may resume a shorter one


def test_config_differences_ignore_free_fields():
  a = CONFIG.to_dict()
  b = dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, steps=50,
                                                            learning_rate=0.5)).to_dict()
  assert config_differences(a, b) == []


def test_a_corrupt_checkpoint_names_the_step_and_the_fix(tmp_path):
  state, abstract = fresh_state(0)
  checkpointer = Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict())
  checkpointer.save(1, state, {})
  checkpointer.close()
  for path in (tmp_path / '1' / 'state').rglob('*'):
    if path.is_file() and path.stat().st_size > 0 and 'metadata' not in path.name:
      path.write_bytes(b'garbage')
  with pytest.raises(CheckpointError, match='delete this step directory'):
    Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict()).restore(abstract)


def test_no_checkpoint_is_an_error(tmp_path):
  _, abstract = fresh_state(0)
  with pytest.raises(CheckpointError, match='no complete checkpoint'):
    Checkpointer(tmp_path, keep=1, config=CONFIG.to_dict()).restore(abstract)


def test_an_unfinished_save_is_ignored(tmp_path):
  state, abstract = fresh_state(0)
  checkpointer = Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict())
  checkpointer.save(1, state, {'position': 1})
  checkpointer.close()
  # What a crash mid-save leaves: a temporary directory that was never renamed.
  shutil.copytree(tmp_path / '1', tmp_path / '2.orbax-checkpoint-tmp-1234')
  step, _, data_state = Checkpointer(tmp_path, keep=3, config=CONFIG.to_dict()).restore(abstract)
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
