"""Tests for the quantized matmuls: each equals the float one of the dequantized weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from gemini_mini.layers.grouped_matmul import Implementation, grouped_matmul
from gemini_mini.layers.matmul import weight_einsum
from gemini_mini.quant import rtn

SPECS = [  # as the layers call weight_einsum: spec, x shape, w shape, axes, contract, group
    ('XD,DNH->XNH', (6, 32), (32, 4, 8), ('embed', 'heads', 'head_dim'), ('embed',), 16),
    ('XNH,NHD->XD', (6, 4, 8), (4, 8, 32), ('heads', 'head_dim', 'embed'),
     ('heads', 'head_dim'), 16),
    ('XD,DF->XF', (6, 32), (32, 24), ('embed', 'mlp'), ('embed',), 32),
    ('ECD,EDF->ECF', (3, 5, 32), (3, 32, 24), ('expert', 'embed', 'mlp'), ('embed',), 16),
    ('I,IO->O', (32,), (32, 24), ('embed', 'mlp'), ('embed',), 8),
]


def _quantized(shape, axes, contract, group, seed=0):
  w = jax.random.normal(jax.random.key(seed), shape)
  return rtn.quantize(w, 4, group, axes, contract, 'w')


@pytest.mark.parametrize('spec, x_shape, w_shape, axes, contract, group', SPECS)
def test_int4_weight_einsum_equals_the_float_einsum_of_the_dequantized_weight(
    spec, x_shape, w_shape, axes, contract, group):
  x = jax.random.normal(jax.random.key(1), x_shape)
  q = _quantized(w_shape, axes, contract, group)
  expected = np.einsum(spec, np.asarray(x, np.float64), np.asarray(qwix.dequantize(q), np.float64))
  y = jax.jit(lambda x, q: weight_einsum(spec, x, q, jnp.float32))(x, q)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('implementation', list(Implementation))
def test_grouped_matmul_with_an_int4_weight_equals_a_loop_over_groups(implementation):
  tile = implementation.tile_size
  sizes = [2 * tile, 0, tile]
  x_WI = jax.random.normal(jax.random.key(2), (4 * tile, 32))
  q = _quantized((3, 32, 24), ('expert', 'embed', 'mlp'), ('embed',), 16)
  y_WO = jax.jit(lambda x, q, s: grouped_matmul(x, q, s, implementation))(
      x_WI, q, jnp.asarray(sizes, jnp.int32))
  w_EIO = np.asarray(qwix.dequantize(q), np.float64)
  expected, start = np.zeros(y_WO.shape), 0
  for g, size in enumerate(sizes):
    expected[start:start + size] = np.asarray(x_WI[start:start + size], np.float64) @ w_EIO[g]
    start += size
  np.testing.assert_allclose(y_WO, expected, rtol=1e-5, atol=1e-5)
