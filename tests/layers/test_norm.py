"""Tests for ``RMSNorm`` against a numpy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_mini.layers import RMSNorm


def reference_rmsnorm(x_D, scale_D, eps):
  """``x / sqrt(mean(x**2) + eps) * scale`` in float64."""
  x_D = np.asarray(x_D, np.float64)
  return x_D / np.sqrt(np.mean(x_D**2, axis=-1, keepdims=True) + eps) * np.asarray(scale_D)


@pytest.mark.parametrize('eps', [1e-6, 0.1])
def test_matches_numpy_formula(eps):
  rng = np.random.default_rng(0)
  norm = RMSNorm(16, eps=eps, rngs=nnx.Rngs(0))
  scale_D = rng.normal(size=16).astype(np.float32)
  norm.scale_D[...] = jnp.asarray(scale_D)
  x_BTD = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3.0
  y_BTD = norm(jnp.asarray(x_BTD))
  assert y_BTD.shape == x_BTD.shape and y_BTD.dtype == jnp.float32
  np.testing.assert_allclose(y_BTD, reference_rmsnorm(x_BTD, scale_D, eps), atol=1e-5, rtol=1e-4)


def test_hand_computed_values():
  # x = [3, 4]: mean(x**2) = 12.5, so with eps = 3.5 the divisor is sqrt(16) = 4.
  norm = RMSNorm(2, eps=3.5, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(norm(jnp.array([3.0, 4.0])), [0.75, 1.0], rtol=1e-6)
  # The scale multiplies each feature; a zero input stays zero (eps keeps it finite).
  norm.scale_D[...] = jnp.array([2.0, -1.0])
  np.testing.assert_allclose(norm(jnp.array([3.0, 4.0])), [1.5, -1.0], rtol=1e-6)
  np.testing.assert_array_equal(norm(jnp.zeros((3, 2))), np.zeros((3, 2)))


def test_scale_starts_at_one_with_logical_axis():
  norm = RMSNorm(8, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(norm.scale_D[...], np.ones(8, np.float32))
  assert norm.scale_D.get_metadata()['out_sharding'] == ('embed',)


def test_bfloat16_in_bfloat16_out_with_float32_statistics():
  # Wide rows with a large mean: statistics accumulated in bfloat16 would be off by more
  # than one bfloat16 ulp; float32 statistics give the exact answer rounded once to bfloat16.
  dim = 8192
  rng = np.random.default_rng(1)
  x_BD = jnp.asarray(rng.normal(size=(4, dim)) + 3.0, jnp.bfloat16)
  norm = RMSNorm(dim, rngs=nnx.Rngs(0))
  y_BD = jax.jit(lambda x: norm(x))(x_BD)
  assert y_BD.dtype == jnp.bfloat16
  expected = reference_rmsnorm(np.asarray(x_BD, np.float64), np.ones(dim), 1e-6)
  expected_bf16 = np.asarray(jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16), np.float64)
  y = np.asarray(y_BD, np.float64)
  ulp = np.spacing(np.abs(expected_bf16).astype(np.float32)) * 2.0**16  # bf16: 16 fewer bits
  assert np.all(np.abs(y - expected_bf16) <= ulp)
  assert np.mean(y == expected_bf16) > 0.99
