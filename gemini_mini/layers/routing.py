"""Top-k expert routing and its auxiliary losses, kept apart from dispatch and expert compute.

Router math follows Switch Transformer (k=1, Fedus et al. 2021), GShard (k=2, Lepikhin et al.
2020) and ST-MoE (z-loss, Zoph et al. 2022). Everything here runs in float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.param import fan_in_init, flatten_tokens, param


class Router(nnx.Module):
  """Linear router: ``x_BTD -> logits_BTE`` in float32 (bfloat16 logits route noisily)."""

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs):
    self.w_DE = param(rngs, fan_in_init(d_model), (d_model, num_experts), ('embed', None))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    logits_XE = jnp.einsum('XD,DE->XE', flatten_tokens(x_BTD).astype(jnp.float32), self.w_DE[...])
    return logits_XE.reshape(*x_BTD.shape[:-1], -1)


RENORMALIZE = ('when_k_above_1', 'always', 'never')


def top_k_routing(logits_BTE: jax.Array, k: int, renormalize: str = 'when_k_above_1',
                  ) -> tuple[jax.Array, jax.Array]:
  """The ``k`` most probable experts of each token and their combine weights.

  Returns ``experts_BTR`` (int32, most probable first) and ``weights_BTR`` (float32), the
  router probabilities of the chosen experts, renormalised to sum to one as ``renormalize``
  says:

  * ``when_k_above_1`` (gemini_mini's rule): with k = 1 the weight is the probability itself
    (Switch), so the task loss trains the router; with k > 1 the k are renormalised (GShard);
  * ``always``: renormalised even at k = 1, where every weight is then 1 (Mixtral);
  * ``never``: the raw probabilities (OLMoE and Qwen-MoE's ``norm_topk_prob: false``).
  """
  if renormalize not in RENORMALIZE:
    raise ValueError(f'unknown renormalize rule {renormalize!r}; choose one of {RENORMALIZE}')
  probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
  weights_BTR, experts_BTR = jax.lax.top_k(probs_BTE, k)
  if renormalize == 'always' or (renormalize == 'when_k_above_1' and k > 1):
    weights_BTR = weights_BTR / weights_BTR.sum(-1, keepdims=True)
  return experts_BTR.astype(jnp.int32), weights_BTR


def masked_mean(x_BT: jax.Array, valid_BT: jax.Array) -> jax.Array:
  return jnp.sum(x_BT * valid_BT) / jnp.maximum(jnp.sum(valid_BT), 1)


def expert_load(experts_BTR: jax.Array, valid_BT: jax.Array, num_experts: int) -> jax.Array:
  """``load_E``: the fraction of valid routed slots sent to each expert (sums to 1)."""
  onehot_BTE = jax.nn.one_hot(experts_BTR, num_experts).sum(-2)  # k-hot over chosen experts
  return jax.vmap(masked_mean, in_axes=(-1, None))(onehot_BTE, valid_BT) / experts_BTR.shape[-1]


def load_balance_loss(logits_BTE: jax.Array, experts_BTR: jax.Array,
                      valid_BT: jax.Array) -> jax.Array:
  """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` over valid tokens.

  ``f_e`` is the fraction of routed slots sent to expert e (``expert_load``; not
  differentiable), ``P_e`` the mean router probability of e. It is 1.0 for perfectly uniform
  routing whatever k, and grows as load concentrates.
  """
  num_experts = logits_BTE.shape[-1]
  probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
  mean_prob_E = jax.vmap(masked_mean, in_axes=(-1, None))(probs_BTE, valid_BT)
  load_E = jax.lax.stop_gradient(expert_load(experts_BTR, valid_BT, num_experts))
  return num_experts * jnp.sum(load_E * mean_prob_E)


def router_z_loss(logits_BTE: jax.Array, valid_BT: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over valid tokens of ``logsumexp(logits)**2``; keeps logits small."""
  return masked_mean(jax.nn.logsumexp(logits_BTE, axis=-1) ** 2, valid_BT)
