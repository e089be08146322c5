"""Post-training objectives against hand-computed values, numpy loops and exact sums."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.train import objectives


def _log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_bradley_terry_matches_hand_computed_loss_and_counts_ties_half():
  loss, accuracy = objectives.bradley_terry(jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 0.0, 3.0]))
  expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.e)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(accuracy, (1 + 0.5 + 0) / 3)


def test_bradley_terry_refuses_pairs_of_different_shapes():
  with pytest.raises(ValueError, match='shapes differ'):
    objectives.bradley_terry(jnp.zeros(3), jnp.zeros(4))


def test_dpo_matches_hand_computed_loss_metrics_and_gradient():
  beta = 0.1
  chosen, rejected = jnp.array([-10.0, -5.0]), jnp.array([-12.0, -4.0])
  reference_chosen, reference_rejected = jnp.array([-11.0, -5.0]), jnp.array([-11.0, -5.0])
  loss, metrics = objectives.dpo(chosen, rejected, reference_chosen, reference_rejected, beta)
  # Implicit rewards: chosen 0.1 * [1, 0], rejected 0.1 * [-1, 1]; margins [0.2, -0.1].
  np.testing.assert_allclose(loss, (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.1))) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics['reward_chosen'], 0.05, rtol=1e-5)
  np.testing.assert_allclose(metrics['reward_rejected'], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics['reward_margin'], 0.05, rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], 0.5)
  # d loss / d chosen_b = -beta sigmoid(-margin_b) / B.
  grad = jax.grad(lambda c: objectives.dpo(c, rejected, reference_chosen, reference_rejected,
                                           beta)[0])(chosen)
  sigmoid = lambda x: 1 / (1 + math.exp(-x))
  np.testing.assert_allclose(grad, [-beta * sigmoid(-0.2) / 2, -beta * sigmoid(0.1) / 2], rtol=1e-5)


def test_dpo_starts_at_log_two_and_chance_accuracy_when_the_policy_is_the_reference():
  logp = jnp.array([-3.0, -7.0, -2.0])
  loss, metrics = objectives.dpo(logp, logp - 1, logp, logp - 1, beta=0.5)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics['accuracy'], 0.5)


def test_kl_estimators_match_the_exact_kl_by_hand():
  # p = (1/2, 1/2), q = (1/4, 3/4): KL(p || q) = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3).
  p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
  logp, logq = jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32))
  for kind in ('k1', 'k3'):
    per_token = objectives.kl_penalty(logp[None], logq[None], jnp.ones((1, 2)), kind)[0]
    np.testing.assert_allclose(np.dot(p, per_token), 0.5 * math.log(4 / 3), rtol=1e-5)


def test_kl_estimators_sampled_from_the_policy_average_to_the_exact_kl():
  vocab, samples = 6, 200_000
  key_p, key_q, key_sample = jax.random.split(jax.random.key(0), 3)
  logp_V = jax.nn.log_softmax(jax.random.normal(key_p, (vocab,)))
  logq_V = jax.nn.log_softmax(jax.random.normal(key_q, (vocab,)))
  p, logp64, logq64 = (np.exp(np.float64(logp_V)), np.float64(logp_V), np.float64(logq_V))
  exact = sum(p[v] * (logp64[v] - logq64[v]) for v in range(vocab))
  tokens_BT = jax.random.categorical(key_sample, logp_V, shape=(samples // 100, 100))
  mask_BT = jnp.ones(tokens_BT.shape)
  for kind in ('k1', 'k3'):
    kl_BT = np.float64(objectives.kl_penalty(logp_V[tokens_BT], logq_V[tokens_BT], mask_BT, kind))
    standard_error = kl_BT.std() / math.sqrt(samples)
    assert abs(kl_BT.mean() - exact) < 4 * standard_error, (kind, kl_BT.mean(), exact)
    if kind == 'k3':
      assert kl_BT.min() >= 0  # k3 is never negative; k1 is on tokens that q favours


def test_kl_penalty_is_zero_off_the_mask_and_refuses_unknown_kinds():
  kl = objectives.kl_penalty(jnp.array([[-1.0, -2.0]]), jnp.array([[-3.0, -3.0]]),
                             jnp.array([[1.0, 0.0]]), 'k1')
  np.testing.assert_allclose(kl, [[2.0, 0.0]])
  with pytest.raises(ValueError, match="unknown kind 'k2'"):
    objectives.kl_penalty(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), 'k2')


def _gae_numpy(rewards, values, mask, gamma, lam):
  advantages = np.zeros_like(rewards, np.float64)
  for b in range(rewards.shape[0]):
    steps = np.flatnonzero(mask[b])
    next_value = next_advantage = 0.0
    for t in steps[::-1]:
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_advantage = delta + gamma * lam * next_advantage
      next_value = values[b, t]
      advantages[b, t] = next_advantage
  return advantages, (advantages + values) * mask


def test_gae_matches_a_hand_computed_three_step_reply():
  # A prompt position, three reply steps, a padding position (values there must not matter).
  rewards = jnp.array([[0.0, 0.0, 0.0, 1.0, 0.0]])
  values = jnp.array([[9.0, 0.5, 0.6, 0.7, 9.0]])
  mask = jnp.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
  advantages, returns = objectives.gae(rewards, values, mask, gamma=0.9, lam=0.8)
  a3 = 1.0 - 0.7
  a2 = (0.9 * 0.7 - 0.6) + 0.72 * a3
  a1 = (0.9 * 0.6 - 0.5) + 0.72 * a2
  np.testing.assert_allclose(advantages, [[0, a1, a2, a3, 0]], rtol=1e-6)
  np.testing.assert_allclose(returns, [[0, a1 + 0.5, a2 + 0.6, a3 + 0.7, 0]], rtol=1e-6)


def test_gae_matches_a_numpy_loop_on_ragged_replies():
  rng = np.random.default_rng(1)
  batch, length = 6, 12
  mask = np.zeros((batch, length), np.float32)
  for b, (start, size) in enumerate([(2, 5), (0, 12), (4, 1), (3, 8), (1, 3)]):
    mask[b, start:start + size] = 1  # prompt, reply, padding after; row 5 has no reply
  mask[3, 6] = 0  # a user turn inside the reply: skipped, not an episode end
  rewards = rng.normal(size=(batch, length)).astype(np.float32)
  values = rng.normal(size=(batch, length)).astype(np.float32)
  for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (0.99, 1.0)):
    advantages, returns = objectives.gae(*map(jnp.asarray, (rewards, values, mask)), gamma, lam)
    expected_advantages, expected_returns = _gae_numpy(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)


def test_whiten_gives_zero_mean_unit_spread_on_the_mask():
  rng = np.random.default_rng(2)
  x = rng.normal(3.0, 5.0, size=(3, 7)).astype(np.float32)
  mask = (rng.random((3, 7)) < 0.6).astype(np.float32)
  out = np.asarray(objectives.whiten(jnp.asarray(x), jnp.asarray(mask)))
  on = mask > 0
  expected = (x[on] - x[on].mean()) / x[on].std()
  np.testing.assert_allclose(out[on], expected, rtol=1e-4, atol=1e-5)
  assert (out[~on] == 0).all()


def test_ppo_policy_loss_matches_hand_computed_values_and_clipped_tokens_get_no_gradient():
  # Ratios and advantages: inside the clip; above with A > 0 (clipped); below with A < 0
  # (clipped); below with A > 0 and above with A < 0 (pessimistic: unclipped); one masked.
  ratio = np.array([[1.1, 1.5, 0.5], [0.5, 1.5, 3.0]])
  advantages = jnp.array([[2.0, 1.0, -1.0], [1.0, -1.0, 5.0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  old_logp = jnp.full((2, 3), -1.0)
  logp = old_logp + jnp.log(jnp.asarray(ratio, jnp.float32))
  loss, clip_fraction, approx_kl = objectives.ppo_policy_loss(logp, old_logp, advantages, mask, 0.2)
  np.testing.assert_allclose(loss, (-2.2 - 1.2 + 0.8 - 0.5 + 1.5) / 5, rtol=1e-5)
  np.testing.assert_allclose(clip_fraction, 2 / 5)
  on = ratio[np.asarray(mask) > 0]
  np.testing.assert_allclose(approx_kl, np.mean(on - 1 - np.log(on)), rtol=1e-5)
  grad = jax.grad(lambda l: objectives.ppo_policy_loss(l, old_logp, advantages, mask, 0.2)[0])(logp)
  # d(-A rho)/d logp = -A rho, over 5 tokens; zero where clipped or masked.
  np.testing.assert_allclose(grad, [[-2 * 1.1 / 5, 0, 0], [-0.5 / 5, 1.5 / 5, 0]], rtol=1e-5,
                             atol=1e-7)


def test_ppo_value_loss_matches_hand_computed_values_and_clipped_values_get_no_gradient():
  old = jnp.ones((1, 5))
  values = jnp.array([[1.1, 1.5, 1.5, 0.5, 7.0]])
  returns = jnp.array([[2.0, 2.0, 0.0, 1.0, 0.0]])
  mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
  loss = objectives.ppo_value_loss(values, old, returns, mask, value_clip=0.2)
  # max(unclipped, clipped) squared errors: 0.81; max(0.25, 0.64); max(2.25, 1.44); max(0.25, 0.04)
  np.testing.assert_allclose(loss, 0.5 * (0.81 + 0.64 + 2.25 + 0.25) / 4, rtol=1e-5)
  grad = jax.grad(lambda v: objectives.ppo_value_loss(v, old, returns, mask, 0.2))(values)
  # (V - R) / 4 where the unclipped error is the larger; zero where the clipped one is, or masked.
  np.testing.assert_allclose(grad, [[-0.9 / 4, 0, 1.5 / 4, -0.5 / 4, 0]], rtol=1e-5, atol=1e-7)


def test_entropy_matches_an_exact_numpy_sum():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 2
  mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
  logp = _log_softmax(logits)
  per_token = -(np.exp(logp) * logp).sum(-1)
  expected = (per_token * mask).sum() / mask.sum()
  np.testing.assert_allclose(objectives.entropy(jnp.asarray(logits), jnp.asarray(mask)), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(objectives.entropy(jnp.zeros((1, 1, 5)), jnp.ones((1, 1))),
                             math.log(5), rtol=1e-6)


def test_adaptive_kl_coef_rises_above_target_falls_below_and_clips_the_error():
  coef, target, horizon, batch = 0.1, 6.0, 10_000, 256
  new = lambda kl: float(objectives.adaptive_kl_coef(coef, kl, target, horizon, batch))
  np.testing.assert_allclose(new(12.0), coef * (1 + 0.2 * batch / horizon), rtol=1e-6)  # clipped
  np.testing.assert_allclose(new(6.6), coef * (1 + 0.1 * batch / horizon), rtol=1e-6)
  np.testing.assert_allclose(new(0.0), coef * (1 - 0.2 * batch / horizon), rtol=1e-6)  # clipped
  np.testing.assert_allclose(new(target), coef, rtol=1e-6)
  assert new(7.0) > coef > new(5.0)
