"""The objectives of post-training as pure functions: reward model, DPO and PPO.

Positions follow the batch contract: ``loss_mask[t] = 1`` means the target ``t + 1`` is a
scored (model-turn) token, so ``logp_BT[t] = log pi(targets[t] | tokens[:t+1])`` is the
log-probability of one *action* of the policy and every per-token quantity here (rewards,
values, advantages, KL) lives on those positions. Masked means are token means over the whole
batch (each scored token weighs the same, whatever its reply's length). Ties in pairwise
accuracies count half: a scorer that cannot tell the two replies apart (DPO at its first step,
where the policy is the reference) then reads as chance, 0.5, not as always wrong.
"""

import jax
import jax.numpy as jnp



def _same_shape(**arrays):
  shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f'shapes differ: {shapes}; pass arrays over the same [B] or [B, T] '
                     'positions')


def _masked_mean(x_BT, mask_BT):
  mask_BT = mask_BT.astype(jnp.float32)
  return (x_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def _pair_mean(x_B, weight_B):
  """The mean over pairs, or the ``weight_B``-weighted mean (0 for a padding row)."""
  if weight_B is None:
    return jnp.mean(x_B)
  return (x_B * weight_B).sum() / jnp.maximum(weight_B.sum(), 1e-9)


def _pairwise_accuracy(margin_B, weight_B=None):
  return _pair_mean(jnp.where(margin_B > 0, 1.0, jnp.where(margin_B == 0, 0.5, 0.0)), weight_B)


def bradley_terry(reward_chosen_B, reward_rejected_B, weight_B=None):
  """``mean(-log sigmoid(rc - rr))``: the negative log-likelihood of the preference under
  Bradley-Terry, ``P(chosen > rejected) = sigmoid(rc - rr)``. Returns ``(loss, accuracy)``,
  accuracy being the fraction with ``rc > rr`` (ties half). ``weight_B``, given, weights the
  pairs (0 leaves out a padding row of a held-out batch)."""
  _same_shape(reward_chosen_B=reward_chosen_B, reward_rejected_B=reward_rejected_B)
  margin_B = (reward_chosen_B - reward_rejected_B).astype(jnp.float32)
  return (_pair_mean(-jax.nn.log_sigmoid(margin_B), weight_B),
          _pairwise_accuracy(margin_B, weight_B))


def dpo(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B, beta,
        weight_B=None):
  """Direct preference optimisation (Rafailov et al. 2023): Bradley-Terry on the implicit
  rewards ``r = beta (log pi(y|x) - log ref(y|x))``, the reward under which the KL-regularised
  optimum is the policy itself, so no reward model is needed. Inputs are response
  log-probabilities (``infer.score.response_logprob``); ``weight_B`` as in ``bradley_terry``. Returns
  ``(loss, metrics)``."""
  _same_shape(policy_chosen_B=policy_chosen_B, policy_rejected_B=policy_rejected_B,
              reference_chosen_B=reference_chosen_B, reference_rejected_B=reference_rejected_B)
  chosen_B = beta * (policy_chosen_B - reference_chosen_B)
  rejected_B = beta * (policy_rejected_B - reference_rejected_B)
  loss, accuracy = bradley_terry(chosen_B, rejected_B, weight_B)
  return loss, {**reward_means(chosen_B, rejected_B, weight_B), 'accuracy': accuracy}


def reward_means(reward_chosen_B, reward_rejected_B, weight_B=None):
  """``{'reward_chosen', 'reward_rejected', 'reward_margin'}``: the mean rewards over the pairs
  (``weight_B`` as in ``bradley_terry``), what the preference stages log."""
  return {'reward_chosen': _pair_mean(reward_chosen_B, weight_B),
          'reward_rejected': _pair_mean(reward_rejected_B, weight_B),
          'reward_margin': _pair_mean(reward_chosen_B - reward_rejected_B, weight_B)}


def kl_penalty(logp_BT, reference_logp_BT, mask_BT, kind='k1'):
  """Per-token estimates of ``KL(pi || ref)`` from tokens sampled from ``pi``, zero off the mask.

  ``k1 = log pi - log ref``: unbiased, and its sum over a reply is the reply's log-ratio, so
  ``-coef * k1`` in the per-token reward makes the policy gradient that of
  ``E[reward] - coef KL`` exactly; it is negative on some tokens. Use it in the reward.
  ``k3 = (r - 1) - log r`` with ``r = ref / pi`` (Schulman 2020): also unbiased (``E[r] = 1``),
  never negative and of lower variance, but as a reward its gradient is not the KL's; use it to
  report the KL.
  """
  _same_shape(logp_BT=logp_BT, reference_logp_BT=reference_logp_BT, mask_BT=mask_BT)
  log_ratio_BT = logp_BT - reference_logp_BT
  if kind == 'k1':
    kl_BT = log_ratio_BT
  elif kind == 'k3':
    kl_BT = jnp.expm1(-log_ratio_BT) + log_ratio_BT
  else:
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; use 'k1' (for the reward) or 'k3' "
                     '(for reporting)')
  return kl_BT * mask_BT.astype(kl_BT.dtype)


def gae(rewards_BT, values_BT, mask_BT, gamma, lam):
  """Generalised advantage estimation (Schulman et al. 2016) over the scored positions.

  ``delta_t = r_t + gamma V_next - V_t`` and ``A_t = delta_t + gamma lam A_next``, where
  "next" is the next scored position of the row: positions off the mask (prompt, padding, a
  user turn between model turns) are skipped, and after the last scored position
  ``V = A = 0`` (the episode ends with the reply). ``lam`` trades the bias of bootstrapping
  from ``V`` against the variance of Monte Carlo returns. Runs as a reverse ``lax.scan`` over
  ``T``. Returns ``(advantages_BT, returns_BT)``, ``returns = advantages + values`` being the
  value head's target; both are zero off the mask.
  """
  _same_shape(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
  mask_BT = mask_BT.astype(jnp.float32)

  def step(carry, inputs):
    next_value_B, next_advantage_B = carry
    reward_B, value_B, on_B = inputs
    delta_B = reward_B + gamma * next_value_B - value_B
    advantage_B = delta_B + gamma * lam * next_advantage_B
    carry = (jnp.where(on_B > 0, value_B, next_value_B),
             jnp.where(on_B > 0, advantage_B, next_advantage_B))
    return carry, advantage_B * on_B

  zeros_B = jnp.zeros(rewards_BT.shape[:1], jnp.float32)
  inputs = tuple(x.astype(jnp.float32).T for x in (rewards_BT, values_BT, mask_BT))
  _, advantages_TB = jax.lax.scan(step, (zeros_B, zeros_B), inputs, reverse=True)
  advantages_BT = advantages_TB.T
  return advantages_BT, (advantages_BT + values_BT) * mask_BT


def whiten(x_BT, mask_BT, eps=1e-8):
  """``(x - mean) / std`` over the masked entries of the whole batch, zero off the mask: PPO's
  advantage normalisation, which keeps the step size independent of the reward's scale."""
  _same_shape(x_BT=x_BT, mask_BT=mask_BT)
  mean = _masked_mean(x_BT, mask_BT)
  var = _masked_mean((x_BT - mean) ** 2, mask_BT)
  return (x_BT - mean) * jax.lax.rsqrt(var + eps) * mask_BT.astype(jnp.float32)


def ppo_policy_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, clip_ratio):
  """PPO's clipped surrogate (Schulman et al. 2017), a masked token mean of
  ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` with ``rho = pi / pi_old``: the pessimistic
  bound, so a token whose ratio already moved past the clip in the advantage's direction gives
  no gradient and the policy stays near the one that sampled the rollout.

  Returns ``(loss, clip_fraction, approx_kl)``: the fraction of tokens where the clipped term is
  the larger (zero gradient), and the k3 estimate of ``KL(pi_old || pi)`` on the rollout.
  """
  _same_shape(logp_BT=logp_BT, old_logp_BT=old_logp_BT, advantages_BT=advantages_BT,
              mask_BT=mask_BT)
  log_ratio_BT = logp_BT - old_logp_BT
  ratio_BT = jnp.exp(log_ratio_BT)
  unclipped_BT = -advantages_BT * ratio_BT
  clipped_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - clip_ratio, 1.0 + clip_ratio)
  loss = _masked_mean(jnp.maximum(unclipped_BT, clipped_BT), mask_BT)
  clip_fraction = _masked_mean((clipped_BT > unclipped_BT).astype(jnp.float32), mask_BT)
  approx_kl = _masked_mean(jnp.expm1(log_ratio_BT) - log_ratio_BT, mask_BT)
  return loss, clip_fraction, jax.lax.stop_gradient(approx_kl)


def ppo_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, value_clip):
  """``0.5 * max((V - R)^2, (V_clip - R)^2)``, masked token mean, where
  ``V_clip = V_old + clip(V - V_old, -c, c)``: the value head, like the policy, gets no gradient
  for moving further than ``c`` from the values of the rollout in one update."""
  _same_shape(values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT,
              mask_BT=mask_BT)
  clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -value_clip, value_clip)
  error_BT = jnp.maximum((values_BT - returns_BT) ** 2, (clipped_BT - returns_BT) ** 2)
  return 0.5 * _masked_mean(error_BT, mask_BT)


def entropy(logits_BTV, mask_BT):
  """Masked token mean of ``-sum_v p_v log p_v`` (float32): how far the policy is from greedy;
  a collapse to zero during RL means sampling no longer explores."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  return _masked_mean(-(jnp.exp(logp_BTV) * logp_BTV).sum(axis=-1), mask_BT)


def adaptive_kl_coef(coef, kl, target, horizon, batch_size):
  """Ziegler et al. (2019)'s proportional controller: ``coef * (1 + e * batch_size / horizon)``
  with ``e = clip(kl / target - 1, -0.2, 0.2)``, so the coefficient rises while the KL is
  above target and falls below it, by at most 20% per ``horizon`` samples."""
  error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return coef * (1.0 + error * batch_size / horizon)
