"""Mixture-of-experts feed-forward layer: top-k routing, dispatch, expert compute, combine.

``MoE(x_BTD, valid_BT) -> (y_BTD, aux)``. Each token goes to its ``k`` most probable experts
(``routing.py``); its output is the weighted sum of their gated MLPs, plus an optional shared
expert every token uses. Two dispatch implementations behind the one interface:

* ``capacity``: each expert takes at most ``C = ceil(capacity_factor * T * k / E)`` slots per
  sequence, filled first by every token's first choice, then by second choices (GShard
  priority), in token order; overflow slots are dropped (their weight contributes nothing)
  and counted in ``aux['dropped']``. Expert compute is one batched einsum over ``[E, C]``.
* ``dropless``: every routed slot is computed. Slots are placed in expert order (a counting
  sort): each expert's first ``X k / E`` (the even share) in an ``[E, C, D]`` buffer computed
  with one einsum, the rest in an overflow buffer, each expert's block padded to the grouped
  matmul's tile and multiplied with ``grouped_matmul`` (``jax.lax.ragged_dot`` on GPU/TPU, a
  tiled loop on CPU). With few
  tokens (decoding: one per row), the E tiles would be mostly padding; then it runs the
  capacity dispatch with room for every token at every expert (``C = X``), which can drop
  nothing and is smaller. With fewer routed slots than experts (decoding one or two rows),
  a loop over the slots multiplies each by its own expert's weights where they lie, so only
  the experts in use are read: a decoding step is bound by reading weights.
  ``dropless_buffer`` picks the layout.

Both dispatches reduce to the same two index maps between token slots and buffer rows,
``row_of_slot`` and ``slot_of_row``; ``take_rows`` moves data along them with gathers in
both the forward and the backward pass (XLA's scatter-add is slow on CPU).

``aux`` holds float32 scalars ``load_balance``, ``router_z`` and ``dropped`` (the fraction of
valid routed slots dropped), ``expert_load_E`` (fraction of routed slots per expert, dropped
ones included) and ``routed_BTE`` (how many of each token's slots went to each expert) for
per-group statistics by the caller.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers import grouped_matmul as gmm
from gemini_mini.layers.matmul import weight_einsum
from gemini_mini.layers.mlp import GatedMLP, gated_activation
from gemini_mini.layers.param import fan_in_init, param
from gemini_mini.layers.routing import (
    Router, expert_load, load_balance_loss, masked_mean, router_z_loss, top_k_routing)

DISPATCHES = ('capacity', 'dropless')


@jax.custom_vjp
def take_rows(x_XD: jax.Array, index_Y: jax.Array, inverse_XR: jax.Array) -> jax.Array:
  """``y[j] = x[index[j]]``; an index equal to ``X`` reads a zero row.

  ``inverse_XR`` lists, for each row i of ``x``, the (at most R) positions j with
  ``index[j] == i``, padded with ``Y``. The backward pass gathers along it and sums.
  """
  return _gather_or_zero(x_XD, index_Y)


def _gather_or_zero(x_XD, index):
  x_padded = jnp.concatenate([x_XD, jnp.zeros((1, x_XD.shape[1]), x_XD.dtype)])
  return x_padded[index]


def _take_rows_fwd(x_XD, index_Y, inverse_XR):
  return _gather_or_zero(x_XD, index_Y), inverse_XR


def _take_rows_bwd(inverse_XR, dy_YD):
  return _gather_or_zero(dy_YD, inverse_XR).sum(1), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def position_in_expert(experts_XR: jax.Array, valid_X: jax.Array, num_experts: int):
  """Rank of each routed slot among the slots of its expert, and each expert's slot count.

  Slots are ranked in priority order: all first choices in token order, then all second
  choices, ... Invalid tokens take no rank and are not counted. Returns ``rank_XR`` (int32)
  and ``count_E``.
  """
  onehot_RXE = jax.nn.one_hot(experts_XR.T, num_experts, dtype=jnp.int32) * valid_X[None, :, None]
  flat_onehot = onehot_RXE.reshape(-1, num_experts)
  rank_RXE = (jnp.cumsum(flat_onehot, axis=0) - 1).reshape(onehot_RXE.shape)
  rank_XR = jnp.sum(rank_RXE * onehot_RXE, axis=-1).T
  return rank_XR, flat_onehot.sum(0)


def _index_maps(row_of_slot_XR: jax.Array, num_rows: int):
  """The inverse map ``slot_of_row_M`` (sentinel X*R) of ``row_of_slot_XR`` (sentinel M)."""
  num_slots = row_of_slot_XR.size
  return jnp.full((num_rows,), num_slots, jnp.int32).at[row_of_slot_XR.ravel()].set(
      jnp.arange(num_slots, dtype=jnp.int32), mode='drop')


class MoE(nnx.Module):
  """Top-k routed gated-MLP experts, optionally with a shared expert."""

  def __init__(
      self, d_model: int, d_ff: int, num_experts: int, experts_per_token: int, *,
      dispatch: str = 'capacity', capacity_factor: float = 1.25, shared_expert: bool = False,
      dtype=jnp.float32, rngs: nnx.Rngs,
  ):
    if dispatch not in DISPATCHES:
      raise ValueError(f'unknown MoE dispatch {dispatch!r}; choose one of {DISPATCHES}')
    if not 1 <= experts_per_token <= num_experts:
      raise ValueError(f'experts_per_token ({experts_per_token}) must be in [1, num_experts '
                       f'({num_experts})]')
    self.num_experts = num_experts
    self.experts_per_token = experts_per_token
    self.dispatch = dispatch
    self.capacity_factor = capacity_factor
    self.dtype = dtype
    self.router = Router(d_model, num_experts, rngs=rngs)
    shape_EDF, shape_EFD = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
    self.gate_EDF = param(rngs, fan_in_init(d_model), shape_EDF, ('expert', 'embed', 'mlp'))
    self.up_EDF = param(rngs, fan_in_init(d_model), shape_EDF, ('expert', 'embed', 'mlp'))
    self.down_EFD = param(rngs, fan_in_init(d_ff), shape_EFD, ('expert', 'mlp', 'embed'))
    self.shared = GatedMLP(d_model, d_ff, dtype=dtype, rngs=rngs) if shared_expert else None

  def capacity(self, length: int) -> int:
    """Slots per expert per sequence of ``length`` tokens under capacity dispatch."""
    # round() first: 1.1 * 10 is 11.000000000000002 in floating point, which must not become 12.
    slots = round(self.capacity_factor * length * self.experts_per_token, 6)
    return math.ceil(slots / self.num_experts)

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
    batch, length, d_model = x_BTD.shape
    if valid_BT is None:
      valid_BT = jnp.ones((batch, length), bool)
    logits_BTE = self.router(x_BTD)
    experts_BTR, weights_BTR = top_k_routing(logits_BTE, self.experts_per_token)
    x_BTD = x_BTD.astype(self.dtype)

    flat = lambda a: a.reshape(batch * length, *a.shape[2:])
    args = flat(x_BTD), flat(experts_BTR), flat(weights_BTR), flat(valid_BT)
    if self.dispatch == 'capacity':
      y_XD, kept_XR = self._capacity_dispatch(*args, capacity=self.capacity(length),
                                              num_sequences=batch)
      y_BTD, kept_BTR = y_XD.reshape(x_BTD.shape), kept_XR.reshape(experts_BTR.shape)
    else:
      buffer = self.dropless_buffer(batch * length)
      if buffer == 'tiles':
        y_XD = self._dropless_dispatch(*args)
      elif buffer == 'slots':
        y_XD = self._slot_dispatch(*args)
      else:  # every token fits at every expert: nothing can be dropped
        y_XD = self._capacity_dispatch(*args, capacity=batch * length, num_sequences=1)[0]
      y_BTD, kept_BTR = y_XD.reshape(x_BTD.shape), jnp.ones(experts_BTR.shape, bool)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)

    valid_f = valid_BT.astype(jnp.float32)
    dropped_BT = jnp.sum(~kept_BTR, axis=-1) / self.experts_per_token
    aux = {
        'load_balance': load_balance_loss(logits_BTE, experts_BTR, valid_f),
        'router_z': router_z_loss(logits_BTE, valid_f),
        'dropped': masked_mean(dropped_BT, valid_f),
        'expert_load_E': expert_load(experts_BTR, valid_f, self.num_experts),
        'routed_BTE': jax.nn.one_hot(experts_BTR, self.num_experts).sum(-2) * valid_f[..., None],
    }
    return y_BTD, aux

  def dropless_buffer(self, num_tokens: int) -> str:
    """How dropless dispatch lays out ``num_tokens`` tokens' slots: ``'slots'`` (a loop
    over the ``X * k`` slots, each reading its expert's weights) when the slots need at most
    half of the E experts' weights (``2 X k <= E``), else the smaller of
    ``'tiles'`` (the even share and tiles of overflow, ``_dropless_dispatch``: at most ``X *
    k + E * (tile - 1)`` rows computed) and ``'tokens'`` (``[E, X]``: a row for every token
    at every expert)."""
    if 2 * num_tokens * self.experts_per_token <= self.num_experts:
      return 'slots'
    tile = gmm.TILE_SIZE[gmm.default_implementation()]
    tiled_rows = num_tokens * self.experts_per_token + self.num_experts * (tile - 1)
    return 'tokens' if self.num_experts * num_tokens <= tiled_rows else 'tiles'

  def _experts_on_buffer(self, x_ECD):
    """Each expert's gated MLP on its own ``C`` rows: ``[E, C, D] -> [E, C, D]``, one einsum
    for all experts per matrix."""
    matmul = lambda spec, x, p: weight_einsum(spec, x, p[...], self.dtype)
    hidden_ECF = gated_activation(matmul('ECD,EDF->ECF', x_ECD, self.gate_EDF),
                                  matmul('ECD,EDF->ECF', x_ECD, self.up_EDF))
    return matmul('ECF,EFD->ECD', hidden_ECF, self.down_EFD)

  def _capacity_dispatch(self, x_XD, experts_XR, weights_XR, valid_X, *, capacity: int,
                         num_sequences: int):
    """``y_XD`` and which routed slots were kept (``kept_XR``): ``capacity`` slots per expert
    in each of the ``num_sequences`` equal runs of tokens that ``X`` holds. Each expert's
    buffer holds its slots of every sequence, ``[E, S * C, D]``, so the expert einsums run
    once over all sequences (under ``vmap`` over sequences, XLA:CPU transposed the weight
    gradients' operands: 74 of a layer's 211 ms)."""
    num_experts, num_slots = self.num_experts, num_sequences * capacity
    length = x_XD.shape[0] // num_sequences
    by_sequence = lambda a: a.reshape(num_sequences, length, *a.shape[1:])
    rank_SLR, _ = jax.vmap(position_in_expert, in_axes=(0, 0, None))(
        by_sequence(experts_XR), by_sequence(valid_X), num_experts)
    rank_XR = rank_SLR.reshape(experts_XR.shape)
    sequence_X = jnp.arange(x_XD.shape[0]) // length
    kept_XR = valid_X[:, None] & (rank_XR < capacity)
    row_of_slot_XR = jnp.where(kept_XR, experts_XR * num_slots + sequence_X[:, None] * capacity
                               + rank_XR, num_experts * num_slots)
    slot_of_row = _index_maps(row_of_slot_XR, num_experts * num_slots)
    x_ECD = take_rows(x_XD, slot_of_row // self.experts_per_token, row_of_slot_XR).reshape(
        num_experts, num_slots, -1)
    y_ECD = self._experts_on_buffer(x_ECD)
    y_rows = y_ECD.reshape(num_experts * num_slots, -1)
    return self._combine(y_rows, row_of_slot_XR, slot_of_row, weights_XR), kept_XR

  def _dropless_dispatch(self, x_XD, experts_XR, weights_XR, valid_X):
    """All tokens of the batch at once (nothing is dropped, so grouping cannot matter).

    Each expert's first ``C = X k / E`` slots (the even share) go to an ``[E, C, D]`` buffer
    computed with one einsum, like the capacity dispatch; the slots past them go to an
    overflow buffer, each expert's padded to the grouped matmul's tile, computed with
    ``grouped_matmul``. Small matmuls are slow on CPU, so this is faster than tiling every
    slot (``bench/moe.py``), and it drops nothing."""
    implementation = gmm.default_implementation()
    tile = gmm.TILE_SIZE[implementation]
    num_experts, num_slots = self.num_experts, experts_XR.size
    rank_XR, count_E = position_in_expert(experts_XR, valid_X, num_experts)
    capacity = num_slots // num_experts
    shared_rows = num_experts * capacity
    overflow_E = -(-jnp.maximum(count_E - capacity, 0) // tile) * tile
    overflow_start_E = shared_rows + jnp.cumsum(overflow_E) - overflow_E
    # Static bound: the overflow totals at most num_slots - capacity, plus each expert's padding.
    overflow_rows = -(-(num_slots - capacity + num_experts * (tile - 1)) // tile) * tile
    num_rows = shared_rows + overflow_rows
    row_of_slot_XR = jnp.where(
        valid_X[:, None],
        jnp.where(rank_XR < capacity, experts_XR * capacity + rank_XR,
                  overflow_start_E[experts_XR] + rank_XR - capacity),
        num_rows)
    slot_of_row = _index_maps(row_of_slot_XR, num_rows)
    x_MD = take_rows(x_XD, slot_of_row // self.experts_per_token, row_of_slot_XR)
    y_ECD = self._experts_on_buffer(x_MD[:shared_rows].reshape(num_experts, capacity, -1))
    matmul = lambda x, p: gmm.grouped_matmul(x, p[...], overflow_E, implementation)
    x_OD = x_MD[shared_rows:]
    y_OD = matmul(gated_activation(matmul(x_OD, self.gate_EDF), matmul(x_OD, self.up_EDF)),
                  self.down_EFD)
    y_MD = jnp.concatenate([y_ECD.reshape(shared_rows, -1), y_OD])
    return self._combine(y_MD, row_of_slot_XR, slot_of_row, weights_XR)

  def _slot_dispatch(self, x_XD, experts_XR, weights_XR, valid_X):
    """Each routed slot through its own expert, one slot at a time: each reads its expert's
    weights in place (gathering them into an ``[X, R, D, F]`` copy took twice as long)."""
    def one_slot(slot):
      x_D, expert = slot
      def matmul(x_I, p):
        w_IO = jax.lax.dynamic_index_in_dim(p[...], expert, keepdims=False)
        return weight_einsum('I,IO->O', x_I, w_IO, self.dtype)
      hidden_F = gated_activation(matmul(x_D, self.gate_EDF), matmul(x_D, self.up_EDF))
      return matmul(hidden_F, self.down_EFD)
    x_SD = jnp.repeat(x_XD, self.experts_per_token, axis=0)  # S = X * R slots, token major
    y_SD = jax.lax.map(one_slot, (x_SD, experts_XR.reshape(-1)))
    y_XRD = y_SD.reshape(*experts_XR.shape, -1)
    weights_XR = weights_XR * valid_X[:, None]
    return jnp.einsum('XRD,XR->XD', y_XRD, weights_XR.astype(y_XRD.dtype))

  def _combine(self, y_rows_MD, row_of_slot_XR, slot_of_row_M, weights_XR):
    """``y_XD``: each token's expert outputs (zero where dropped), weighted and summed."""
    y_slots = take_rows(y_rows_MD, row_of_slot_XR.ravel(), slot_of_row_M[:, None])
    y_XRD = y_slots.reshape(*row_of_slot_XR.shape, -1)
    return jnp.einsum('XRD,XR->XD', y_XRD, weights_XR.astype(y_XRD.dtype))
