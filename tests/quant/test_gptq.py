"""Tests for GPTQ: a smaller layer-output error than round-to-nearest on calibration data."""

import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from gemini_mini import config as config_lib
from gemini_mini.model import Decoder
from gemini_mini.quant import calibrate, gptq, rtn
from helpers import make_batch


def _output_error(x_XI, w_IO, q):
  return np.sum((x_XI @ w_IO - x_XI @ np.asarray(qwix.dequantize(q), np.float64)) ** 2)


def test_gptq_output_error_is_below_round_to_nearest_on_correlated_inputs():
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(64, 64))
  x_XI = rng.normal(size=(512, 64)) @ mixing  # correlated input features
  w_IO = rng.normal(size=(64, 64)).astype(np.float32)
  axes, contract = ('embed', 'mlp'), ('embed',)
  q_gptq = gptq.quantize(jnp.asarray(w_IO), x_XI.T @ x_XI, 4, 32, axes, contract, 'w')
  q_rtn = rtn.quantize(jnp.asarray(w_IO), 4, 32, axes, contract, 'w')
  assert q_gptq.scale.shape == q_rtn.scale.shape and q_gptq.qvalue.dtype == jnp.int4
  assert _output_error(x_XI, w_IO, q_gptq) < 0.8 * _output_error(x_XI, w_IO, q_rtn)


def test_gptq_beats_round_to_nearest_on_a_real_layer_and_its_experts():
  config = config_lib.load('configs/test.yaml', ['model.vocab_size=512'])
  decoder = Decoder(config.model, rngs=nnx.Rngs(0))
  batch = make_batch(config.model, length=64)
  hessians = calibrate.hessians(decoder, [batch])
  assert hessians['blocks.1.ffn.gate_EDF'].shape == (4, 64, 64)  # one per expert
  w_DNH = decoder.blocks[0].attention.q_DNH[...]
  # The query weight's inputs: the first block's normalised embeddings.
  inputs = decoder.blocks[0].attention_norm(decoder.embed(batch)).reshape(-1, 64)
  x_XD = np.asarray(inputs, np.float64)
  np.testing.assert_allclose(hessians['blocks.0.attention.q_DNH'], x_XD.T @ x_XD, rtol=1e-4)
  layout = (('embed', 'heads', 'head_dim'), ('embed',))
  q_gptq = gptq.quantize(w_DNH, hessians['blocks.0.attention.q_DNH'], 4, 32, *layout, 'q')
  q_rtn = rtn.quantize(w_DNH, 4, 32, *layout, 'q')
  w_DO = np.asarray(w_DNH, np.float64).reshape(64, -1)
  flat = lambda q: qwix.QArray(q.qvalue.reshape(64, -1), q.scale.reshape(2, -1))
  assert _output_error(x_XD, w_DO, flat(q_gptq)) < _output_error(x_XD, w_DO, flat(q_rtn))
