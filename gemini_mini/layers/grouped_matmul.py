"""Grouped matmul: consecutive row blocks of ``x`` multiplied by their group's matrix.

``y[rows of group g] = x[rows of group g] @ w[g]``, rows sorted by group, the core of the MoE
dropless dispatch. Two implementations (``Implementation``); the MoE takes one as a
constructor argument, by default the platform's (``Implementation.default()``):

* ``RAGGED_DOT``: ``jax.lax.ragged_dot``, for GPU and TPU. On CPU it lowers to a masked dense
  matmul against every group (E times the work). On GPU it was slower than the capacity
  dispatch's one batched einsum (docs/benchmarks.md#dropless-on-a-gpu), so GPU presets use capacity.
* ``TILED``: for CPU. Rows are laid out so that every group size is a multiple of the tile;
  a loop takes one tile at a time and multiplies it by its group's matrix, up to the last
  tile in use (the rows may be a loose static bound). The backward pass is written by hand so
  the weight gradient accumulates in place, one tile at a time, instead of materialising a
  full ``[E, I, O]`` zero-padded update per tile.

Rows after the last group (``sum(group_sizes) <= W``) give zeros in both. Both compute in
``x``'s dtype (``w`` is cast to it), the tiled one through ``layers.matmul.weight_einsum``
(float32 accumulation), with the weight gradient in ``w``'s dtype.

Both accept a quantized ``w`` (a ``qwix.QArray``, for inference): ``RAGGED_DOT`` through
``qwix.ragged_dot``, ``TILED`` by taking each tile's group of the ``QArray`` (its scales keep
the expert axis) into ``weight_einsum``, without the hand-written backward pass. An
``Observed`` weight reports the rows and group sizes, then multiplies as a float one.
"""

import enum

import jax
import jax.numpy as jnp
import qwix

from gemini_mini.layers.matmul import Observed, weight_einsum


class Implementation(enum.Enum):
  RAGGED_DOT = 'ragged_dot'
  TILED = 'tiled'

  @property
  def tile_size(self) -> int:
    """Rows per tile the MoE pads each group to: big enough for an efficient CPU matmul
    (tiled), small enough to waste little padding."""
    return 128 if self is Implementation.TILED else 8

  @classmethod
  def default(cls) -> 'Implementation':
    return cls.TILED if jax.default_backend() == 'cpu' else cls.RAGGED_DOT


def grouped_matmul(x_WI: jax.Array, w_EIO: jax.Array | qwix.QArray, group_sizes_E: jax.Array,
                   implementation: Implementation) -> jax.Array:
  """``y_WO``; for ``TILED``, W and every group size must be multiples of its tile size."""
  if isinstance(w_EIO, Observed):
    w_EIO.observe('WI,EIO->WO', x_WI, group_sizes_E)
    w_EIO = w_EIO.w
  quantized = isinstance(w_EIO, qwix.QArray)
  if implementation is Implementation.RAGGED_DOT:
    ragged_dot = qwix.ragged_dot if quantized else jax.lax.ragged_dot
    return ragged_dot(x_WI, w_EIO.astype(x_WI.dtype), group_sizes_E.astype(jnp.int32))
  if implementation is not Implementation.TILED:
    raise ValueError(f'unknown grouped matmul {implementation!r}; choose one of '
                     f'{list(Implementation)}')
  tile = implementation.tile_size
  num_rows = x_WI.shape[0]
  if num_rows % tile:
    raise ValueError(f'tiled grouped matmul needs rows ({num_rows}) to be a multiple of {tile}')
  num_tiles = num_rows // tile
  group_ends_E = jnp.cumsum(group_sizes_E)
  tile_starts_n = jnp.arange(num_tiles) * tile
  tile_group_n = jnp.minimum(jnp.searchsorted(group_ends_E, tile_starts_n, side='right'),
                             w_EIO.shape[0] - 1).astype(jnp.int32)
  num_used = jnp.sum(tile_starts_n < group_ends_E[-1])  # the used tiles come first
  x_ncI = x_WI.reshape(num_tiles, tile, x_WI.shape[1])
  tiled_matmul = _tiled_forward if quantized else _tiled_matmul
  y_ncO = tiled_matmul(x_ncI, w_EIO, tile_group_n, num_used)
  return y_ncO.reshape(num_rows, w_EIO.shape[2])


def _tile_loop(fn, out_shape, dtype, num_used, *operands_n):
  """``out[n] = fn(*operands_n[n])`` for the first ``num_used`` tiles, zeros after. The loop
  stops at the last used tile: a static bound on the rows can leave most tiles unused."""
  def one_tile(n, out):
    return out.at[n].set(fn(*(operand[n] for operand in operands_n)))
  num_tiles = operands_n[0].shape[0]
  return jax.lax.fori_loop(0, num_used, one_tile, jnp.zeros((num_tiles, *out_shape), dtype))


def _tiled_forward(x_ncI, w_EIO, tile_group_n, num_used):
  out_shape, dtype = (x_ncI.shape[1], w_EIO.shape[2]), x_ncI.dtype
  matmul = lambda x_cI, g: weight_einsum('cI,IO->cO', x_cI, w_EIO[g], dtype)
  return _tile_loop(matmul, out_shape, dtype, num_used, x_ncI, tile_group_n)


_tiled_matmul = jax.custom_vjp(_tiled_forward)


def _tiled_matmul_fwd(x_ncI, w_EIO, tile_group_n, num_used):
  return _tiled_matmul(x_ncI, w_EIO, tile_group_n, num_used), (x_ncI, w_EIO, tile_group_n,
                                                               num_used)


def _tiled_matmul_bwd(residuals, dy_ncO):
  x_ncI, w_EIO, tile_group_n, num_used = residuals
  dy_ncO = dy_ncO.astype(x_ncI.dtype)
  matmul = lambda dy_cO, g: weight_einsum('cO,IO->cI', dy_cO, w_EIO[g], x_ncI.dtype)
  dx_ncI = _tile_loop(matmul, x_ncI.shape[1:], x_ncI.dtype, num_used, dy_ncO, tile_group_n)

  def accumulate(n, dw_EIO):  # in place: the loop carry is updated at one group's slice
    update_IO = jnp.einsum('cI,cO->IO', x_ncI[n], dy_ncO[n], preferred_element_type=jnp.float32)
    return dw_EIO.at[tile_group_n[n]].add(update_IO)

  dw_EIO = jax.lax.fori_loop(0, num_used, accumulate, jnp.zeros(w_EIO.shape, jnp.float32))
  return dx_ncI, dw_EIO.astype(w_EIO.dtype), None, None


_tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)
