"""Loading a trained decoder from a run directory: its config, its step, its parameters."""

import jax
import numpy as np
import pytest
from flax import nnx

from gemini_mini.infer.load import load
from gemini_mini.train.checkpoint import CheckpointError
from gemini_mini.config import ConfigError
from helpers import make_batch


def test_loads_the_trained_decoder_with_its_config(tiny_run_dir):
  loaded = load(tiny_run_dir)
  assert loaded.step == 2
  assert loaded.config.train.run_dir == tiny_run_dir and loaded.config.data.haystack_weight == 0.2
  # The parameters are the trained ones, not a fresh initialisation with the same seed.
  fresh = nnx.state(type(loaded.decoder)(loaded.config.model, rngs=nnx.Rngs(
      loaded.config.train.seed)), nnx.Param)
  trained = nnx.state(loaded.decoder, nnx.Param)
  differences = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                             fresh, trained)
  assert max(jax.tree.leaves(differences)) > 0
  logits_BTV, _ = loaded.decoder(make_batch(loaded.config.model))
  assert np.isfinite(np.asarray(logits_BTV)).all()


def test_overrides_apply_and_shape_changes_are_refused(tiny_run_dir):
  assert load(tiny_run_dir, ['eval.trials=3']).config.eval.trials == 3
  with pytest.raises(CheckpointError, match='model.d_model: 64 -> 128'):
    load(tiny_run_dir, ['model.d_model=128'])
  with pytest.raises(ConfigError, match='eval.trials'):
    load(tiny_run_dir, ['eval.trials=0'])


def test_missing_run_names_the_fix(tmp_path):
  with pytest.raises(CheckpointError, match='no such checkpoint directory'):
    load(tmp_path / 'nothing')
  (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(CheckpointError, match='no complete checkpoint'):
    load(tmp_path / 'empty')
