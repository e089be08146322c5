"""Scoring replies: log-probabilities against numpy, the reply's positions by hand, packed
replies against a loop over segments, and a packed reply's score and log-probability against
the same conversation alone in a row."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_mini.batch import Batch
from gemini_mini.config import ModelConfig
from gemini_mini.infer import score
from gemini_mini.model import Decoder
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


def test_response_logprob_sums_each_replys_positions_only():
  logp = jnp.array([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -8.0, -8.0]])
  mask = jnp.array([[[0, 1, 1, 0], [0, 0, 0, 1]], [[1, 1, 0, 0], [0, 0, 0, 0]]], jnp.float32)
  np.testing.assert_allclose(score.response_logprob(logp, mask), [[-5.0, -4.0], [-0.75, 0.0]])


def _packed_rows():
  """Two rows: three conversations (prompt, reply) packed, and one alone; the reply of each
  conversation scored."""
  bos, user, model, end = 1, 2, 3, 4
  rng = np.random.default_rng(5)
  conversations = [np.concatenate([[bos, user], rng.integers(10, 40, n), [end, model],
                                   rng.integers(10, 40, m), [end]])
                   for n, m in ((3, 2), (5, 4), (2, 1), (4, 3))]
  scored = [np.arange(len(c)) > int(np.flatnonzero(c == model)[0]) for c in conversations]
  rows = [row_fields(conversations[:3], [np.zeros(len(c), np.int8) for c in conversations[:3]],
                     seq_len=40, scored=scored[:3]),
          row_fields(conversations[3:], [np.zeros(len(conversations[3]), np.int8)], seq_len=40,
                     scored=scored[3:])]
  fields = {name: np.stack([row[name] for row in rows]) for name in rows[0]}
  return Batch(**fields, patches=np.zeros((2, 1, 4), np.float32),
               audio=np.zeros((2, 1, 6), np.float32)), conversations


def test_reply_masks_hold_each_segments_reply_as_a_loop_finds_it():
  batch, conversations = _packed_rows()
  masks = np.asarray(score.reply_masks(batch, 4))
  assert masks.shape == (2, 4, 40)
  for b in range(2):
    for u in range(4):
      expected = [batch.loss_mask[b, t] if batch.segment_ids[b, t] == u + 1 else 0.0
                  for t in range(40)]
      np.testing.assert_array_equal(masks[b, u], expected)
  index = np.asarray(score.last_scored_index(jnp.asarray(masks)))
  # Each reply's <end_of_turn>, in its own segment; none for segments a row does not hold.
  ends = np.cumsum([len(c) for c in conversations[:3]]) - 1
  np.testing.assert_array_equal(index, [[*ends, 0], [len(conversations[3]) - 1, 0, 0, 0]])
  with pytest.raises(ValueError, match='num_replies=0'):
    score.reply_masks(batch, 0)


def test_a_packed_reply_scores_as_it_does_alone_in_a_row():
  config = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                       head_dim=8, d_ff=64, num_experts=4, experts_per_token=2, patch_dim=4,
                       audio_dim=6, max_length=64, moe_dispatch='dropless', scalar_head=True)
  model = Decoder(config, rngs=nnx.Rngs(0))
  batch, conversations = _packed_rows()
  packed_scores = np.asarray(score.reply_scores(model, batch, 3)[0])
  packed_logp = np.asarray(score.reply_logprobs(model, batch, 3)[0])
  for u, conversation in enumerate(conversations[:3]):
    alone = row_fields([conversation], [np.zeros(len(conversation), np.int8)], seq_len=40,
                       scored=[np.arange(len(conversation))
                               > int(np.flatnonzero(conversation == 3)[0])])
    single = Batch(**{name: value[None] for name, value in alone.items()},
                   patches=np.zeros((1, 1, 4), np.float32), audio=np.zeros((1, 1, 6), np.float32))
    np.testing.assert_allclose(packed_scores[0, u], score.reply_scores(model, single)[0][0, 0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logp[0, u], score.reply_logprobs(model, single)[0][0, 0],
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(packed_scores[1, 1:], packed_scores[1, 1])  # absent: position 0
  np.testing.assert_array_equal(packed_logp[1, 1:], 0.0)


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
