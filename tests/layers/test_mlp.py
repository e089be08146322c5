"""Tests for the gated MLP against the numpy formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_mini.layers import GatedMLP
from gemini_mini.layers.mlp import gated_activation

D, F = 8, 16


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _numpy_mlp(x, gate, up, down):
  """``(gelu_tanh(x gate) * (x up)) down`` in float64."""
  x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
  return (_gelu_tanh(x @ gate) * (x @ up)) @ down


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_gated_activation_is_tanh_gelu_times_up():
  gate, up = _x((3, F), 1) * 3, _x((3, F), 2)  # wide range: the tanh approximation differs
  np.testing.assert_allclose(gated_activation(gate, up), _gelu_tanh(np.asarray(gate)) * up,
                             atol=1e-6, rtol=1e-5)


def test_gated_mlp_matches_numpy_formula():
  mlp = GatedMLP(D, F, rngs=nnx.Rngs(0))
  x_BTD = _x((2, 3, D))
  y_BTD = mlp(x_BTD)
  assert y_BTD.shape == (2, 3, D) and y_BTD.dtype == jnp.float32
  expected = _numpy_mlp(x_BTD, mlp.gate_DF[...], mlp.up_DF[...], mlp.down_FD[...])
  np.testing.assert_allclose(y_BTD, expected, atol=1e-5, rtol=1e-4)


def test_silu_gated_mlp_matches_numpy_swiglu():
  # SwiGLU, Mixtral's FFN: (silu(x gate) * (x up)) down, silu(h) = h / (1 + exp(-h)).
  mlp = GatedMLP(D, F, activation='silu', rngs=nnx.Rngs(2))
  x_BTD = _x((2, 3, D), 5)
  x, g, u, d = (np.asarray(a, np.float64)
                for a in (x_BTD, mlp.gate_DF[...], mlp.up_DF[...], mlp.down_FD[...]))
  h = x @ g
  np.testing.assert_allclose(mlp(x_BTD), (h / (1 + np.exp(-h)) * (x @ u)) @ d, atol=1e-5,
                             rtol=1e-4)


def test_an_unknown_activation_is_refused():
  with pytest.raises(ValueError, match='silu'):
    GatedMLP(D, F, activation='relu', rngs=nnx.Rngs(0))


def test_gated_mlp_gradients_match_hand_derivative():
  # d/dx of sum(y * dy): with h = x W_g, u = x W_u and c = dy W_d^T,
  # dx = (c * u * gelu'(h)) W_g^T + (c * gelu(h)) W_u^T.
  mlp = GatedMLP(D, F, rngs=nnx.Rngs(1))
  x_BTD, dy_BTD = _x((2, 3, D), 3), _x((2, 3, D), 4)
  dx_BTD = jax.grad(lambda x: jnp.sum(mlp(x) * dy_BTD))(x_BTD)
  g, u, d = (np.asarray(p[...], np.float64) for p in (mlp.gate_DF, mlp.up_DF, mlp.down_FD))
  x, dy = np.asarray(x_BTD, np.float64), np.asarray(dy_BTD, np.float64)
  h, c = x @ g, dy @ d.T
  eps = 1e-6  # central difference of the scalar gelu, accurate to ~1e-10 in float64
  gelu_prime = (_gelu_tanh(h + eps) - _gelu_tanh(h - eps)) / (2 * eps)
  expected = (c * (x @ u) * gelu_prime) @ g.T + (c * _gelu_tanh(h)) @ u.T
  np.testing.assert_allclose(dx_BTD, expected, atol=1e-5, rtol=1e-4)


def test_bfloat16_activations_float32_params():
  mlp = GatedMLP(D, F, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x_BTD = _x((2, 3, D))
  y_BTD = mlp(x_BTD)
  assert y_BTD.dtype == jnp.bfloat16
  for p in (mlp.gate_DF, mlp.up_DF, mlp.down_FD):
    assert p[...].dtype == jnp.float32
  expected = _numpy_mlp(x_BTD, mlp.gate_DF[...], mlp.up_DF[...], mlp.down_FD[...])
  # bfloat16 keeps 8 mantissa bits: about 2-3 significant digits.
  np.testing.assert_allclose(np.asarray(y_BTD, np.float32), expected, atol=5e-2, rtol=5e-2)


def test_parameters_carry_logical_axis_names():
  mlp = GatedMLP(D, F, rngs=nnx.Rngs(0))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(mlp, nnx.Param)))
  assert tuple(specs['gate_DF']) == ('embed', 'mlp')
  assert tuple(specs['up_DF']) == ('embed', 'mlp')
  assert tuple(specs['down_FD']) == ('mlp', 'embed')
  assert mlp.gate_DF[...].shape == (D, F) and mlp.down_FD[...].shape == (F, D)
