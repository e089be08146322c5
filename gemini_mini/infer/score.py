"""What a model says about replies: per-token log-probabilities, a reply's log-probability and
a reward model's score. Training (DPO, PPO) and evaluation (``evals.preference``) score
replies here alone, so the two never disagree on which positions a reply holds.

Positions follow the batch contract: ``loss_mask[t] = 1`` means the target ``t + 1`` is a
scored token, a token of the reply (``modalities.conversation`` scores the model's turn only).
"""

import jax
import jax.numpy as jnp

from gemini_mini.batch import Batch


def token_logprobs(logits_BTV, targets_BT):
  """``log softmax(logits)[targets]`` in float32: the log-probability of each target."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def reply_masks(batch: Batch, num_replies: int):
  """``mask_BUT``: reply ``u``'s scored positions, ``loss_mask`` where ``segment_ids == u + 1``.

  A row may hold several conversations, each its own segment (``data.preferences.PairStream``
  packs pairs so), and a reply is scored within its segment alone: the segments are numbered
  1, 2, ... from the left, so reply ``u`` of a row is segment ``u + 1``. A row holding fewer
  replies has all-zero masks for the rest.
  """
  if num_replies < 1:
    raise ValueError(f'num_replies={num_replies}: a row holds at least one reply')
  segment_BUT = batch.segment_ids[:, None, :] == jnp.arange(1, num_replies + 1)[None, :, None]
  return batch.loss_mask[:, None, :].astype(jnp.float32) * segment_BUT


def response_logprob(logp_BT, mask_BUT):
  """``sum_t mask[u, t] logp[t]`` per reply: its log-probability given its prompt, which is
  what DPO and the sequence-level KL compare (prompt positions are conditioning, not actions).
  Returns ``logp_BU``."""
  if logp_BT.shape[0] != mask_BUT.shape[0] or logp_BT.shape[-1] != mask_BUT.shape[-1]:
    raise ValueError(f'logp_BT {logp_BT.shape} and mask_BUT {mask_BUT.shape} differ in B or T; '
                     'pass both over the same [B, T] positions')
  return jnp.einsum('BT,BUT->BU', logp_BT, mask_BUT.astype(jnp.float32))


def last_scored_index(mask_T):
  """The position whose *input* token is the reply's last token: ``1 + max{t: mask[t] = 1}``,
  over the last axis (a row's ``loss_mask_BT`` or its replies' ``mask_BUT``).

  The last masked ``t`` predicts the reply's final token (``<end_of_turn>``), which sits at
  ``t + 1`` in the same segment; only the hidden state at ``t + 1`` has read the whole reply,
  so a reward model reads its scalar there. ``t + 1`` is always inside the row, because a mask
  of 1 requires the target to exist. A mask with no scored position gives 0 (the first
  position): callers must only score replies that exist.
  """
  t_T = jnp.arange(mask_T.shape[-1]) + 1
  return jnp.max(jnp.where(mask_T > 0, t_T, 0), axis=-1)


def reply_scores(model, batch: Batch, num_replies: int = 1) -> tuple[jax.Array, dict]:
  """``(score_BU, aux)``: a ``Decoder`` with ``model.scalar_head`` read at each reply's last
  position (``last_scored_index``); ``num_replies`` replies a row (``reply_masks``)."""
  h_BTD, aux = model.hidden(batch)
  scalar_BT = model.scalar_head(h_BTD)
  index_BU = last_scored_index(reply_masks(batch, num_replies))
  return jnp.take_along_axis(scalar_BT, index_BU, axis=1), aux


def reply_logprobs(model, batch: Batch, num_replies: int = 1) -> tuple[jax.Array, dict]:
  """``(logp_BU, aux)``: each reply's log-probability under ``model`` (``reply_masks``)."""
  logits_BTV, aux = model(batch)
  return response_logprob(token_logprobs(logits_BTV, batch.targets),
                          reply_masks(batch, num_replies)), aux
