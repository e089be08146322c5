"""Tests for the token and feature embedders against numpy recomputations."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_mini.layers import FeatureEmbed, TokenEmbed

V, D, F, I = 11, 8, 16, 6


def _numpy_mlp(x, gate, up, down):
  """``(gelu_tanh(x gate) * (x up)) down`` in float64."""
  x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
  h = x @ gate
  gelu = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
  return (gelu * (x @ up)) @ down


def _rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_token_embed_is_a_table_lookup():
  embed = TokenEmbed(V, D, rngs=nnx.Rngs(0))
  tokens_BT = jnp.asarray([[0, 3, 10, 3], [7, 1, 0, 2]], jnp.int32)
  x_BTD = embed.embed(tokens_BT)
  assert x_BTD.shape == (2, 4, D) and x_BTD.dtype == jnp.float32
  table_VD = np.asarray(embed.embedding_VD[...])
  for b in range(2):
    for t in range(4):
      np.testing.assert_array_equal(x_BTD[b, t], table_VD[int(tokens_BT[b, t])])


def test_token_logits_are_float32_x_times_unembedding():
  embed = TokenEmbed(V, D, rngs=nnx.Rngs(1))
  x_BTD = _rand((2, 3, D))
  logits_BTV = embed.logits(x_BTD)
  assert logits_BTV.shape == (2, 3, V) and logits_BTV.dtype == jnp.float32
  expected = np.asarray(x_BTD, np.float64) @ np.asarray(embed.unembedding_DV[...], np.float64)
  np.testing.assert_allclose(logits_BTV, expected, atol=1e-5, rtol=1e-4)
  # Untied: the output matrix is not the input table.
  assert not np.allclose(embed.unembedding_DV[...], embed.embedding_VD[...].T)


def test_tied_logits_read_the_input_table_scaled():
  embed = TokenEmbed(V, D, tied=True, rngs=nnx.Rngs(1))
  assert embed.tied and not hasattr(embed, 'unembedding_DV')
  assert set(nnx.to_pure_dict(nnx.state(embed))) == {'embedding_VD'}
  x_BTD = _rand((2, 3, D))
  logits_BTV = embed.logits(x_BTD)
  assert logits_BTV.shape == (2, 3, V) and logits_BTV.dtype == jnp.float32
  table_VD = np.asarray(embed.embedding_VD[...], np.float64)
  expected = np.asarray(x_BTD, np.float64) @ table_VD.T / math.sqrt(D)
  np.testing.assert_allclose(logits_BTV, expected, atol=1e-5, rtol=1e-4)


def test_unscaled_tied_logits_read_the_input_table_as_it_is():
  # Hugging Face's tied heads (scale_tied=False): logits = x E^T, no 1/sqrt(D).
  embed = TokenEmbed(V, D, tied=True, scale_tied=False, rngs=nnx.Rngs(1))
  x_BTD = _rand((2, 3, D))
  expected = np.asarray(x_BTD, np.float64) @ np.asarray(embed.embedding_VD[...], np.float64).T
  np.testing.assert_allclose(embed.logits(x_BTD), expected, atol=1e-5, rtol=1e-4)


def test_tied_embedding_gets_gradient_from_both_uses():
  """The one table is trained by the lookup and by the output head."""
  embed = TokenEmbed(V, D, tied=True, rngs=nnx.Rngs(3))
  tokens_BT = jnp.asarray([[2, 5]], jnp.int32)

  def loss(module):
    return module.logits(module.embed(tokens_BT))[..., 7].sum()

  grad_VD = np.asarray(nnx.grad(loss)(embed)['embedding_VD'][...])
  table_VD = np.asarray(embed.embedding_VD[...], np.float64)
  # d/dE of sum_t (E[tok_t] . E[7]) / sqrt(D): rows 2 and 5 get E[7]/sqrt(D), row 7 the sum.
  expected = np.zeros((V, D))
  expected[[2, 5]] += table_VD[7] / math.sqrt(D)
  expected[7] += (table_VD[2] + table_VD[5]) / math.sqrt(D)
  np.testing.assert_allclose(grad_VD, expected, atol=1e-5, rtol=1e-4)


def test_token_embed_bfloat16():
  embed = TokenEmbed(V, D, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
  assert embed.embedding_VD[...].dtype == embed.unembedding_DV[...].dtype == jnp.float32
  tokens_BT = jnp.asarray([[4, 0, 9]], jnp.int32)
  x_BTD = embed.embed(tokens_BT)
  assert x_BTD.dtype == jnp.bfloat16
  table_VD = np.asarray(embed.embedding_VD[...])
  np.testing.assert_array_equal(np.asarray(x_BTD, np.float32),
                                np.asarray(jnp.asarray(table_VD[[4, 0, 9]]).astype(jnp.bfloat16),
                                           np.float32)[None])
  logits_BTV = embed.logits(x_BTD)
  assert logits_BTV.dtype == jnp.float32  # float32 logits even from bfloat16 activations
  x64 = np.asarray(x_BTD, np.float64)
  w64 = np.asarray(embed.unembedding_DV[...].astype(jnp.bfloat16), np.float64)
  # Inputs rounded to bfloat16, products accumulated in float32: close to float64 of those.
  np.testing.assert_allclose(logits_BTV, x64 @ w64, atol=1e-4, rtol=1e-3)


def _numpy_feature_embed(module, x_BXI):
  """Projection, residual gated MLP, RMSNorm (eps 1e-6), from the module's parameters."""
  h = np.asarray(x_BXI, np.float64) @ np.asarray(module.proj_ID[...], np.float64)
  mlp = module.mlp
  h = h + _numpy_mlp(h, mlp.gate_DF[...], mlp.up_DF[...], mlp.down_FD[...])
  scale = np.asarray(module.norm.scale_D[...], np.float64)
  return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6) * scale


def test_feature_embed_matches_numpy():
  module = FeatureEmbed(I, D, F, rngs=nnx.Rngs(3))
  # A non-trivial norm scale, so the test sees that it is applied.
  module.norm.scale_D[...] = _rand((D,), 4)
  x_BXI = _rand((2, 5, I), 5)
  y_BXD = module(x_BXI)
  assert y_BXD.shape == (2, 5, D) and y_BXD.dtype == jnp.float32
  np.testing.assert_allclose(y_BXD, _numpy_feature_embed(module, x_BXI), atol=1e-5, rtol=1e-4)


def test_feature_embed_bfloat16():
  module = FeatureEmbed(I, D, F, dtype=jnp.bfloat16, rngs=nnx.Rngs(6))
  x_BXI = _rand((2, 5, I), 7)
  y_BXD = module(x_BXI)
  assert y_BXD.dtype == jnp.bfloat16
  for p in (module.proj_ID, module.mlp.gate_DF, module.mlp.up_DF, module.mlp.down_FD,
            module.norm.scale_D):
    assert p[...].dtype == jnp.float32
  # bfloat16 activations: about 2-3 significant digits on unit-scale outputs.
  np.testing.assert_allclose(np.asarray(y_BXD, np.float32), _numpy_feature_embed(module, x_BXI),
                             atol=5e-2, rtol=5e-2)


def test_parameters_carry_logical_axis_names():
  token = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(TokenEmbed(V, D, rngs=nnx.Rngs(0)),
                                                             nnx.Param)))
  assert tuple(token['embedding_VD']) == ('vocab', 'embed')
  assert tuple(token['unembedding_DV']) == ('embed', 'vocab')
  feature = nnx.to_pure_dict(nnx.get_partition_spec(
      nnx.state(FeatureEmbed(I, D, F, rngs=nnx.Rngs(0)), nnx.Param)))
  assert tuple(feature['proj_ID']) == ('features', 'embed')
  assert tuple(feature['mlp']['gate_DF']) == ('embed', 'mlp')
  assert tuple(feature['norm']['scale_D']) == ('embed',)
