"""Where a MoE's routed slots go: rows of expert buffers, and gathers along them.

Each token has ``k`` routed slots (``experts_XR``). A layout places slots in rows of expert
buffers, the experts run on their rows, and each token sums its slots' outputs. A layout is
two index maps, ``row_of_slot_XR`` (the sentinel ``W`` for a dropped or padding slot) and its
inverse ``slot_of_row_W`` (the sentinel ``X * R`` for an empty row); ``Rows.gather`` and
``Rows.combine`` move data along them with gathers in the forward and the backward pass
(XLA:CPU's scatter-add is slow).

Slots take places within their expert in token order: token t's k slots before token t+1's.
A slot's place depends only on its own and earlier tokens, so when capacity drops slots, no
token's output depends on a later token.

``Layout`` names the four layouts; ``choose_layout`` picks one, the same way on every platform
given the grouped matmul's tile size.
"""

import dataclasses
import enum

import jax
import jax.numpy as jnp


class Layout(enum.Enum):
  """How routed slots become expert rows.

  ``CAPACITY``: each expert takes ``C`` rows per sequence; slots past them are dropped.
  ``EVERY_TOKEN``: ``C = X``, room for every token at every expert (dropless): the smallest
  layout when tokens are few. ``SHARE_AND_TILES``: each expert's even share ``X k / E`` in
  ``[E, C]`` rows, the rest in overflow rows padded to the grouped matmul's tile (dropless).
  ``PER_SLOT``: no buffer; a loop over the slots reads each one's expert weights in place
  (decoding a row or two, bound by reading weights).
  """
  CAPACITY = 'capacity'
  EVERY_TOKEN = 'every_token'
  SHARE_AND_TILES = 'share_and_tiles'
  PER_SLOT = 'per_slot'


def choose_layout(dispatch: str, num_tokens: int, experts_per_token: int, num_experts: int,
                  tile_size: int) -> Layout:
  """``CAPACITY`` for the capacity dispatch. For dropless: ``PER_SLOT`` when the slots need
  at most half the experts' weights (``2 X k <= E``), else the smaller buffer of
  ``EVERY_TOKEN`` (``E X`` rows) and ``SHARE_AND_TILES`` (at most ``X k + E (tile - 1)``)."""
  if dispatch == 'capacity':
    return Layout.CAPACITY
  if 2 * num_tokens * experts_per_token <= num_experts:
    return Layout.PER_SLOT
  tiled_rows = num_tokens * experts_per_token + num_experts * (tile_size - 1)
  return Layout.EVERY_TOKEN if num_experts * num_tokens <= tiled_rows else Layout.SHARE_AND_TILES


@jax.custom_vjp
def take_rows(x, index, inverse):
  """``y[j] = x[index[j]]``; an index equal to ``len(x)`` reads a zero row.

  ``inverse[i]`` lists the positions j with ``index[j] == i`` (at most ``inverse.shape[1]``),
  padded with ``len(y)``. The backward pass gathers along it and sums.
  """
  return _gather_or_zero(x, index)


def _gather_or_zero(x, index):
  return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])[index]


take_rows.defvjp(lambda x, index, inverse: (_gather_or_zero(x, index), inverse),
                 lambda inverse, dy: (_gather_or_zero(dy, inverse).sum(1), None, None))


def rank_in_expert(experts_XR: jax.Array, valid_X: jax.Array, num_experts: int):
  """Each slot's place among its expert's slots, in token order (token t's slots before
  token t+1's), and each expert's slot count. Invalid tokens take no place and are not
  counted. Returns ``rank_XR`` (int32) and ``count_E``."""
  onehot_XRE = (jax.nn.one_hot(experts_XR, num_experts, dtype=jnp.int32)
                * valid_X[:, None, None])
  rank_XRE = jnp.cumsum(onehot_XRE.reshape(-1, num_experts), axis=0).reshape(onehot_XRE.shape)
  return jnp.sum((rank_XRE - 1) * onehot_XRE, axis=-1), onehot_XRE.sum((0, 1))


@dataclasses.dataclass(frozen=True)
class Rows:
  """A layout's index maps. Rows ``[0, E * per_expert)`` are an ``[E, per_expert]`` buffer;
  with ``overflow_E`` the rest hold each expert's overflow, ``overflow_E[e]`` rows (a multiple
  of the tile), expert after expert."""

  row_of_slot_XR: jax.Array
  slot_of_row_W: jax.Array
  per_expert: int
  overflow_E: jax.Array | None = None

  @classmethod
  def invert(cls, row_of_slot_XR, num_rows, per_expert, overflow_E=None) -> 'Rows':
    num_slots = row_of_slot_XR.size
    slot_of_row_W = jnp.full((num_rows,), num_slots, jnp.int32).at[row_of_slot_XR.ravel()].set(
        jnp.arange(num_slots, dtype=jnp.int32), mode='drop')
    return cls(row_of_slot_XR, slot_of_row_W, per_expert, overflow_E)

  @property
  def kept_XR(self) -> jax.Array:
    return self.row_of_slot_XR < self.slot_of_row_W.shape[0]

  def gather(self, x_XD: jax.Array) -> jax.Array:
    """``x_WD``: each row's token (zero for an empty row)."""
    token_of_row_W = self.slot_of_row_W // self.row_of_slot_XR.shape[1]
    return take_rows(x_XD, token_of_row_W, self.row_of_slot_XR)

  def combine(self, y_WD: jax.Array, weights_XR: jax.Array) -> jax.Array:
    """``y_XD``: each token's slot outputs (zero where dropped), weighted and summed."""
    y_XRD = take_rows(y_WD, self.row_of_slot_XR.ravel(), self.slot_of_row_W[:, None]).reshape(
        *self.row_of_slot_XR.shape, -1)
    return jnp.einsum('XRD,XR->XD', y_XRD, weights_XR.astype(y_XRD.dtype))


def capacity_rows(experts_BTR: jax.Array, valid_BT: jax.Array, num_experts: int,
                  capacity: int) -> Rows:
  """``capacity`` rows per expert for each of the B sequences, filled in token order. Each
  expert's buffer holds its rows of every sequence, ``[E, B * C]``, so the expert einsums run
  once over all sequences (under ``vmap`` over sequences, XLA:CPU transposed the weight
  gradients' operands)."""
  batch, length, k = experts_BTR.shape
  rank_BTR, _ = jax.vmap(rank_in_expert, in_axes=(0, 0, None))(experts_BTR, valid_BT,
                                                                num_experts)
  per_expert = batch * capacity
  row_BTR = (experts_BTR * per_expert + jnp.arange(batch)[:, None, None] * capacity + rank_BTR)
  kept_BTR = valid_BT[..., None] & (rank_BTR < capacity)
  num_rows = num_experts * per_expert
  row_of_slot_XR = jnp.where(kept_BTR, row_BTR, num_rows).reshape(batch * length, k)
  return Rows.invert(row_of_slot_XR, num_rows, per_expert)


def share_and_tile_rows(experts_XR: jax.Array, valid_X: jax.Array, num_experts: int,
                        tile_size: int) -> Rows:
  """Each expert's first ``C = X k / E`` slots (the even share) in ``[E, C]`` rows; the
  slots past them in overflow rows, each expert's padded to ``tile_size``. The overflow totals
  at most ``X k - C`` slots plus each expert's padding: a static bound on the rows."""
  num_slots = experts_XR.size
  rank_XR, count_E = rank_in_expert(experts_XR, valid_X, num_experts)
  share = num_slots // num_experts
  overflow_E = -(-jnp.maximum(count_E - share, 0) // tile_size) * tile_size
  overflow_start_E = num_experts * share + jnp.cumsum(overflow_E) - overflow_E
  overflow_rows = -(-(num_slots - share + num_experts * (tile_size - 1)) // tile_size) * tile_size
  num_rows = num_experts * share + overflow_rows
  row_of_slot_XR = jnp.where(
      valid_X[:, None],
      jnp.where(rank_XR < share, experts_XR * share + rank_XR,
                overflow_start_E[experts_XR] + rank_XR - share),
      num_rows)
  return Rows.invert(row_of_slot_XR, num_rows, share, overflow_E)
