"""Tests for ``apply_rope`` against an explicit per-pair rotation written as a loop, and for
``similar_token_reach`` against hand-computed margins and ``apply_rope``'s own scores."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.layers import apply_rope, similar_token_reach

WAVELENGTH = 10_000.0


def reference_rope(x_BTNH, positions_BT, max_wavelength):
  """Rotates pair ``(x[i], x[i + H/2])`` by ``position * max_wavelength ** (-2i / H)``."""
  x_BTNH = np.asarray(x_BTNH, np.float64)
  batch, length, heads, head_dim = x_BTNH.shape
  half = head_dim // 2
  out = np.zeros_like(x_BTNH)
  for b in range(batch):
    for t in range(length):
      for n in range(heads):
        for i in range(half):
          angle = positions_BT[b, t] * max_wavelength ** (-2.0 * i / head_dim)
          rotation = np.array([[math.cos(angle), -math.sin(angle)],
                               [math.sin(angle), math.cos(angle)]])
          pair = np.array([x_BTNH[b, t, n, i], x_BTNH[b, t, n, i + half]])
          out[b, t, n, i], out[b, t, n, i + half] = rotation @ pair
  return out


def rope_scores(q_H, k_H, q_positions, k_positions):
  """``scores[i, j] = rope(q at q_positions[i]) . rope(k at k_positions[j])``."""
  rotate = lambda x_H, positions: np.asarray(apply_rope(
      jnp.broadcast_to(jnp.asarray(x_H, jnp.float32), (1, len(positions), 1, len(x_H))),
      jnp.asarray(positions, jnp.int32)[None], WAVELENGTH))[0, :, 0]
  return rotate(q_H, q_positions) @ rotate(k_H, k_positions).T


@pytest.mark.parametrize('shape', [(2, 5, 3, 8), (1, 7, 1, 16)])
def test_matches_numpy_loop(shape):
  rng = np.random.default_rng(0)
  x_BTNH = rng.normal(size=shape).astype(np.float32)
  positions_BT = rng.integers(0, 50, size=shape[:2]).astype(np.int32)
  y_BTNH = apply_rope(jnp.asarray(x_BTNH), jnp.asarray(positions_BT), WAVELENGTH)
  assert y_BTNH.shape == shape and y_BTNH.dtype == jnp.float32
  np.testing.assert_allclose(y_BTNH, reference_rope(x_BTNH, positions_BT, WAVELENGTH),
                             atol=1e-5, rtol=1e-4)


def test_hand_computed_rotations():
  # H = 2: one pair with frequency 1, so [1, 0] at position p becomes [cos p, sin p].
  x_BTNH = jnp.broadcast_to(jnp.array([1.0, 0.0]), (1, 3, 1, 2))
  y = apply_rope(x_BTNH, jnp.array([[0, 1, 2]]), WAVELENGTH)
  np.testing.assert_allclose(y[0, :, 0], [[1, 0], [math.cos(1), math.sin(1)],
                                          [math.cos(2), math.sin(2)]], atol=1e-6)
  # H = 4, wavelength 100: pair 1 is (x[1], x[3]) with frequency 100 ** (-2/4) = 0.1.
  y = apply_rope(jnp.array([[[[0.0, 1.0, 0.0, 0.0]]]]), jnp.array([[3]]), 100.0)
  np.testing.assert_allclose(y[0, 0, 0], [0, math.cos(0.3), 0, math.sin(0.3)], atol=1e-6)


def test_scores_depend_only_on_relative_position_hand_checked():
  # H = 2, q = k = [1, 0]: the score of query position p and key position s is cos(p - s).
  q_positions, k_positions = [0, 3, 5, 9, 20], [0, 2, 6, 9, 17]
  scores = rope_scores([1.0, 0.0], [1.0, 0.0], q_positions, k_positions)
  expected = np.cos(np.subtract.outer(q_positions, k_positions))
  np.testing.assert_allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize('offset', [1, 5, 17, 40])
def test_shifting_both_positions_keeps_scores(offset):
  rng = np.random.default_rng(offset)
  q_H, k_H = rng.normal(size=(2, 16))
  q_positions = np.array([0, 1, 4, 9, 12])
  k_positions = np.array([0, 2, 3, 9, 11, 13])
  scores = rope_scores(q_H, k_H, q_positions, k_positions)
  shifted = rope_scores(q_H, k_H, q_positions + offset, k_positions + offset)
  np.testing.assert_allclose(shifted, scores, atol=1e-5, rtol=1e-4)
  # Not trivially true: the scores do change with the relative position.
  assert np.ptp(scores) > 0.1
  # And the same relative distance gives the same score wherever it sits.
  np.testing.assert_allclose(rope_scores(q_H, k_H, [3 + offset], [1 + offset]),
                             rope_scores(q_H, k_H, [2], [0]), atol=1e-5, rtol=1e-4)


def test_position_zero_is_identity():
  x_BTNH = np.random.default_rng(0).normal(size=(2, 4, 3, 8)).astype(np.float32)
  y_BTNH = apply_rope(jnp.asarray(x_BTNH), jnp.zeros((2, 4), jnp.int32), WAVELENGTH)
  np.testing.assert_array_equal(y_BTNH, x_BTNH)


def test_norm_is_preserved():
  rng = np.random.default_rng(0)
  x_BTNH = rng.normal(size=(2, 6, 3, 16)).astype(np.float32)
  positions_BT = rng.integers(0, 1000, size=(2, 6))
  y_BTNH = apply_rope(jnp.asarray(x_BTNH), jnp.asarray(positions_BT), WAVELENGTH)
  np.testing.assert_allclose(np.linalg.norm(y_BTNH, axis=-1), np.linalg.norm(x_BTNH, axis=-1),
                             rtol=1e-5)


def test_keeps_bfloat16_dtype():
  x_BTNH = jnp.ones((1, 3, 2, 4), jnp.bfloat16)
  assert apply_rope(x_BTNH, jnp.arange(3)[None], WAVELENGTH).dtype == jnp.bfloat16


def test_odd_head_dim_raises():
  with pytest.raises(ValueError, match='even head dim, got 7'):
    apply_rope(jnp.ones((1, 2, 1, 7)), jnp.zeros((1, 2), jnp.int32), WAVELENGTH)


def test_similar_token_reach_by_hand():
  # H = 2: the margin is cos(m), first negative at m = 2 (cos 1 = 0.54, cos 2 = -0.42).
  assert similar_token_reach(2, WAVELENGTH, 100) == 2
  assert similar_token_reach(2, WAVELENGTH, 2) == 2   # [1, 2) holds no negative margin
  # H = 4, wavelength 100: cos(m) + cos(0.1 m) is 1.53, 0.56, -0.035 at m = 1, 2, 3.
  assert similar_token_reach(4, 100.0, 100) == 3


@pytest.mark.parametrize('head_dim, max_wavelength', [(16, 10_000.0), (64, 10_000.0),
                                                      (64, 500_000.0)])
def test_similar_token_reach_matches_rope_scores(head_dim, max_wavelength):
  # An all-ones query at position m against an all-ones key at 0 scores 2 * the margin.
  limit = 12_000
  ones_BTNH = jnp.ones((1, limit, 1, head_dim), jnp.float32)
  rotated_T = np.asarray(apply_rope(ones_BTNH, jnp.arange(limit)[None], max_wavelength))[0, :, 0]
  scores_T = rotated_T.astype(np.float64) @ np.ones(head_dim)
  negative = np.flatnonzero(scores_T[1:] < 0) + 1   # distances m >= 1 with a negative score
  first_negative = int(negative[0]) if negative.size else limit
  assert similar_token_reach(head_dim, max_wavelength, limit) == first_negative
