"""Tests for the grouped matmul: both implementations against a per-row loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.layers import grouped_matmul as gmm
from gemini_mini.layers.grouped_matmul import Implementation

TILE = Implementation.TILED.tile_size
D_IN, D_OUT = 5, 3


def _group_of_rows(group_sizes_E, num_rows):
  """Group index of each row, -1 for rows after the last group (a plain python loop)."""
  group_W = np.full(num_rows, -1)
  start = 0
  for g, size in enumerate(group_sizes_E):
    group_W[start:start + size] = g
    start += size
  return group_W


def _loop_reference(x_WI, w_EIO, group_sizes_E):
  """``y[r] = x[r] @ w[g]`` for row r of group g, one row at a time; zero past the groups."""
  x_WI, w_EIO = np.asarray(x_WI, np.float64), np.asarray(w_EIO, np.float64)
  y_WO = np.zeros((x_WI.shape[0], w_EIO.shape[2]))
  for r, g in enumerate(_group_of_rows(group_sizes_E, x_WI.shape[0])):
    if g >= 0:
      y_WO[r] = x_WI[r] @ w_EIO[g]
  return y_WO


def _masked_einsum(x_WI, w_EIO, group_sizes_E):
  """The same product as a dense masked einsum (for its jax autodiff gradients)."""
  group_W = _group_of_rows(group_sizes_E, x_WI.shape[0])
  mask_WE = jnp.asarray(group_W[:, None] == np.arange(w_EIO.shape[0])[None], x_WI.dtype)
  return jnp.einsum('WI,WE,EIO->WO', x_WI, mask_WE, w_EIO)


def _inputs(num_rows, num_groups, seed=0):
  rng = np.random.default_rng(seed)
  x_WI = jnp.asarray(rng.normal(size=(num_rows, D_IN)), jnp.float32)
  w_EIO = jnp.asarray(rng.normal(size=(num_groups, D_IN, D_OUT)), jnp.float32)
  dy_WO = jnp.asarray(rng.normal(size=(num_rows, D_OUT)), jnp.float32)
  return x_WI, w_EIO, dy_WO


def _check(implementation, group_sizes, num_rows):
  x_WI, w_EIO, dy_WO = _inputs(num_rows, len(group_sizes))
  sizes_E = jnp.asarray(group_sizes, jnp.int32)

  @jax.jit
  def loss_and_y(x_WI, w_EIO, sizes_E):  # sizes traced, as in the MoE
    y_WO = gmm.grouped_matmul(x_WI, w_EIO, sizes_E, implementation)
    return jnp.sum(y_WO * dy_WO), y_WO

  (_, y_WO), (dx_WI, dw_EIO) = jax.value_and_grad(loss_and_y, argnums=(0, 1), has_aux=True)(
      x_WI, w_EIO, sizes_E)
  assert y_WO.shape == (num_rows, D_OUT) and y_WO.dtype == jnp.float32
  np.testing.assert_allclose(y_WO, _loop_reference(x_WI, w_EIO, group_sizes), atol=1e-5,
                             rtol=1e-4)
  used = sum(group_sizes)
  np.testing.assert_array_equal(y_WO[used:], 0.0)  # rows after the last group: exactly zero

  ref_loss = lambda x, w: jnp.sum(_masked_einsum(x, w, group_sizes) * dy_WO)
  ref_dx_WI, ref_dw_EIO = jax.grad(ref_loss, argnums=(0, 1))(x_WI, w_EIO)
  # Gradients sum up to a few hundred products per entry: a looser atol for the summation order.
  np.testing.assert_allclose(dx_WI, ref_dx_WI, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(dw_EIO, ref_dw_EIO, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(dx_WI[used:], 0.0)
  for g, size in enumerate(group_sizes):
    if size == 0:
      np.testing.assert_array_equal(dw_EIO[g], 0.0)  # an empty group gets no gradient


# Group sizes that are multiples of the tiled tile: legal for both implementations.
TILED_CASES = [
    ([2 * TILE, 0, TILE, TILE], 6 * TILE),    # empty middle group, two unused tiles at the end
    ([0, 0, 2 * TILE, TILE], 3 * TILE),       # empty leading groups, all rows used
    ([TILE, 2 * TILE, 0, 0], 4 * TILE),       # empty trailing groups
    ([0, 0, 0, 0], 2 * TILE),                 # nothing routed: all zero
    ([3 * TILE], 3 * TILE),                   # a single group
]


@pytest.mark.parametrize('implementation', list(Implementation))
@pytest.mark.parametrize('group_sizes, num_rows', TILED_CASES)
def test_tile_multiple_groups_match_loop_reference(implementation, group_sizes, num_rows):
  _check(implementation, group_sizes, num_rows)


@pytest.mark.parametrize('group_sizes, num_rows', [
    ([3, 0, 5, 2], 13),   # empty group, three rows after the last group
    ([0, 7, 1, 0], 8),    # empty first and last groups, all rows used
    ([1, 1, 1, 1], 9),
])
def test_ragged_dot_arbitrary_groups_match_loop_reference(group_sizes, num_rows):
  _check(Implementation.RAGGED_DOT, group_sizes, num_rows)


def test_bfloat16_activations_float32_weights():
  """As the MoE layer calls it: bfloat16 rows, the float32 parameter. The output and the rows'
  gradient are bfloat16, the weight gradient float32; the tiled kernel accumulates in
  float32, so its weight gradient is the float64 one of the same bfloat16 operands."""
  x_WI, w_EIO, _ = _inputs(2 * TILE, 2)
  x_WI = x_WI.astype(jnp.bfloat16)
  w_EIO = w_EIO.astype(jnp.bfloat16).astype(jnp.float32)
  dy_WO = jnp.ones((2 * TILE, w_EIO.shape[2]), jnp.float32)
  sizes_E = jnp.asarray([TILE, 0], jnp.int32)
  for implementation in Implementation:
    loss = lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, sizes_E, implementation) * dy_WO)
    y_WO = gmm.grouped_matmul(x_WI, w_EIO, sizes_E, implementation)
    dx_WI, dw_EIO = jax.grad(loss, argnums=(0, 1))(x_WI, w_EIO)
    assert y_WO.dtype == dx_WI.dtype == jnp.bfloat16 and dw_EIO.dtype == jnp.float32
    x64, w64 = np.asarray(x_WI.astype(jnp.float32), np.float64), np.asarray(w_EIO, np.float64)
    # bfloat16 has an 8-bit mantissa: compare the bfloat16 results at its precision.
    np.testing.assert_allclose(np.asarray(y_WO, np.float32),
                               _loop_reference(x64, w64, [TILE, 0]), atol=5e-2, rtol=2e-2)
    dw_expected = np.zeros(w64.shape)
    dw_expected[0] = x64[:TILE].T @ np.ones((TILE, w64.shape[2]))
    tolerance = 1e-5 if implementation is Implementation.TILED else 5e-2
    np.testing.assert_allclose(dw_EIO, dw_expected, rtol=tolerance, atol=tolerance)


def test_bad_arguments_raise():
  x_WI, w_EIO, _ = _inputs(TILE + 1, 2)
  sizes_E = jnp.asarray([1, 0], jnp.int32)
  with pytest.raises(ValueError, match='unknown grouped matmul'):
    gmm.grouped_matmul(x_WI, w_EIO, sizes_E, 'einsum')
  with pytest.raises(ValueError, match='multiple'):
    gmm.grouped_matmul(x_WI, w_EIO, sizes_E, Implementation.TILED)


def test_default_implementation_follows_the_platform():
  expected = 'tiled' if jax.default_backend() == 'cpu' else 'ragged_dot'
  assert Implementation.default() is Implementation(expected)
