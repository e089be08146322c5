"""Sampling filters against slow numpy references: kept sets, renormalised probabilities,
the support of many samples, greedy, and determinism per key."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.infer import sampling

LOGITS_BV = np.random.default_rng(0).normal(scale=2.0, size=(4, 40)).astype(np.float32)
SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.8), (1.5, 10, 0.5), (1.0, 3, 0.95),
    (1.0, 0, 1e-4), (0.5, 40, 0.9)]


def reference_probs(logits_V, temperature, top_k, top_p):
  """The sampling distribution of one row, by a plain loop in float64."""
  scaled = logits_V.astype(np.float64) / temperature
  order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
  candidates = order[:top_k] if top_k else order
  weights = {i: np.exp(scaled[i] - scaled[order[0]]) for i in candidates}
  total = sum(weights.values())
  kept, mass = [], 0.0
  for i in candidates:  # most likely first, until the kept mass reaches top_p
    kept.append(i)
    mass += weights[i] / total
    if mass >= top_p:
      break
  probs = np.zeros(len(scaled))
  probs[kept] = [weights[i] for i in kept]
  return probs / probs.sum()


@pytest.mark.parametrize('temperature, top_k, top_p', SETTINGS)
def test_filtered_distribution_matches_reference(temperature, top_k, top_p):
  filtered_BV = sampling.filter_logits(jnp.asarray(LOGITS_BV), temperature=temperature,
                                       top_k=top_k, top_p=top_p)
  probs_BV = np.asarray(jax.nn.softmax(filtered_BV, axis=-1))
  for row in range(len(LOGITS_BV)):
    expected = reference_probs(LOGITS_BV[row], temperature, top_k, top_p)
    np.testing.assert_array_equal(probs_BV[row] > 0, expected > 0)
    np.testing.assert_allclose(probs_BV[row], expected, atol=1e-6)


@pytest.mark.parametrize('temperature, top_k, top_p', [(1.0, 5, 1.0), (1.0, 0, 0.6),
                                                       (2.0, 8, 0.9)])
def test_samples_never_leave_the_kept_set_and_follow_its_probabilities(
    temperature, top_k, top_p):
  num_samples = 4000
  logits_NV = jnp.asarray(np.repeat(LOGITS_BV[:1], num_samples, axis=0))
  tokens_N = np.asarray(sampling.sample(logits_NV, jax.random.key(1), temperature=temperature,
                                        top_k=top_k, top_p=top_p))
  expected = reference_probs(LOGITS_BV[0], temperature, top_k, top_p)
  assert set(tokens_N) <= set(np.flatnonzero(expected))
  counts = np.bincount(tokens_N, minlength=len(expected)) / num_samples
  np.testing.assert_allclose(counts, expected, atol=0.03)


def test_greedy_is_argmax_and_temperature_zero_or_top_k_one_is_greedy():
  expected_B = LOGITS_BV.argmax(-1)
  logits_BV = jnp.asarray(LOGITS_BV)
  np.testing.assert_array_equal(sampling.greedy(logits_BV), expected_B)
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(sampling.sample(logits_BV, key, temperature=0.0, top_k=7,
                                                  top_p=0.5), expected_B)
    np.testing.assert_array_equal(sampling.sample(logits_BV, key, temperature=3.0, top_k=1),
                                  expected_B)


def test_top_p_always_keeps_the_top_token_and_one_keeps_all():
  logits_BV = jnp.asarray(LOGITS_BV)
  only_top = np.isfinite(np.asarray(sampling.top_p_logits(logits_BV, 1e-9)))
  np.testing.assert_array_equal(only_top.sum(-1), 1)
  np.testing.assert_array_equal(only_top.argmax(-1), LOGITS_BV.argmax(-1))
  np.testing.assert_array_equal(sampling.top_p_logits(logits_BV, 1.0), LOGITS_BV)
  np.testing.assert_array_equal(sampling.top_k_logits(logits_BV, 0), LOGITS_BV)


def test_same_key_same_tokens_and_traced_settings_agree():
  logits_NV = jnp.asarray(np.repeat(LOGITS_BV, 50, axis=0))
  draw = lambda seed, **settings: np.asarray(
      sampling.sample(logits_NV, jax.random.key(seed), **settings))
  np.testing.assert_array_equal(draw(3, top_k=6), draw(3, top_k=6))
  assert (draw(3, top_k=6) != draw(4, top_k=6)).any()

  # One compiled function for every setting: the knobs may be traced values.
  traced = jax.jit(functools.partial(sampling.sample, logits_NV))
  for temperature, top_k, top_p in [*SETTINGS, (0.0, 3, 0.5)]:
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        traced(key, temperature=jnp.float32(temperature), top_k=jnp.int32(top_k),
               top_p=jnp.float32(top_p)),
        sampling.sample(logits_NV, key, temperature=temperature, top_k=top_k, top_p=top_p))
  assert traced._cache_size() == 1
