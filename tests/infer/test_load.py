"""Loading a trained decoder from a run directory: its config, its step, its parameters."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gemini_mini.checkpoint import CheckpointError
from gemini_mini.infer.load import load
from gemini_mini.config import ConfigError
from helpers import make_batch


def saved_params(run_dir, step) -> dict:
  """The parameters as Orbax wrote them, read back as numpy arrays without a target tree."""
  path = pathlib.Path(run_dir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return ocp.tree.to_flat_dict(state['params'])


def test_loads_the_trained_parameters_and_config(tiny_run_dir):
  loaded = load(tiny_run_dir)
  assert loaded.step == 2
  assert loaded.config.train.run_dir == tiny_run_dir
  assert loaded.config.data.weights['haystack'] == 0.2
  saved = saved_params(tiny_run_dir, 2)
  restored = ocp.tree.to_flat_dict(nnx.state(loaded.decoder))
  assert restored.keys() == saved.keys()
  for path, value in saved.items():
    np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg=str(path))
  logits_BTV, _ = loaded.decoder(make_batch(loaded.config.model))
  assert np.isfinite(np.asarray(logits_BTV)).all()


def test_overrides_that_keep_the_parameter_tree_apply(tiny_run_dir):
  assert load(tiny_run_dir, ['eval.trials=3']).config.eval.trials == 3
  dense = load(tiny_run_dir, ['model.attention_kernel=dense'])
  assert dense.config.model.attention_kernel == 'dense'
  restored = ocp.tree.to_flat_dict(nnx.state(dense.decoder))
  for path, value in saved_params(tiny_run_dir, 2).items():
    np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg=str(path))
  with pytest.raises(ConfigError, match='eval.trials'):
    load(tiny_run_dir, ['eval.trials=0'])


def test_overrides_that_change_the_parameter_tree_are_refused_by_path_and_field(tiny_run_dir):
  with pytest.raises(CheckpointError) as error:
    load(tiny_run_dir, ['model.tie_embeddings=false'])
  message = str(error.value)
  assert 'built by the config, not in the checkpoint (1):\n    text.unembedding_DV' in message
  assert message.splitlines()[-1] == ('model.tie_embeddings: True -> False; '
                                      'load with model.tie_embeddings=true')
  with pytest.raises(CheckpointError, match='model.d_model: 64 -> 128; load with model.d_model=64'):
    load(tiny_run_dir, ['model.d_model=128'])


def test_loading_imports_nothing_from_training():
  code = ('import sys, gemini_mini.infer.load; '
          'print(sorted(m for m in sys.modules if m.startswith("gemini_mini.train")))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == '[]'


def test_missing_run_names_the_fix(tmp_path):
  with pytest.raises(CheckpointError, match='no such checkpoint directory'):
    load(tmp_path / 'nothing')
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(CheckpointError, match='no complete checkpoint'):
    load(tmp_path / 'empty')
