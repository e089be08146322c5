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


def response_logprob(logp_BT, loss_mask_BT):
  """``sum_t mask[t] logp[t]``: the log-probability of the reply given its prompt, which is
  what DPO and the sequence-level KL compare (prompt positions are conditioning, not actions)."""
  if logp_BT.shape != loss_mask_BT.shape:
    raise ValueError(f'logp_BT {logp_BT.shape} and loss_mask_BT {loss_mask_BT.shape} differ; '
                     'pass both over the same [B, T] positions')
  return (logp_BT * loss_mask_BT.astype(jnp.float32)).sum(axis=-1)


def last_scored_index(loss_mask_BT):
  """The position whose *input* token is the reply's last token: ``1 + max{t: mask[t] = 1}``.

  The last masked ``t`` predicts the reply's final token (``<end_of_turn>``), which sits at
  ``t + 1``; only the hidden state at ``t + 1`` has read the whole reply, so a reward model
  reads its scalar there. ``t + 1`` is always inside the row, because a mask of 1 requires the
  target to exist. A row with no scored position gives 0 (the first position): callers must
  only score rows that hold a reply.
  """
  t_BT = jnp.arange(loss_mask_BT.shape[-1]) + 1
  return jnp.max(jnp.where(loss_mask_BT > 0, t_BT, 0), axis=-1)


def reply_scores(model, batch: Batch) -> tuple[jax.Array, dict]:
  """``(score_B, aux)``: a ``Decoder`` with ``model.scalar_head`` read at each row's last
  reply position (``last_scored_index``)."""
  h_BTD, aux = model.hidden(batch)
  scalar_BT = model.scalar_head(h_BTD)
  index_B = last_scored_index(batch.loss_mask)
  return jnp.take_along_axis(scalar_BT, index_B[:, None], axis=1)[:, 0], aux


def reply_logprobs(model, batch: Batch) -> tuple[jax.Array, dict]:
  """``(logp_B, aux)``: each row's log-probability of its reply under ``model``."""
  logits_BTV, aux = model(batch)
  return response_logprob(token_logprobs(logits_BTV, batch.targets), batch.loss_mask), aux
