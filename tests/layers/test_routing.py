"""Tests for top-k routing and the router losses, against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.layers.routing import (
    expert_load, load_balance_loss, router_z_loss, top_k_routing)

# Four tokens, three experts. Logits are log-probabilities, so softmax gives these exactly.
PROBS_TE = np.array([
    [0.70, 0.20, 0.10],  # top-1: 0, top-2: 0, 1
    [0.10, 0.60, 0.30],  # top-1: 1, top-2: 1, 2
    [0.50, 0.30, 0.20],  # top-1: 0, top-2: 0, 1
    [0.25, 0.15, 0.60],  # top-1: 2, top-2: 2, 0
])
# Mean router probability per expert: (0.7+0.1+0.5+0.25)/4, (0.2+0.6+0.3+0.15)/4, 1.2/4.
MEAN_PROB_E = np.array([0.3875, 0.3125, 0.3])


def _logits(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))[None]  # [1, T, E]


def test_top_k_one_keeps_the_raw_probability():
  experts_BTR, weights_BTR = top_k_routing(_logits(PROBS_TE), 1)
  assert experts_BTR.dtype == jnp.int32 and weights_BTR.dtype == jnp.float32
  assert experts_BTR.shape == weights_BTR.shape == (1, 4, 1)
  np.testing.assert_array_equal(experts_BTR[0, :, 0], [0, 1, 0, 2])
  np.testing.assert_allclose(weights_BTR[0, :, 0], [0.70, 0.60, 0.50, 0.60], rtol=1e-6)


def test_top_k_two_renormalises():
  experts_BTR, weights_BTR = top_k_routing(_logits(PROBS_TE), 2)
  np.testing.assert_array_equal(experts_BTR[0], [[0, 1], [1, 2], [0, 1], [2, 0]])
  expected = [[0.7 / 0.9, 0.2 / 0.9], [0.6 / 0.9, 0.3 / 0.9], [0.5 / 0.8, 0.3 / 0.8],
              [0.6 / 0.85, 0.25 / 0.85]]
  np.testing.assert_allclose(weights_BTR[0], expected, rtol=1e-6)
  np.testing.assert_allclose(weights_BTR.sum(-1), 1.0, rtol=1e-6)


def test_renormalizing_always_gives_top_one_the_whole_weight():
  # Mixtral renormalises at k = 1 too: each token's one expert gets weight 1.
  experts_BTR, weights_BTR = top_k_routing(_logits(PROBS_TE), 1, 'always')
  np.testing.assert_array_equal(experts_BTR[0, :, 0], [0, 1, 0, 2])
  np.testing.assert_array_equal(weights_BTR, np.ones((1, 4, 1), np.float32))


def test_renormalizing_never_keeps_the_raw_probabilities():
  experts_BTR, weights_BTR = top_k_routing(_logits(PROBS_TE), 2, 'never')
  np.testing.assert_array_equal(experts_BTR[0], [[0, 1], [1, 2], [0, 1], [2, 0]])
  np.testing.assert_allclose(weights_BTR[0], [[0.7, 0.2], [0.6, 0.3], [0.5, 0.3], [0.6, 0.25]],
                             rtol=1e-6)


def test_an_unknown_renormalize_rule_is_refused():
  with pytest.raises(ValueError, match='always'):
    top_k_routing(_logits(PROBS_TE), 2, 'sometimes')


def test_top_k_orders_most_probable_first():
  rng = np.random.default_rng(0)
  logits_BTE = rng.normal(size=(2, 5, 6)).astype(np.float32)
  experts_BTR, weights_BTR = top_k_routing(jnp.asarray(logits_BTE), 3)
  probs = np.exp(logits_BTE) / np.exp(logits_BTE).sum(-1, keepdims=True)
  for b in range(2):
    for t in range(5):
      order = sorted(range(6), key=lambda e: -probs[b, t, e])[:3]
      np.testing.assert_array_equal(experts_BTR[b, t], order)
      top = probs[b, t, order]
      np.testing.assert_allclose(weights_BTR[b, t], top / top.sum(), rtol=1e-5)
  assert np.all(np.diff(np.asarray(weights_BTR), axis=-1) <= 0)  # non-increasing


@pytest.mark.parametrize('experts, expected', [
    # k=1: loads (2/4, 1/4, 1/4); 3 * (0.5*0.3875 + 0.25*0.3125 + 0.25*0.3) = 1.040625.
    ([[0], [1], [0], [2]], 1.040625),
    # k=2: loads (3/8, 3/8, 2/8); 3 * (0.375*0.3875 + 0.375*0.3125 + 0.25*0.3) = 1.0125.
    ([[0, 1], [1, 2], [0, 1], [2, 0]], 1.0125),
])
def test_load_balance_loss_by_hand(experts, expected):
  experts_BTR = jnp.asarray(experts, jnp.int32)[None]
  valid_BT = jnp.ones((1, 4), jnp.float32)
  loss = load_balance_loss(_logits(PROBS_TE), experts_BTR, valid_BT)
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The routing top_k_routing picks is the one written out above.
  np.testing.assert_array_equal(top_k_routing(_logits(PROBS_TE), len(experts[0]))[0],
                                experts_BTR)


@pytest.mark.parametrize('k', [1, 2])
def test_load_balance_loss_ignores_invalid_tokens(k):
  experts = [[0, 1], [1, 2], [0, 1], [2, 0]]
  expected = {1: 1.040625, 2: 1.0125}[k]
  # Two padding tokens, both confidently routed to expert 0; they must change nothing.
  probs = np.concatenate([PROBS_TE, [[0.98, 0.01, 0.01], [0.90, 0.06, 0.04]]])
  experts_BTR = jnp.asarray(experts + [[0, 1], [0, 1]], jnp.int32)[None, :, :k]
  # Padding in the middle and at the end: positions 2 and 5 hold padding tokens 4 and 5.
  order = [0, 1, 4, 2, 3, 5]
  valid_BT = jnp.asarray([[1, 1, 0, 1, 1, 0]], jnp.float32)
  logits_BTE, experts_BTR = _logits(probs[order]), experts_BTR[:, order]
  np.testing.assert_allclose(load_balance_loss(logits_BTE, experts_BTR, valid_BT), expected,
                             rtol=1e-5)
  # A bool mask works the same.
  np.testing.assert_allclose(load_balance_loss(logits_BTE, experts_BTR, valid_BT > 0),
                             expected, rtol=1e-5)


@pytest.mark.parametrize('k', [1, 2])
def test_load_balance_loss_is_one_for_uniform_routing(k):
  # Each token's probabilities are a rotation of one vector: mean probability is 1/E for
  # every expert, and the rotated top-k choices spread the slots evenly.
  base = np.array([0.4, 0.3, 0.2, 0.1])
  probs = np.stack([np.roll(base, t) for t in range(4)])
  experts_BTR, _ = top_k_routing(_logits(probs), k)
  np.testing.assert_array_equal(np.bincount(np.ravel(experts_BTR), minlength=4), [k] * 4)
  loss = load_balance_loss(_logits(probs), experts_BTR, jnp.ones((1, 4)))
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
  # Equal logits: uniform probabilities, so the loss is 1 whatever the (balanced) choice.
  experts_BTR = jnp.asarray([[[t % 4, (t + 1) % 4][:k] for t in range(8)]], jnp.int32)
  loss = load_balance_loss(jnp.zeros((1, 8, 4)), experts_BTR, jnp.ones((1, 8)))
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_load_balance_loss_grows_as_load_concentrates():
  probs = np.array([[0.97, 0.01, 0.01, 0.01]] * 4)
  experts_BTR = jnp.zeros((1, 4, 1), jnp.int32)
  loss = load_balance_loss(_logits(probs), experts_BTR, jnp.ones((1, 4)))
  np.testing.assert_allclose(loss, 4 * 0.97, rtol=1e-5)  # E * f_0 * P_0 = 4 * 1 * 0.97


def test_load_balance_loss_gradient_treats_load_as_constant():
  # d/dlogits of E * sum_e f_e * mean_t p_te with f fixed: for token t,
  # dL/dz_tj = (E / T) * p_tj * (f_j - sum_e f_e p_te).
  experts_BTR = jnp.asarray([[[0], [1], [0], [2]]], jnp.int32)
  f_E = np.array([0.5, 0.25, 0.25])
  grad = jax.grad(load_balance_loss)(_logits(PROBS_TE), experts_BTR, jnp.ones((1, 4)))
  expected = 3 / 4 * PROBS_TE * (f_E[None, :] - (PROBS_TE @ f_E)[:, None])
  np.testing.assert_allclose(grad[0], expected, atol=1e-6)


def test_losses_are_zero_not_nan_without_valid_tokens():
  logits = _logits(PROBS_TE)
  valid_BT = jnp.zeros((1, 4))
  experts_BTR, _ = top_k_routing(logits, 2)
  assert load_balance_loss(logits, experts_BTR, valid_BT) == 0.0
  assert router_z_loss(logits, valid_BT) == 0.0
  np.testing.assert_array_equal(expert_load(experts_BTR, valid_BT, 3), [0, 0, 0])


def test_router_z_loss_by_hand():
  logits_BTE = jnp.asarray([[
      [0.0, 0.0, 0.0],                 # logsumexp = log 3
      [math.log(2.0), 0.0, 0.0],       # log(2 + 1 + 1) = log 4
      [1.0, 2.0, 3.0],                 # log(e + e^2 + e^3)
      [50.0, 0.0, 0.0],                # padding: ignored
  ]], jnp.float32)
  valid_BT = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
  lse = [math.log(3.0), math.log(4.0), math.log(math.e + math.e**2 + math.e**3)]
  expected = sum(v * v for v in lse) / 3
  loss = router_z_loss(logits_BTE, valid_BT)
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_expert_load_sums_to_one(k):
  rng = np.random.default_rng(1)
  logits_BTE = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
  valid_BT = jnp.asarray(rng.random((2, 7)) > 0.3, jnp.float32)
  experts_BTR, _ = top_k_routing(logits_BTE, k)
  load_E = expert_load(experts_BTR, valid_BT, 5)
  assert load_E.shape == (5,)
  np.testing.assert_allclose(load_E.sum(), 1.0, rtol=1e-6)
  # And each entry is the counted fraction of valid slots.
  chosen = np.asarray(experts_BTR)[np.asarray(valid_BT) > 0]
  np.testing.assert_allclose(load_E, np.bincount(chosen.ravel(), minlength=5) / chosen.size,
                             rtol=1e-6)


def test_expert_load_by_hand():
  experts_BTR = jnp.asarray([[[0, 1], [1, 2], [0, 1], [2, 0], [0, 2]]], jnp.int32)
  valid_BT = jnp.asarray([[1, 1, 1, 1, 0]], jnp.float32)  # the last token is padding
  np.testing.assert_allclose(expert_load(experts_BTR, valid_BT, 3), [3 / 8, 3 / 8, 2 / 8],
                             rtol=1e-6)
