"""Mixture-of-experts feed-forward layer: route, dispatch, expert MLPs, combine, aux.

``MoE(x_BTD, valid_BT) -> (y_BTD, aux)``. Each token goes to its ``k`` most probable experts
(``routing.py``); its output is the weighted sum of their gated MLPs, plus an optional shared
expert every token uses. Two dispatches:

* ``capacity``: each expert takes at most ``C = ceil(capacity_factor * T * k / E)`` slots per
  sequence, in token order; the slots past them are dropped (they add nothing) and counted in
  ``aux['dropped']``. Token order keeps it causal: a later token never takes an earlier one's
  place. ``C`` follows the length of each call (``infer.generate`` says what that means for
  decoding).
* ``dropless``: every routed slot is computed.

``moe_layout.py`` lays the slots out as expert rows (``Layout``: which one and why). The
experts run one einsum over ``[E, C]`` rows, plus, for dropless overflow, the grouped matmul
(``grouped_matmul``, a constructor argument, by default the platform's).

``aux`` holds float32 scalars ``load_balance``, ``router_z`` and ``dropped`` (the fraction of
valid routed slots dropped), ``expert_load_E`` (fraction of routed slots per expert, dropped
ones included) and ``routed_BTE`` (how many of each token's slots went to each expert) for
per-group statistics by the caller.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers import moe_layout
from gemini_mini.layers.grouped_matmul import Implementation, grouped_matmul
from gemini_mini.layers.matmul import weight_einsum
from gemini_mini.layers.mlp import GatedMLP, gated_activation
from gemini_mini.layers.moe_layout import Layout
from gemini_mini.layers.param import fan_in_init, param
from gemini_mini.layers.routing import (
    Router, expert_load, load_balance_loss, masked_mean, router_z_loss, top_k_routing)

DISPATCHES = ('capacity', 'dropless')


class MoE(nnx.Module):
  """Top-k routed gated-MLP experts, optionally with a shared expert."""

  def __init__(
      self, d_model: int, d_ff: int, num_experts: int, experts_per_token: int, *,
      dispatch: str = 'capacity', capacity_factor: float = 1.25, shared_expert: bool = False,
      activation: str = 'gelu', renormalize: str = 'when_k_above_1',
      grouped_matmul: Implementation | None = None, dtype=jnp.float32, rngs: nnx.Rngs,
  ):
    if dispatch not in DISPATCHES:
      raise ValueError(f'unknown MoE dispatch {dispatch!r}; choose one of {DISPATCHES}')
    if not 1 <= experts_per_token <= num_experts:
      raise ValueError(f'experts_per_token ({experts_per_token}) must be in [1, num_experts '
                       f'({num_experts})]')
    self.num_experts = num_experts
    self.experts_per_token = experts_per_token
    self.dispatch = dispatch
    self.activation = activation
    self.renormalize = renormalize
    self.capacity_factor = capacity_factor
    self.grouped_matmul = grouped_matmul or Implementation.default()
    self.dtype = dtype
    self.router = Router(d_model, num_experts, rngs=rngs)
    shape_EDF, shape_EFD = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
    self.gate_EDF = param(rngs, fan_in_init(d_model), shape_EDF, ('expert', 'embed', 'mlp'),
                          contract=('embed',))
    self.up_EDF = param(rngs, fan_in_init(d_model), shape_EDF, ('expert', 'embed', 'mlp'),
                        contract=('embed',))
    self.down_EFD = param(rngs, fan_in_init(d_ff), shape_EFD, ('expert', 'mlp', 'embed'),
                          contract=('mlp',))
    self.shared = (GatedMLP(d_model, d_ff, activation=activation, dtype=dtype, rngs=rngs)
                   if shared_expert else None)

  def capacity(self, length: int) -> int:
    """Slots per expert per sequence of ``length`` tokens under capacity dispatch."""
    # round() first: 1.1 * 10 is 11.000000000000002 in floating point, which must not become 12.
    slots = round(self.capacity_factor * length * self.experts_per_token, 6)
    return math.ceil(slots / self.num_experts)

  def layout(self, num_tokens: int) -> Layout:
    return moe_layout.choose_layout(self.dispatch, num_tokens, self.experts_per_token,
                                    self.num_experts, self.grouped_matmul.tile_size)

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
    batch, length, d_model = x_BTD.shape
    if valid_BT is None:
      valid_BT = jnp.ones((batch, length), bool)
    logits_BTE = self.router(x_BTD)
    experts_BTR, weights_BTR = top_k_routing(logits_BTE, self.experts_per_token, self.renormalize)
    x_XD = x_BTD.astype(self.dtype).reshape(batch * length, d_model)
    experts_XR, weights_XR = (a.reshape(batch * length, -1) for a in (experts_BTR, weights_BTR))
    valid_X = valid_BT.reshape(-1)

    layout = self.layout(batch * length)
    if layout is Layout.PER_SLOT:
      y_XD = self._per_slot(x_XD, experts_XR, weights_XR * valid_X[:, None])
      kept_XR = jnp.ones(experts_XR.shape, bool)
    else:
      if layout is Layout.CAPACITY:
        rows = moe_layout.capacity_rows(experts_BTR, valid_BT, self.num_experts,
                                        self.capacity(length))
      elif layout is Layout.EVERY_TOKEN:
        rows = moe_layout.capacity_rows(experts_XR[None], valid_X[None], self.num_experts,
                                        batch * length)
      else:
        rows = moe_layout.share_and_tile_rows(experts_XR, valid_X, self.num_experts,
                                              self.grouped_matmul.tile_size)
      y_XD = rows.combine(self._experts_on_rows(rows.gather(x_XD), rows), weights_XR)
      kept_XR = rows.kept_XR
    y_BTD = y_XD.reshape(x_BTD.shape)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD.astype(self.dtype))

    valid_f = valid_BT.astype(jnp.float32)
    dropped_BT = jnp.sum(~kept_XR, axis=-1).reshape(batch, length) / self.experts_per_token
    aux = {
        'load_balance': load_balance_loss(logits_BTE, experts_BTR, valid_f),
        'router_z': router_z_loss(logits_BTE, valid_f),
        'dropped': masked_mean(dropped_BT, valid_f),
        'expert_load_E': expert_load(experts_BTR, valid_f, self.num_experts),
        'routed_BTE': jax.nn.one_hot(experts_BTR, self.num_experts).sum(-2) * valid_f[..., None],
    }
    return y_BTD, aux

  def _experts_on_rows(self, x_WD, rows: moe_layout.Rows):
    """Each expert's gated MLP on its rows: one einsum per matrix over the ``[E, C]`` buffer,
    then the grouped matmul over the overflow rows, if any."""
    num_buffer_rows = self.num_experts * rows.per_expert
    matmul = lambda spec, x, p: weight_einsum(spec, x, p[...], self.dtype)
    x_ECD = x_WD[:num_buffer_rows].reshape(self.num_experts, rows.per_expert, -1)
    hidden_ECF = gated_activation(matmul('ECD,EDF->ECF', x_ECD, self.gate_EDF),
                                  matmul('ECD,EDF->ECF', x_ECD, self.up_EDF), self.activation)
    y_WD = matmul('ECF,EFD->ECD', hidden_ECF, self.down_EFD).reshape(num_buffer_rows, -1)
    if rows.overflow_E is None:
      return y_WD
    grouped = lambda x, p: grouped_matmul(x, p[...], rows.overflow_E, self.grouped_matmul)
    x_overflow_WD = x_WD[num_buffer_rows:]
    hidden_WF = gated_activation(grouped(x_overflow_WD, self.gate_EDF),
                                 grouped(x_overflow_WD, self.up_EDF), self.activation)
    return jnp.concatenate([y_WD, grouped(hidden_WF, self.down_EFD)])

  def _per_slot(self, x_XD, experts_XR, weights_XR):
    """Each routed slot through its own expert, one slot at a time: each reads its expert's
    weights in place (gathering them into an ``[X, R, D, F]`` copy took twice as long). A
    quantized weight (``qwix.QArray``) is indexed in each of its arrays: the expert axis is
    kept whole in its scales."""
    def one_slot(slot):
      x_D, expert = slot
      def matmul(x_I, p):
        w_IO = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, expert, keepdims=False),
                            p[...])
        return weight_einsum('I,IO->O', x_I, w_IO, self.dtype)
      hidden_F = gated_activation(matmul(x_D, self.gate_EDF), matmul(x_D, self.up_EDF),
                                  self.activation)
      return matmul(hidden_F, self.down_EFD)
    slots = (jnp.repeat(x_XD, self.experts_per_token, axis=0), experts_XR.reshape(-1))
    y_XRD = jax.lax.map(one_slot, slots).reshape(*experts_XR.shape, -1)
    return jnp.einsum('XRD,XR->XD', y_XRD, weights_XR.astype(y_XRD.dtype))
