"""The training objective: next-token cross-entropy plus the MoE router losses.

    loss = cross_entropy + load_balance_weight * load_balance + router_z_weight * router_z
           + logit_z_weight * logit_z

Distillation (``train.stage: distill``) weighs the cross-entropy by ``1 - alpha`` and adds
``alpha * T**2 * distill_kl``, the KL from the teacher's predictions to the student's, both
softened by the temperature ``T`` (Hinton et al. 2015: the ``T**2`` keeps the soft term's
gradient on the scale of the hard one's as ``T`` changes).

Every term is returned in the metrics, and the cross-entropy also per context modality: a
position counts as ``image`` (``audio``) when its document contains an image (audio), and as
``text`` when its document is text only.
"""

import dataclasses

import jax
import jax.numpy as jnp

from gemini_mini.batch import Batch, Modality


@dataclasses.dataclass(frozen=True)
class LossWeights:
  load_balance: float = 0.01
  router_z: float = 0.001
  logit_z: float = 0.0  # PaLM's z-loss on the output softmax normaliser
  cross_entropy: float = 1.0  # 1 - alpha when distilling
  distill_kl: float = 0.0     # alpha * T**2 when distilling

  @classmethod
  def distillation(cls, load_balance, router_z, logit_z, alpha: float, temperature: float):
    return cls(load_balance, router_z, logit_z, cross_entropy=1.0 - alpha,
               distill_kl=alpha * temperature**2)


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-position negative log-likelihood and ``logsumexp`` of the logits (float32)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT - target_logit_BT, log_z_BT


def distill_kl(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array,
               temperature: float) -> jax.Array:
  """``KL(teacher_T || student_T)`` per position (float32), each softmax at ``temperature``."""
  log_q_BTV = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature)
  log_p_BTV = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / temperature)
  return jnp.sum(jnp.exp(log_p_BTV) * (log_p_BTV - log_q_BTV), axis=-1)


def document_contains(batch: Batch, modality: Modality) -> jax.Array:
  """``[B, T]`` bool: whether the position's segment (document) has any ``modality`` position."""
  batch_size, length = batch.segment_ids.shape
  key_BT = batch.segment_ids + (length + 1) * jnp.arange(batch_size)[:, None]
  has_BT = (batch.modality == modality).astype(jnp.int32)
  per_segment = jax.ops.segment_max(has_BT.ravel(), key_BT.ravel(),
                                    num_segments=batch_size * (length + 1))
  return per_segment[key_BT] > 0


def loss_sums(logits_BTV: jax.Array, aux: dict, batch: Batch, weights: LossWeights,
              teacher_logits_BTV: jax.Array | None = None, temperature: float = 1.0):
  """Unnormalised sums, so that micro-batches accumulate exactly: returns
  ``(objective_numerator, sums)`` where the objective is ``numerator / sums['tokens']``.
  With ``teacher_logits_BTV`` the sums hold ``distill_kl`` over the same positions."""
  nll_BT, log_z_BT = token_nll(logits_BTV, batch.targets)
  mask_BT = batch.loss_mask.astype(jnp.float32)
  tokens = mask_BT.sum()
  has_image, has_audio = document_contains(batch, Modality.IMAGE), document_contains(batch, Modality.AUDIO)
  context = {'text': ~(has_image | has_audio), 'image': has_image, 'audio': has_audio}
  sums = {
      'tokens': tokens,
      'cross_entropy': (nll_BT * mask_BT).sum(),
      'logit_z': (log_z_BT ** 2 * mask_BT).sum(),
      # Router losses are per-batch means; weight them by tokens so sums stay additive.
      'load_balance': aux['load_balance'] * tokens,
      'router_z': aux['router_z'] * tokens,
  }
  for name, in_context_BT in context.items():
    sums[f'cross_entropy_{name}'] = (nll_BT * mask_BT * in_context_BT).sum()
    sums[f'tokens_{name}'] = (mask_BT * in_context_BT).sum()
  numerator = (weights.cross_entropy * sums['cross_entropy']
               + weights.load_balance * sums['load_balance']
               + weights.router_z * sums['router_z'] + weights.logit_z * sums['logit_z'])
  if teacher_logits_BTV is not None:
    kl_BT = distill_kl(logits_BTV, teacher_logits_BTV, temperature)
    sums['distill_kl'] = (kl_BT * mask_BT).sum()
    numerator = numerator + weights.distill_kl * sums['distill_kl']
  return numerator, sums


def finalize(sums: dict, weights: LossWeights) -> dict:
  """Means from accumulated sums: ``loss`` and each of its parts."""
  tokens = jnp.maximum(sums['tokens'], 1.0)
  metrics = {name: sums[name] / tokens
             for name in ('cross_entropy', 'logit_z', 'load_balance', 'router_z', 'distill_kl')
             if name in sums}
  metrics['loss'] = (weights.cross_entropy * metrics['cross_entropy']
                     + weights.load_balance * metrics['load_balance']
                     + weights.router_z * metrics['router_z'] + weights.logit_z * metrics['logit_z']
                     + weights.distill_kl * metrics.get('distill_kl', 0.0))
  for name in ('text', 'image', 'audio'):
    # NaN when a batch has no such context: "no measurement", not a loss of zero.
    metrics[f'cross_entropy_{name}'] = jnp.where(
        sums[f'tokens_{name}'] > 0, sums[f'cross_entropy_{name}'] / jnp.maximum(sums[f'tokens_{name}'], 1.0), jnp.nan)
  metrics['tokens'] = sums['tokens']
  return metrics
