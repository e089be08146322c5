"""A toy bandit where PPO, built from ``train.objectives``, must find the rewarded answer.

The policy is one softmax over ``V`` tokens (a logits vector, the same at every position); a
reply is 1 to 3 tokens and earns 1 when its last token is ``ANSWER``. The per-token reward is
``-KL_COEF * k1`` plus that score at the reply's last position, exactly as RLHF builds it.
The value head is one number per count of remaining steps (what the future depends on).
Everything runs in one jitted scan with fixed keys, so the test is deterministic.

Tokens are drawn independently of the length ``L``, so the expected return is exactly
``pi(ANSWER) - KL_COEF * E[L] * KL(pi || ref)``, whose maximum is the Gibbs policy
``pi* ~ ref * exp(1[ANSWER] / (KL_COEF * E[L]))``, so the test knows where PPO should go: the
reward rises towards ``pi*(ANSWER)`` and the exact KL stays near ``KL(pi* || ref)``, far below
the ``-log ref(ANSWER)`` a greedy policy that always answers would have.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemini_mini.train import objectives

ANSWER, MAX_LENGTH, BATCH, STEPS, EPOCHS = 2, 3, 64, 200, 4
KL_COEF, CLIP, GAMMA, LAM = 0.15, 0.2, 1.0, 0.95
REFERENCE_V = jnp.array([1.0, 0.5, -1.0, 0.0])  # the answer starts unlikely: ref(ANSWER) ~ 0.06


def _rollout(logits_V, key):
  key_length, key_tokens = jax.random.split(key)
  length_B = jax.random.randint(key_length, (BATCH,), 1, MAX_LENGTH + 1)
  t_T = jnp.arange(MAX_LENGTH)
  mask_BT = (t_T < length_B[:, None]).astype(jnp.float32)
  tokens_BT = jax.random.categorical(key_tokens, logits_V, shape=(BATCH, MAX_LENGTH))
  last_BT = t_T == length_B[:, None] - 1
  score_B = jnp.sum(last_BT * (tokens_BT == ANSWER), axis=1).astype(jnp.float32)
  remaining_BT = jnp.maximum(length_B[:, None] - 1 - t_T, 0)
  return tokens_BT, mask_BT, last_BT, score_B, remaining_BT


def _logp(logits_V, tokens_BT):
  return jax.nn.log_softmax(logits_V)[tokens_BT]


@jax.jit
def _train(key):
  """``STEPS`` PPO iterations; returns per iteration the mean score of the rollout, and after
  the update the probability of the answer and the exact per-token KL to the reference."""
  optimizer = optax.adam(0.03)
  params = {'logits_V': REFERENCE_V, 'value_by_remaining_T': jnp.zeros(MAX_LENGTH)}

  def iteration(carry, key):
    params, opt_state = carry
    tokens_BT, mask_BT, last_BT, score_B, remaining_BT = _rollout(params['logits_V'], key)
    old_logp_BT = _logp(params['logits_V'], tokens_BT)
    reference_logp_BT = _logp(REFERENCE_V, tokens_BT)
    rewards_BT = (-KL_COEF * objectives.kl_penalty(old_logp_BT, reference_logp_BT, mask_BT, 'k1')
                  + last_BT * score_B[:, None])
    old_values_BT = params['value_by_remaining_T'][remaining_BT] * mask_BT
    advantages_BT, returns_BT = objectives.gae(rewards_BT, old_values_BT, mask_BT, GAMMA, LAM)
    advantages_BT = objectives.whiten(advantages_BT, mask_BT)

    def loss(params):
      logp_BT = _logp(params['logits_V'], tokens_BT)
      policy = objectives.ppo_policy_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, CLIP)[0]
      values_BT = params['value_by_remaining_T'][remaining_BT]
      return policy + objectives.ppo_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, CLIP)

    def epoch(carry, _):
      params, opt_state = carry
      updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state), None, length=EPOCHS)
    p_V = jax.nn.softmax(params['logits_V'])
    exact_kl = jnp.sum(p_V * (jnp.log(p_V) - jax.nn.log_softmax(REFERENCE_V)))
    return (params, opt_state), (score_B.mean(), p_V[ANSWER], exact_kl)

  keys = jax.random.split(key, STEPS)
  _, history = jax.lax.scan(iteration, (params, optimizer.init(params)), keys)
  return history


def test_ppo_finds_the_rewarded_answer_while_the_kl_to_the_reference_stays_bounded():
  score, answer_probability, exact_kl = map(np.asarray, _train(jax.random.key(0)))
  ref_V = np.exp(np.asarray(jax.nn.log_softmax(REFERENCE_V), np.float64))
  mean_length = (1 + MAX_LENGTH) / 2
  optimum_V = ref_V * np.exp((np.arange(len(ref_V)) == ANSWER) / (KL_COEF * mean_length))
  optimum_V /= optimum_V.sum()
  optimum_kl = float(np.sum(optimum_V * np.log(optimum_V / ref_V)))
  greedy_kl = -math.log(ref_V[ANSWER])
  assert ref_V[ANSWER] < 0.1 and score[0] < 0.15
  assert score[-STEPS // 4:].mean() > 0.5
  # Late in training the policy sits near the regularised optimum, not at the greedy answer.
  late = answer_probability[-STEPS // 4:].mean()
  assert late > 0.5 and abs(late - optimum_V[ANSWER]) < 0.1, (late, optimum_V[ANSWER])
  # PPO's sampling noise moves the policy around the optimum; never far past its KL.
  assert exact_kl.max() < 1.5 * optimum_kl < greedy_kl, (exact_kl.max(), optimum_kl, greedy_kl)
