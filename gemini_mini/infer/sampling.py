"""Next-token choice from logits ``[B, V]``: greedy, temperature, top-k, top-p (nucleus).

``sample`` applies them in the usual order: divide by the temperature, keep the ``top_k``
most likely tokens, keep the smallest set of those whose probability reaches ``top_p``
(renormalised after top-k), then draw from the renormalised kept set. Temperature 0 is
greedy. Every knob may be a traced scalar, so one compiled decode loop serves any setting;
the filters therefore find their cut-off by sorting rather than with ``jax.lax.top_k``,
whose ``k`` must be static. Tokens tied with the last kept logit are all kept.

Sorting ``[B, V]`` dominates a decoding step on CPU (two sorts of 8 x 8,192 logits took
longer than the model's step), so the work is skipped at run time where it changes nothing:
``lax.cond`` runs only the greedy branch at temperature 0 and sorts only when a filter is
on, and then once for both filters.
"""

import jax
import jax.numpy as jnp


def greedy(logits_BV: jax.Array) -> jax.Array:
  """The most likely token of each row, ``tokens_B`` int32."""
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def apply_temperature(logits_BV: jax.Array, temperature) -> jax.Array:
  """``logits_BV / temperature`` in float32; ``temperature`` > 0 (below 1 sharpens)."""
  return logits_BV.astype(jnp.float32) / temperature


def _descending(logits_BV: jax.Array) -> jax.Array:
  return -jnp.sort(-logits_BV, axis=-1)


def _top_k_threshold(sorted_BV: jax.Array, k) -> jax.Array:
  """``[B, 1]``: the ``k``-th largest logit (the smallest, for ``k`` = 0), ``sorted_BV``
  descending."""
  vocab = sorted_BV.shape[-1]
  count = jnp.where(k > 0, jnp.minimum(k, vocab), vocab)
  return jax.lax.dynamic_slice_in_dim(sorted_BV, count - 1, 1, axis=-1)


def _top_p_threshold(sorted_BV: jax.Array, p) -> jax.Array:
  """``[B, 1]``: the smallest logit of the most likely set whose probability reaches ``p``,
  ``sorted_BV`` descending (-inf entries have probability 0); -inf for ``p`` >= 1, which
  keeps all (even where float rounding of the running sum would drop the least likely)."""
  probs_BV = jax.nn.softmax(sorted_BV.astype(jnp.float32), axis=-1)
  # A token is needed while the tokens above it hold less than p: exclusive running sum.
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  count_B = jnp.maximum(jnp.sum(mass_before_BV < p, axis=-1), 1)
  threshold_B1 = jnp.take_along_axis(sorted_BV, count_B[:, None] - 1, axis=-1)
  return jnp.where(p >= 1, -jnp.inf, threshold_B1)


def _keep_from(logits_BV: jax.Array, threshold_B1: jax.Array) -> jax.Array:
  return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def top_k_logits(logits_BV: jax.Array, k) -> jax.Array:
  """Keeps the ``k`` largest logits of each row, the rest -inf; ``k`` = 0 keeps all."""
  return _keep_from(logits_BV, _top_k_threshold(_descending(logits_BV), k))


def top_p_logits(logits_BV: jax.Array, p) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches ``p`` in (0, 1].

  The most likely token is always kept; ``p`` = 1 keeps all. -inf logits stay -inf.
  """
  return _keep_from(logits_BV, _top_p_threshold(_descending(logits_BV), p))


def filter_logits(logits_BV: jax.Array, *, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
  """Temperature, then top-k, then top-p: the logits ``sample`` draws from (float32).

  ``softmax`` of the result is the sampling distribution: the kept tokens' probabilities
  renormalised, every other token exactly 0. Needs ``temperature`` > 0. One sort serves
  both filters, and none runs when both are off (``top_k`` = 0, ``top_p`` >= 1).
  """
  logits_BV = apply_temperature(logits_BV, temperature)

  def filtered(logits_BV):
    sorted_BV = _descending(logits_BV)
    top_k_B1 = _top_k_threshold(sorted_BV, top_k)
    # Top-p renormalises over what top-k kept: the sorted row with the rest at -inf.
    top_p_B1 = _top_p_threshold(_keep_from(sorted_BV, top_k_B1), top_p)
    return _keep_from(logits_BV, jnp.maximum(top_k_B1, top_p_B1))

  return jax.lax.cond((top_k > 0) | (top_p < 1), filtered, lambda logits_BV: logits_BV,
                      logits_BV)


def sample(logits_BV: jax.Array, key: jax.Array, *, temperature=1.0, top_k=0, top_p=1.0
           ) -> jax.Array:
  """One token per row, ``tokens_B`` int32.

  Args:
    logits_BV: next-token logits.
    key: a PRNG key; the same key gives the same tokens.
    temperature: >= 0; 0 is greedy (``top_k`` and ``top_p`` then change nothing, since the
      most likely token is always kept).
    top_k: keep this many most likely tokens; 0 keeps all.
    top_p: keep the smallest most-likely set whose probability reaches this, in (0, 1].
  """
  def sampled(logits_BV):
    filtered_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sampled, greedy, logits_BV)
