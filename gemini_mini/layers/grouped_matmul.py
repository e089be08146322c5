"""Grouped matmul: consecutive row blocks of ``x`` multiplied by their group's matrix.

``y[rows of group g] = x[rows of group g] @ w[g]``, rows sorted by group, the MoE dropless
path's core op. Two implementations, chosen by platform:

* ``ragged_dot``: ``jax.lax.ragged_dot``, for GPU and TPU. On CPU it lowers to a masked dense
  matmul against every group (E times the work). On an H200 with jax 0.11.2 it is no better:
  7.8x a dense MLP of the same useful FLOPs at E = 8 (``bench/moe.py``), so GPU presets use
  the ``capacity`` dispatch (docs/benchmarks.md).
* ``tiled``: for CPU. Rows are laid out so that every group size is a multiple of
  ``tile_size``; a loop takes one tile at a time and multiplies it by its group's matrix,
  up to the last tile in use (the rows may be a loose static bound).
  The backward pass is written by hand so the weight gradient accumulates in place, one tile
  at a time, instead of materialising a full ``[E, I, O]`` zero-padded update per tile.

Rows after the last group (``sum(group_sizes) <= M``) give zeros in both. Both compute in
``x``'s dtype (``w`` is cast to it), the tiled one through ``layers.matmul.weight_einsum``
(float32 accumulation), with the weight gradient in ``w``'s dtype.
"""

import jax
import jax.numpy as jnp

from gemini_mini.layers.matmul import weight_einsum

IMPLEMENTATIONS = ('ragged_dot', 'tiled')
# Rows per tile: big enough for an efficient CPU matmul, small enough to waste little padding.
TILE_SIZE = {'tiled': 128, 'ragged_dot': 8}


def default_implementation() -> str:
  return 'tiled' if jax.default_backend() == 'cpu' else 'ragged_dot'


def grouped_matmul(x_MI: jax.Array, w_EIO: jax.Array, group_sizes_E: jax.Array,
                   implementation: str) -> jax.Array:
  """``y_MO``; for 'tiled', M and every group size must be multiples of ``TILE_SIZE['tiled']``."""
  if implementation == 'ragged_dot':
    return jax.lax.ragged_dot(x_MI, w_EIO.astype(x_MI.dtype), group_sizes_E.astype(jnp.int32))
  if implementation != 'tiled':
    raise ValueError(f'unknown grouped matmul {implementation!r}; choose one of {IMPLEMENTATIONS}')
  tile = TILE_SIZE['tiled']
  num_rows = x_MI.shape[0]
  if num_rows % tile:
    raise ValueError(f'tiled grouped matmul needs rows ({num_rows}) to be a multiple of {tile}')
  num_tiles = num_rows // tile
  group_ends_E = jnp.cumsum(group_sizes_E)
  tile_starts = jnp.arange(num_tiles) * tile
  tile_group_n = jnp.minimum(jnp.searchsorted(group_ends_E, tile_starts, side='right'),
                             w_EIO.shape[0] - 1).astype(jnp.int32)
  num_used = jnp.sum(tile_starts < group_ends_E[-1])  # the used tiles come first
  x_nmI = x_MI.reshape(num_tiles, tile, x_MI.shape[1])
  y_nmO = _tiled_matmul(x_nmI, w_EIO, tile_group_n, num_used)
  return y_nmO.reshape(num_rows, w_EIO.shape[2])


def _tile_loop(fn, out_shape, dtype, num_used, *operands_n):
  """``out[n] = fn(*operands_n[n])`` for the first ``num_used`` tiles, zeros after. The loop
  stops at the last used tile: a static bound on the rows can leave most tiles unused."""
  def one_tile(n, out):
    return out.at[n].set(fn(*(operand[n] for operand in operands_n)))
  num_tiles = operands_n[0].shape[0]
  return jax.lax.fori_loop(0, num_used, one_tile, jnp.zeros((num_tiles, *out_shape), dtype))


@jax.custom_vjp
def _tiled_matmul(x_nmI, w_EIO, tile_group_n, num_used):
  out_shape, dtype = (x_nmI.shape[1], w_EIO.shape[2]), x_nmI.dtype
  matmul = lambda x_mI, g: weight_einsum('mI,IO->mO', x_mI, w_EIO[g], dtype)
  return _tile_loop(matmul, out_shape, dtype, num_used, x_nmI, tile_group_n)


def _tiled_matmul_fwd(x_nmI, w_EIO, tile_group_n, num_used):
  return _tiled_matmul(x_nmI, w_EIO, tile_group_n, num_used), (x_nmI, w_EIO, tile_group_n,
                                                               num_used)


def _tiled_matmul_bwd(residuals, dy_nmO):
  x_nmI, w_EIO, tile_group_n, num_used = residuals
  dy_nmO = dy_nmO.astype(x_nmI.dtype)
  matmul = lambda dy_mO, g: weight_einsum('mO,IO->mI', dy_mO, w_EIO[g], x_nmI.dtype)
  dx_nmI = _tile_loop(matmul, x_nmI.shape[1:], x_nmI.dtype, num_used, dy_nmO, tile_group_n)

  def accumulate(n, dw_EIO):  # in place: the loop carry is updated at one group's slice
    update_IO = jnp.einsum('mI,mO->IO', x_nmI[n], dy_nmO[n], preferred_element_type=jnp.float32)
    return dw_EIO.at[tile_group_n[n]].add(update_IO)

  dw_EIO = jax.lax.fori_loop(0, num_used, accumulate, jnp.zeros(w_EIO.shape, jnp.float32))
  return dx_nmI, dw_EIO.astype(w_EIO.dtype), None, None


_tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)
