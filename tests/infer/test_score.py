"""Scoring replies: log-probabilities against numpy, the reply's positions by hand, and the
reward model's score against each row run alone."""

import jax.numpy as jnp
import numpy as np

from gemini_mini.infer import score
from gemini_mini.modalities.interleave import row_fields


def _log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_token_logprobs_are_the_log_softmax_at_the_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 6)).astype(np.float32) * 3
  targets = rng.integers(0, 6, (2, 4))
  logp = score.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
  expected = np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, expected, rtol=1e-5)
  assert logp.dtype == jnp.float32


def test_response_logprob_sums_the_reply_positions_only():
  logp = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -8.0, -8.0]])
  mask = jnp.array([[0, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  np.testing.assert_allclose(score.response_logprob(logp, mask), [-5.0, -0.75])


def test_last_scored_index_is_where_the_reply_end_is_the_input():
  bos, user, model, end = 1, 2, 3, 4
  prompt = np.array([bos, user, 20, 21, end, model])
  reply = np.array([30, 31, end])
  row = row_fields([np.concatenate([prompt, reply]), np.array([5, 6])],
                   [np.zeros(9, np.int8), np.zeros(2, np.int8)], seq_len=12,
                   scored=[np.arange(9) >= 6, np.zeros(2, bool)])
  # The contract's mask: position t scores the target t + 1, so t = 5 (<model>) .. 7.
  np.testing.assert_array_equal(np.flatnonzero(row['loss_mask']), [5, 6, 7])
  masks = np.stack([row['loss_mask'], [0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0], np.zeros(12)])
  index = np.asarray(score.last_scored_index(jnp.asarray(masks)))
  np.testing.assert_array_equal(index, [8, 6, 0])
  assert row['tokens'][index[0]] == end  # the hidden state there has read the whole reply
