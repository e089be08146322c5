"""Tests for a quantized decoder: its logits, its cached decoding, its parameter metadata."""

import jax
import numpy as np
import pytest
import qwix
from flax import nnx

from gemini_mini import config as config_lib
from gemini_mini.model import Decoder
from gemini_mini.quant import model
from helpers import make_batch

OVERRIDES = ['model.vocab_size=512']


@pytest.fixture(scope='module')
def float_and_quantized():
  config = config_lib.load('configs/test.yaml', OVERRIDES)
  decoder = Decoder(config.model, rngs=nnx.Rngs(0))
  quantized = nnx.clone(decoder)
  model.quantize(quantized, 4, 32)
  return decoder, quantized


def test_quantized_logits_equal_the_float_decoder_with_dequantized_weights(float_and_quantized):
  decoder, quantized = float_and_quantized
  dequantized = nnx.clone(quantized)
  for variable in model.quantizable(dequantized).values():
    variable.set_value(qwix.dequantize(variable[...]))
  batch = make_batch(decoder.config, length=64, images=((0, 3, 8),), audio=((1, 50, 8),))
  logits_BTV = nnx.jit(lambda m, b: m(b)[0])(quantized, batch)
  np.testing.assert_allclose(logits_BTV, dequantized(batch)[0], rtol=1e-4, atol=1e-4)
  float_BTV = decoder(batch)[0]
  error = np.linalg.norm(logits_BTV - float_BTV) / np.linalg.norm(float_BTV)
  assert 0 < error < 0.2


def test_cached_decoding_of_a_quantized_decoder_matches_its_forward_pass(float_and_quantized):
  _, quantized = float_and_quantized
  batch = make_batch(quantized.config, length=16, documents=((16,), (16,)))
  forward_BTV = quantized(batch)[0]
  prompt = jax.tree.map(lambda a: a[:, :12] if a.ndim == 2 else a, batch)
  rest = jax.tree.map(lambda a: a[:, 12:] if a.ndim == 2 else a[:, :0], batch)
  prefill_BTV, cache = quantized.prefill(prompt, quantized.init_cache(2, 16))
  decode_BTV, _ = quantized.decode(rest, cache)
  np.testing.assert_allclose(np.concatenate([prefill_BTV, decode_BTV], 1), forward_BTV,
                             rtol=1e-4, atol=1e-4)


def test_contraction_metadata_survives_eval_shape_state_and_scan():
  config = config_lib.load('configs/test.yaml', [*OVERRIDES, 'model.scan_layers=true'])
  scanned = nnx.eval_shape(lambda: Decoder(config.model, rngs=nnx.Rngs(0)))
  weights = model.quantizable(scanned)
  assert weights['groups.blocks.0.attention.o_NHD'].get_metadata()['contract'] == (
      'heads', 'head_dim')
  assert model.layout(weights['groups.blocks.1.ffn.down_EFD']) == (
      ('layers', 'expert', 'mlp', 'embed'), ('mlp',))
  state = nnx.state(scanned)
  assert state['groups']['blocks'][0]['ffn']['gate_DF'].get_metadata()['contract'] == ('embed',)
  assert 'router' not in ' '.join(weights) and 'embedding' not in ' '.join(weights)
  assert len(weights) == 2 * 4 + 2 * (4 + 3)  # encoders: proj + MLP; blocks: attention + ffn


def test_a_scanned_decoder_quantizes_to_nearest():
  config = config_lib.load('configs/test.yaml', [*OVERRIDES, 'model.scan_layers=true'])
  decoder = Decoder(config.model, rngs=nnx.Rngs(0))
  model.quantize(decoder, 8, 32)
  logits_BTV, _ = decoder(make_batch(config.model, length=32, documents=((32,), (32,))))
  assert np.isfinite(np.asarray(logits_BTV)).all()
