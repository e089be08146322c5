"""Tests for the ``Attention`` module against a numpy forward pass built from its parameters."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_mini.layers import Attention, KVCache

D_MODEL, NUM_HEADS, HEAD_DIM = 16, 4, 8
HEADS = {'mqa': 1, 'gqa': 2, 'mha': 4}  # name -> num_kv_heads (num_heads is 4)
WAVELENGTH = 10_000.0
PARAMS = ('q_DNH', 'k_DKH', 'v_DKH', 'o_NHD')


# The module's three paths, each compiled once per shape and configuration (eager runs are
# slow): the forward, and the cached ones with a cache as last argument.
call = nnx.jit(lambda module, *args: module(*args))
prefill = nnx.jit(lambda module, *args: module.prefill(*args))
decode_step = nnx.jit(lambda module, *args: module.decode(*args))


def make_attention(heads, seed=0, **kwargs):
  return Attention(D_MODEL, NUM_HEADS, HEADS[heads], HEAD_DIM, rngs=nnx.Rngs(seed), **kwargs)


def numpy_rope(x_BTNH, positions_BT):
  """Rotate-halves RoPE: pair ``(x[i], x[i + H/2])`` turns by ``pos * 10000 ** (-2i / H)``."""
  half = x_BTNH.shape[-1] // 2
  angle_BTh = positions_BT[..., None] * WAVELENGTH ** (-2.0 * np.arange(half) / (2 * half))
  cos, sin = np.cos(angle_BTh)[:, :, None], np.sin(angle_BTh)[:, :, None]
  a, b = x_BTNH[..., :half], x_BTNH[..., half:]
  return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def numpy_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT, window):
  """Loops over batch, query and head: query head n reads kv head n // (N / K)."""
  batch, length, num_heads, _ = q_BTNH.shape
  groups = num_heads // k_BTKH.shape[2]
  out = np.zeros_like(q_BTNH)
  for b in range(batch):
    for t in range(length):
      keys = [s for s in range(length)
              if segment_ids_BT[b, s] == segment_ids_BT[b, t]
              and 0 <= positions_BT[b, t] - positions_BT[b, s]
              and (not window or positions_BT[b, t] - positions_BT[b, s] < window)]
      for n in range(num_heads):
        scores = [q_BTNH[b, t, n] @ k_BTKH[b, s, n // groups] for s in keys]
        weights = [math.exp(x - max(scores)) for x in scores]
        out[b, t, n] = sum(w * v_BTKH[b, s, n // groups]
                           for w, s in zip(weights, keys)) / sum(weights)
  return out


def numpy_forward(module, x_BTD, segment_ids_BT, positions_BT, window):
  """The module's own parameters applied in float64 numpy."""
  w = {name: np.asarray(getattr(module, name)[...], np.float64) for name in PARAMS}
  x_BTD = np.asarray(x_BTD, np.float64)
  positions_BT = np.asarray(positions_BT)
  q_BTNH = numpy_rope(np.einsum('btd,dnh->btnh', x_BTD, w['q_DNH']), positions_BT)
  k_BTKH = numpy_rope(np.einsum('btd,dkh->btkh', x_BTD, w['k_DKH']), positions_BT)
  v_BTKH = np.einsum('btd,dkh->btkh', x_BTD, w['v_DKH'])
  o_BTNH = numpy_attention(q_BTNH / math.sqrt(HEAD_DIM), k_BTKH, v_BTKH,
                           np.asarray(segment_ids_BT), positions_BT, window)
  return np.einsum('btnh,nhd->btd', o_BTNH, w['o_NHD'])


def packed(doc_lengths_per_row, length):
  """Segment ids 1, 2, ... with positions from 0 in each; segment 0 padding at the end."""
  segment_ids, positions = [], []
  for doc_lengths in doc_lengths_per_row:
    pad = length - sum(doc_lengths)
    segment_ids.append(np.concatenate(
        [np.full(n, i + 1) for i, n in enumerate(doc_lengths)] + [np.zeros(pad)]))
    positions.append(np.concatenate([np.arange(n) for n in doc_lengths] + [np.arange(pad)]))
  return jnp.asarray(np.array(segment_ids), jnp.int32), jnp.asarray(np.array(positions), jnp.int32)


def random_x(seed, batch, length):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, D_MODEL)),
                     jnp.float32)


@pytest.mark.parametrize('heads, kernel, window', [
    ('mqa', 'dense', 0), ('gqa', 'dense', 5), ('mha', 'dense', 0),
    ('mqa', 'chunked', 5), ('gqa', 'chunked', 0), ('mha', 'chunked', 5),
])
def test_forward_matches_numpy_reference(heads, kernel, window):
  # T = 22 with chunk 8: the chunked kernel also takes its padding path.
  module = make_attention(heads, kernel=kernel, window=window, chunk_size=8)
  segment_ids, positions = packed([[7, 10], [22]], 22)
  x_BTD = random_x(1, 2, 22)
  y_BTD = call(module, x_BTD, segment_ids, positions)
  assert y_BTD.shape == x_BTD.shape
  np.testing.assert_allclose(y_BTD, numpy_forward(module, x_BTD, segment_ids, positions, window),
                             atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('heads, window', [('mqa', 0), ('gqa', 6)])
def test_dense_and_chunked_agree_in_values_and_parameter_gradients(heads, window):
  dense = make_attention(heads, kernel='dense', window=window)
  chunked = make_attention(heads, seed=1, kernel='chunked', window=window, chunk_size=8)
  nnx.update(chunked, nnx.state(dense, nnx.Param))
  segment_ids, positions = packed([[9, 8], [20]], 20)
  x_BTD = random_x(2, 2, 20)
  cotangent_BTD = random_x(3, 2, 20)

  @nnx.jit
  def output_and_grads(module):
    def loss(module):
      y_BTD = module(x_BTD, segment_ids, positions)
      return jnp.sum(y_BTD * cotangent_BTD), y_BTD
    (_, y_BTD), grads = nnx.value_and_grad(loss, has_aux=True)(module)
    return y_BTD, grads

  y_dense, grads_dense = output_and_grads(dense)
  y_chunked, grads_chunked = output_and_grads(chunked)
  np.testing.assert_allclose(y_chunked, y_dense, atol=1e-5, rtol=1e-4)
  for name in PARAMS:
    np.testing.assert_allclose(grads_chunked[name][...], grads_dense[name][...],
                               atol=1e-5, rtol=1e-4, err_msg=name)


def empty_cache(module, batch, max_length):
  return KVCache.create(batch, max_length, module.num_kv_heads, HEAD_DIM)


def decode(module, x_BTD, segment_ids_BT, positions_BT, prompt_length, max_length):
  """Prefills ``prompt_length`` tokens into a fresh cache, then feeds the rest one at a time."""
  cache = empty_cache(module, x_BTD.shape[0], max_length)
  tokens = lambda start, stop: (x_BTD[:, start:stop], segment_ids_BT[:, start:stop],
                                positions_BT[:, start:stop])
  y_BTD, cache = prefill(module, *tokens(0, prompt_length), cache)
  outputs = [y_BTD]
  for t in range(prompt_length, x_BTD.shape[1]):
    y_B1D, cache = decode_step(module, *tokens(t, t + 1), cache)
    outputs.append(y_B1D)
  return jnp.concatenate(outputs, axis=1), cache


@pytest.mark.parametrize('heads, window, kernel', [
    ('mqa', 0, 'dense'), ('gqa', 3, 'dense'), ('mha', 0, 'dense'), ('gqa', 3, 'chunked')])
def test_prefill_then_decode_equals_full_forward(heads, window, kernel):
  module = make_attention(heads, window=window, kernel=kernel, chunk_size=4)
  batch, length = 2, 11
  x_BTD = random_x(4, batch, length)
  segment_ids = jnp.ones((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  full_BTD = call(module, x_BTD, segment_ids, positions)
  decoded_BTD, cache = decode(module, x_BTD, segment_ids, positions, prompt_length=5,
                              max_length=16)
  assert int(cache.end) == length
  np.testing.assert_allclose(decoded_BTD, full_BTD, atol=1e-5, rtol=1e-4)


def test_left_padded_prompt_decodes_like_an_unpadded_one():
  # Row 0: a 6-token prompt. Row 1: a 4-token prompt left-padded by 2 segment-0 tokens.
  # Both then decode 4 tokens; each row's real tokens must match its own unpadded run.
  module = make_attention('gqa')
  prompt, steps = 6, 4
  x_BTD = random_x(5, 2, prompt + steps)
  segment_ids = jnp.array([[1] * 10, [0, 0] + [1] * 8], jnp.int32)
  positions = jnp.array([list(range(10)), [0, 0] + list(range(8))], jnp.int32)
  decoded_BTD, _ = decode(module, x_BTD, segment_ids, positions, prompt, max_length=12)
  assert np.isfinite(np.asarray(decoded_BTD)).all()
  for row, real in ((0, slice(0, 10)), (1, slice(2, 10))):
    x_real = x_BTD[row:row + 1, real]
    length = x_real.shape[1]
    alone_BTD = call(module, x_real, jnp.ones((1, length), jnp.int32),
                     jnp.arange(length, dtype=jnp.int32)[None])
    np.testing.assert_allclose(decoded_BTD[row:row + 1, real], alone_BTD,
                               atol=1e-5, rtol=1e-4, err_msg=f'row {row}')


@pytest.mark.parametrize('kernel, window', [('dense', 0), ('chunked', 0), ('chunked', 3)])
def test_prefill_attends_as_the_forward_and_as_decoding_over_the_cache(kernel, window):
  # prefill attends within the prompt with the layer's kernel; decode of the same prompt
  # into an empty cache attends over all its slots. Row 0 packs two segments, row 1 is
  # left-padded: prefill gives the forward's outputs at every position, decode the same at
  # the real tokens, and the caches they write, and the next step's outputs, agree.
  module = make_attention('gqa', kernel=kernel, chunk_size=4, window=window)
  batch, prompt, max_length = 2, 9, 16
  x_BTD = random_x(7, batch, prompt + 1)
  segment_ids = jnp.array([[1] * 5 + [2] * 5, [0, 0, 0] + [1] * 7], jnp.int32)
  positions = jnp.array([list(range(5)) * 2, [0, 0, 0] + list(range(7))], jnp.int32)
  prompt_tokens = (x_BTD[:, :prompt], segment_ids[:, :prompt], positions[:, :prompt])
  next_token = (x_BTD[:, prompt:], segment_ids[:, prompt:], positions[:, prompt:])
  prefilled_BTD, prefilled = prefill(module, *prompt_tokens, empty_cache(module, batch, max_length))
  np.testing.assert_allclose(prefilled_BTD, call(module, *prompt_tokens), atol=1e-6)
  decoded_BTD, decoded = decode_step(module, *prompt_tokens, empty_cache(module, batch, max_length))
  real = np.asarray(segment_ids[:, :prompt]) > 0
  np.testing.assert_allclose(decoded_BTD[real], prefilled_BTD[real], atol=1e-5, rtol=1e-4)
  for field in ('k_JHS', 'v_JHS', 'segment_ids_BS', 'positions_BS', 'end'):
    np.testing.assert_allclose(getattr(decoded, field), getattr(prefilled, field), atol=1e-6,
                               err_msg=field)
  np.testing.assert_allclose(decode_step(module, *next_token, decoded)[0],
                             decode_step(module, *next_token, prefilled)[0], atol=1e-5, rtol=1e-4)


def test_mqa_cache_is_num_heads_times_smaller_than_mha():
  batch, max_length = 2, 32
  segment_ids = jnp.ones((batch, 3), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (batch, 3))
  nbytes = {}
  for heads in ('mqa', 'mha'):
    module = make_attention(heads)
    _, cache = prefill(module, random_x(6, batch, 3), segment_ids, positions,
                       empty_cache(module, batch, max_length))
    nbytes[heads] = cache.nbytes
  # keys + values, float32: 2 * B * S * K * H * 4 bytes.
  assert nbytes['mqa'] == 2 * batch * max_length * 1 * HEAD_DIM * 4
  assert nbytes['mha'] == NUM_HEADS * nbytes['mqa']


def test_parameters_carry_logical_axis_names():
  expected = {
      'q_DNH': ('embed', 'heads', 'head_dim'),
      'k_DKH': ('embed', 'kv_heads', 'head_dim'),
      'v_DKH': ('embed', 'kv_heads', 'head_dim'),
      'o_NHD': ('heads', 'head_dim', 'embed'),
  }
  module = make_attention('gqa')
  specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
  for name, axes in expected.items():
    assert getattr(module, name).get_metadata()['out_sharding'] == axes, name
    assert tuple(specs[name].get_value()) == axes, name
  assert module.q_DNH[...].shape == (D_MODEL, NUM_HEADS, HEAD_DIM)
  assert module.k_DKH[...].shape == (D_MODEL, 2, HEAD_DIM)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_heads=6, num_kv_heads=4),
     r'num_heads \(6\) must be a multiple of num_kv_heads \(4\)'),
    (dict(head_dim=7), r'head_dim \(7\) must be even'),
    (dict(kernel='flash'), r"unknown attention kernel 'flash'.*'dense', 'chunked'"),
])
def test_bad_constructor_arguments_raise_helpful_errors(kwargs, message):
  args = dict(d_model=D_MODEL, num_heads=NUM_HEADS, num_kv_heads=2, head_dim=HEAD_DIM)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    Attention(**args, rngs=nnx.Rngs(0))
