"""Tests for the quantized checkpoint and the command that writes it."""

import json
import pathlib

import numpy as np
import pytest
from flax import nnx

from gemini_mini import config as config_lib
from gemini_mini import quantize
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.infer.load import load
from gemini_mini.model import Decoder
from gemini_mini.quant import checkpoint, model
from helpers import make_batch


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A quantized tiny decoder and the directory it was saved to."""
  config = config_lib.load('configs/test.yaml', ['model.vocab_size=512'])
  decoder = Decoder(config.model, rngs=nnx.Rngs(0))
  model.quantize(decoder, 4, 64)
  directory = tmp_path_factory.mktemp('quantized') / 'out'
  record = {'bits': 4, 'group': 64, 'method': 'rtn', 'source': 'runs/x', 'step': 7}
  checkpoint.save(directory, decoder, config.to_dict(), record)
  return decoder, directory


def test_a_saved_quantized_decoder_loads_with_identical_logits(saved):
  decoder, directory = saved
  loaded = load(directory)
  assert loaded.step == 7
  batch = make_batch(decoder.config, length=32, documents=((32,), (20, 12)))
  np.testing.assert_array_equal(loaded.decoder(batch)[0], decoder(batch)[0])


def test_int4_weights_take_at_most_a_sixth_of_float32_at_group_64(saved):
  decoder, _ = saved
  stored, float32 = checkpoint.sizes(checkpoint.tensors(decoder), decoder)
  assert stored <= float32 / 6


def _copy(directory, tmp_path):
  copy = tmp_path / 'copy'
  copy.mkdir()
  for name in (checkpoint.CONFIG, checkpoint.TENSORS):
    (copy / name).write_bytes((directory / name).read_bytes())
  return copy


def test_a_truncated_file_is_refused_with_the_command_that_rewrites_it(saved, tmp_path):
  copy = _copy(saved[1], tmp_path)
  data = (copy / checkpoint.TENSORS).read_bytes()
  (copy / checkpoint.TENSORS).write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match='cannot read it .*write it again with python -m '
                                            'gemini_mini.quantize --checkpoint runs/x'):
    load(copy)


def test_scales_of_another_group_are_refused(saved, tmp_path):
  copy = _copy(saved[1], tmp_path)
  config = json.loads((copy / checkpoint.CONFIG).read_text())
  config['quantization']['group'] = 32
  (copy / checkpoint.CONFIG).write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r'a group of 32 .* gives .* written with another '
                                            'group'):
    load(copy)


def test_a_model_override_that_changes_shapes_is_refused(saved):
  with pytest.raises(CheckpointError, match='missing tensors|builds'):
    load(saved[1], ['model.d_ff=256'])


def test_the_command_writes_a_directory_load_accepts(tiny_run_dir, tmp_path, capsys):
  out = tmp_path / 'int4'
  argv = ['--checkpoint', tiny_run_dir, '--bits', '4', '--group', '64', '--out', str(out)]
  assert quantize.main([*argv, '--method', 'rtn']) == 0
  assert 'quantized weights' in capsys.readouterr().out
  loaded = load(out, ['model.dtype=bfloat16'])
  assert loaded.step == 2 and loaded.config.model.dtype == 'bfloat16'
  assert np.isfinite(np.asarray(loaded.decoder(make_batch(loaded.config.model))[0])).all()
  assert quantize.main([*argv, '--method', 'rtn']) == 2  # the output exists: refused
  assert 'exists' in capsys.readouterr().err.splitlines()[-1]
