"""Tests for the attention kernels against a slow numpy reference written as loops.

``dense_attention`` (with ``attention_mask``), ``chunked_attention`` and ``cached_attention``
(over a KV cache's layouts) take pre-scaled queries grouped as ``q_BTKGH`` (query head
``k * G + g`` reads kv head ``k``).
"""

import functools
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.layers.attention_kernels import (
    attention_mask, cached_attention, chunked_attention, dense_attention)

HEADS = {'mqa': (4, 1), 'gqa': (4, 2), 'mha': (4, 4)}  # (N query heads, K kv heads)
HEAD_DIM = 8


def allowed(q_segment, k_segment, q_position, k_position, window):
  """The rule, for one query and one key."""
  if q_segment != k_segment or k_position > q_position:
    return False
  return not window or q_position - k_position < window


def reference_mask(q_segment_ids_BT, k_segment_ids_BS, q_positions_BT, k_positions_BS, window):
  batch, length = q_segment_ids_BT.shape
  keys = k_segment_ids_BS.shape[1]
  return np.array([[[allowed(q_segment_ids_BT[b, t], k_segment_ids_BS[b, s], q_positions_BT[b, t],
                             k_positions_BS[b, s], window)
                     for s in range(keys)] for t in range(length)] for b in range(batch)])


def reference_attention(q_BTKGH, k_BSKH, v_BSKH, q_segment_ids_BT, k_segment_ids_BS,
                        q_positions_BT, k_positions_BS, window):
  """Loops over batch, query and head; an explicit softmax over the allowed keys (float64)."""
  q_BTKGH, k_BSKH, v_BSKH = (np.asarray(a, np.float64) for a in (q_BTKGH, k_BSKH, v_BSKH))
  batch, length, kv_heads, groups, _ = q_BTKGH.shape
  out = np.zeros_like(q_BTKGH)
  for b in range(batch):
    for t in range(length):
      keys = [s for s in range(k_BSKH.shape[1])
              if allowed(q_segment_ids_BT[b, t], k_segment_ids_BS[b, s], q_positions_BT[b, t],
                         k_positions_BS[b, s], window)]
      for kv in range(kv_heads):
        for g in range(groups):
          scores = [q_BTKGH[b, t, kv, g] @ k_BSKH[b, s, kv] for s in keys]
          weights = [math.exp(x - max(scores)) for x in scores]
          out[b, t, kv, g] = sum(w * v_BSKH[b, s, kv] for w, s in zip(weights, keys)) / sum(weights)
  return out


def reference_attention_jnp(q_BTKGH, k_BSKH, v_BSKH, mask_BTS):
  """The textbook formula in jnp, to differentiate: -inf outside the mask, then softmax."""
  scores_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -jnp.inf)
  scores_BKGTS -= jax.lax.stop_gradient(scores_BKGTS.max(-1, keepdims=True))
  probs_BKGTS = jnp.exp(scores_BKGTS) / jnp.exp(scores_BKGTS).sum(-1, keepdims=True)
  return jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS, v_BSKH)


def packed(doc_lengths_per_row, length, pad_positions='count'):
  """Segment ids 1, 2, ... per document, positions from 0 in each, segment 0 padding at the end.

  Padding positions count up from 0 (``'count'``) or are all 0 (``'zero'``).
  """
  segment_ids, positions = [], []
  for doc_lengths in doc_lengths_per_row:
    pad = length - sum(doc_lengths)
    assert pad >= 0
    segment_ids.append(np.concatenate(
        [np.full(n, i + 1) for i, n in enumerate(doc_lengths)] + [np.zeros(pad)]))
    pad_pos = np.arange(pad) if pad_positions == 'count' else np.zeros(pad)
    positions.append(np.concatenate([np.arange(n) for n in doc_lengths] + [pad_pos]))
  return np.array(segment_ids, np.int32), np.array(positions, np.int32)


def random_qkv(seed, batch, length, num_heads, num_kv_heads, keys=None):
  rng = np.random.default_rng(seed)
  groups = num_heads // num_kv_heads
  keys = keys or length
  q = rng.normal(size=(batch, length, num_kv_heads, groups, HEAD_DIM)) * HEAD_DIM**-0.25
  k = rng.normal(size=(batch, keys, num_kv_heads, HEAD_DIM)) * HEAD_DIM**-0.25
  v = rng.normal(size=(batch, keys, num_kv_heads, HEAD_DIM))
  return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v))


@functools.partial(jax.jit, static_argnames=('kernel', 'window', 'chunk_size'))
def value_and_grads(q, k, v, segment_ids, positions, cotangent, *, kernel, window, chunk_size=0):
  """``o`` and the gradient of ``sum(o * cotangent)`` with respect to ``q, k, v``."""
  def loss(q, k, v):
    if kernel == 'dense':
      mask = attention_mask(segment_ids, segment_ids, positions, positions, window)
      o = dense_attention(q, k, v, mask)
    else:
      o = chunked_attention(q, k, v, segment_ids, positions, window=window, chunk_size=chunk_size)
    return jnp.sum(o * cotangent), o
  (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, grads


def test_attention_mask_hand_written():
  segment_ids = np.array([[1, 1, 1, 2, 2, 0]])
  positions = np.array([[0, 1, 2, 0, 1, 0]])
  causal = np.array([[1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0],
                     [0, 0, 0, 1, 0, 0],
                     [0, 0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(
      attention_mask(segment_ids, segment_ids, positions, positions, 0)[0], causal)
  windowed = causal.copy()
  windowed[2, 0] = False  # window 2: distance 2 is too far
  np.testing.assert_array_equal(
      attention_mask(segment_ids, segment_ids, positions, positions, 2)[0], windowed)


@pytest.mark.parametrize('window', [0, 4])
@pytest.mark.parametrize('heads', HEADS)
def test_dense_matches_numpy_reference(heads, window):
  num_heads, num_kv_heads = HEADS[heads]
  segment_ids, positions = packed([[5, 9, 6], [13]], 24)
  q, k, v = random_qkv(0, 2, 24, num_heads, num_kv_heads)
  mask = attention_mask(segment_ids, segment_ids, positions, positions, window)
  np.testing.assert_array_equal(mask, reference_mask(segment_ids, segment_ids, positions,
                                                     positions, window))
  expected = reference_attention(q, k, v, segment_ids, segment_ids, positions, positions, window)
  np.testing.assert_allclose(dense_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-4)


def test_dense_cross_attention_over_a_cache():
  # Two new queries (positions 6, 7) over 10 cache slots: 8 written (segment 1), 2 empty (0).
  q, k, v = random_qkv(3, 1, 2, 4, 2, keys=10)
  q_segment_ids, q_positions = np.array([[1, 1]]), np.array([[6, 7]])
  k_segment_ids = np.array([[1] * 8 + [0] * 2])
  k_positions = np.array([list(range(8)) + [0, 0]])
  for window in (0, 3):
    mask = attention_mask(q_segment_ids, k_segment_ids, q_positions, k_positions, window)
    expected = reference_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions,
                                   k_positions, window)
    np.testing.assert_allclose(dense_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('heads', HEADS)
def test_cached_attention_reads_the_cache_layouts(heads):
  # Two rows (so J = B * K must be batch major), three new queries over 10 cache slots: row 0
  # has 8 written (segment 1), row 1 has 5 (segment 2); the rest empty (segment 0).
  num_heads, num_kv_heads = HEADS[heads]
  q, k, v = random_qkv(5, 2, 3, num_heads, num_kv_heads, keys=10)
  q_segment_ids, q_positions = np.array([[1, 1, 1], [2, 2, 2]]), np.array([[5, 6, 7], [2, 3, 4]])
  k_segment_ids = np.array([[1] * 8 + [0] * 2, [2] * 5 + [0] * 5])
  k_positions = np.array([list(range(8)) + [0, 0], list(range(5)) + [0] * 5])
  for window in (0, 3):
    mask = attention_mask(q_segment_ids, k_segment_ids, q_positions, k_positions, window)
    expected = reference_attention(q, k, v, q_segment_ids, k_segment_ids, q_positions,
                                   k_positions, window)
    k_JHS = einops.rearrange(k, 'B S K H -> (B K) H S')
    v_JHS = einops.rearrange(v, 'B S K H -> (B K) H S')
    np.testing.assert_allclose(cached_attention(q, k_JHS, v_JHS, mask), expected,
                               atol=1e-5, rtol=1e-4)


CHUNKED_CASES = {
    # name: (T, chunk_size, window, heads, documents per row; the rest of a row is padding).
    # Each kv-head layout meets windowed and unwindowed cases; the chunked kernel compiles
    # slowly, so the cases spread over the layouts instead of crossing every one of them.
    'chunk_divides_T': (32, 8, 0, 'mqa', [[32], [10, 14]]),
    'chunk_does_not_divide_T': (30, 8, 0, 'gqa', [[9, 12, 5], [30]]),
    'chunk_above_T': (20, 32, 0, 'mha', [[7, 9], [20]]),
    # Block pairs (2, 0), (3, 0), (3, 1) hold no allowed score in either row: skipped at run time.
    'packed_blocks_skipped': (32, 8, 0, 'gqa', [[8, 8, 8, 8], [16, 16]]),
    # Windows 2 and chunk + 2 put a needed key exactly on a skipped block's last slot.
    'window_below_chunk_padded': (22, 8, 2, 'mha', [[22], [4, 13]]),
    'window_equals_chunk': (24, 8, 8, 'mqa', [[24], [5, 19]]),
    'window_above_chunk_padded': (30, 8, 10, 'gqa', [[30], [11, 16]]),
    'window_with_chunk_above_T': (20, 32, 5, 'mqa', [[20], [6, 10]]),
}


def case_inputs(case, seed=4):
  """``q, k, v, segment_ids, positions, cotangent`` for one of ``CHUNKED_CASES``."""
  length, _, _, heads, documents = CHUNKED_CASES[case]
  segment_ids, positions = packed(documents, length)
  q, k, v = random_qkv(seed, 2, length, *HEADS[heads])
  cotangent = jnp.asarray(np.random.default_rng(seed + 1).normal(size=q.shape), jnp.float32)
  return q, k, v, segment_ids, positions, cotangent


# One case per kv-head layout; the shapes match CHUNKED_CASES so the jitted dense kernel is reused.
@pytest.mark.parametrize('case', ['chunk_divides_T', 'window_above_chunk_padded',
                                  'window_below_chunk_padded'])
def test_dense_gradients_match_textbook_formula(case):
  window = CHUNKED_CASES[case][2]
  q, k, v, segment_ids, positions, cotangent = case_inputs(case)
  _, grads = value_and_grads(q, k, v, segment_ids, positions, cotangent, kernel='dense',
                             window=window)
  mask = reference_mask(segment_ids, segment_ids, positions, positions, window)
  expected = jax.jit(jax.grad(
      lambda *qkv: jnp.sum(reference_attention_jnp(*qkv, mask) * cotangent),
      argnums=(0, 1, 2)))(q, k, v)
  for name, got, want in zip('qkv', grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f'd loss / d {name}')


@pytest.mark.parametrize('case', CHUNKED_CASES)
def test_chunked_matches_dense_values_and_gradients(case):
  _, chunk_size, window, _, _ = CHUNKED_CASES[case]
  q, k, v, segment_ids, positions, cotangent = case_inputs(case)
  o_dense, grads_dense = value_and_grads(q, k, v, segment_ids, positions, cotangent,
                                         kernel='dense', window=window)
  o_chunked, grads_chunked = value_and_grads(q, k, v, segment_ids, positions, cotangent,
                                             kernel='chunked', window=window,
                                             chunk_size=chunk_size)
  assert o_chunked.shape == q.shape and o_chunked.dtype == jnp.float32
  expected = reference_attention(q, k, v, segment_ids, segment_ids, positions, positions, window)
  np.testing.assert_allclose(o_chunked, expected, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(o_chunked, o_dense, atol=1e-5, rtol=1e-4)
  for name, got, want in zip('qkv', grads_chunked, grads_dense):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=f'd loss / d {name}')


def test_chunked_real_tokens_ignore_how_padding_is_numbered():
  # The batch contract leaves padding positions free (here all 0). Real tokens never see
  # padding, so their outputs and the gradients of a loss over them match the dense kernel.
  # (Shapes as in CHUNKED_CASES['chunk_does_not_divide_T'], so both kernels are reused.)
  segment_ids, positions = packed([[9, 11], [14]], 30, pad_positions='zero')
  q, k, v = random_qkv(6, 2, 30, *HEADS['gqa'])
  real = (segment_ids != 0)[:, :, None, None, None]
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=q.shape) * real, jnp.float32)
  o_dense, grads_dense = value_and_grads(q, k, v, segment_ids, positions, cotangent,
                                         kernel='dense', window=0)
  o_chunked, grads_chunked = value_and_grads(q, k, v, segment_ids, positions, cotangent,
                                             kernel='chunked', window=0, chunk_size=8)
  np.testing.assert_allclose(o_chunked * real, o_dense * real, atol=1e-5, rtol=1e-4)
  for got, want in zip(grads_chunked, grads_dense):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def _backward_temp_bytes(kernel, length, chunk_size=256):
  """XLA's temp buffer size for the compiled gradient at ``length`` tokens (nothing runs)."""
  q = jax.ShapeDtypeStruct((1, length, 1, 2, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def loss(q, k, v, segment_ids, positions):
    if kernel == 'dense':
      mask = attention_mask(segment_ids, segment_ids, positions, positions, 0)
      o = dense_attention(q, k, v, mask)
    else:
      o = chunked_attention(q, k, v, segment_ids, positions, window=0, chunk_size=chunk_size)
    return jnp.sum(o * o)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_dense_quadratically():
  chunked = [_backward_temp_bytes('chunked', length) for length in (4096, 8192)]
  dense = [_backward_temp_bytes('dense', length) for length in (4096, 8192)]
  assert chunked[1] / chunked[0] < 2.6, chunked
  assert dense[1] / dense[0] > 3.2, dense
  assert chunked[1] < dense[1] / 10, (chunked, dense)


def test_chunked_takes_numpy_ids_outside_jit():
  # A host batch (numpy segment ids and positions) fed to an eager, unjitted model call.
  segment_ids, positions = packed([[9, 12, 5], [32]], 32)  # no chunk padding (it makes jnp)
  q, k, v = random_qkv(3, 2, 32, *HEADS['gqa'])
  o_numpy = chunked_attention(q, k, v, np.asarray(segment_ids), np.asarray(positions), window=0,
                              chunk_size=8)
  o_jax = chunked_attention(q, k, v, jnp.asarray(segment_ids), jnp.asarray(positions), window=0,
                            chunk_size=8)
  np.testing.assert_array_equal(o_numpy, o_jax)
