"""Attention kernels: the same function computed two ways.

``dense_attention`` materialises the ``[T, S]`` score matrix: fastest at short lengths, memory
O(T * S). ``chunked_attention`` is the flash-attention recipe written in JAX: queries in
blocks of ``chunk_size``, an online softmax over key blocks, key blocks that the causal mask
(or the local window) rules out skipped, and each query block rematerialised in the backward
pass, so forward and backward hold O(T * chunk) scores at a time. Both take pre-scaled
queries grouped as ``q_BTKGH`` and return ``o_BTKGH``; scores and softmax are float32.
"""

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: a fully masked row stays NaN-free, and exp() of it is exactly 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
KERNELS = ('dense', 'chunked')


def attention_mask(
    q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array,
    q_positions_BT: jax.Array, kv_positions_BS: jax.Array, window: int,
) -> jax.Array:
  """``mask_BTS``: True where query t may attend to key s (same segment, causal, window)."""
  same_segment = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  distance_BTS = q_positions_BT[:, :, None] - kv_positions_BS[:, None, :]
  mask = same_segment & (distance_BTS >= 0)
  if window:
    mask &= distance_BTS < window
  return mask


def dense_attention(
    q_BTKGH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array,
) -> jax.Array:
  """Softmax attention over the full ``[T, S]`` score matrix.

  The G query heads sharing a KV head are folded into the query axis (``Q = G * T``), so
  each (batch, KV head) is one ``[Q, H] x [H, S]`` matmul. The backward pass is written by
  hand, as flash attention's: ``dS = P * (dP - rowsum(dO * O))`` from the saved
  probabilities. Together they make XLA:CPU's forward + backward 1.3x (8 x 512 tokens) to
  2.4x (2 x 2048) faster than the autodiff of ``dense_attention_reference``, which gives the
  same values (``bench/dense_attention.py``).
  """
  B, T, K, G, H = q_BTKGH.shape
  q_BKQH = q_BTKGH.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  mask_BQS = jnp.tile(mask_BTS, (1, G, 1))
  o_BKQH = _dense_attention(q_BKQH, k_BSKH, v_BSKH, mask_BQS)
  return o_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)


def dense_attention_reference(
    q_BTKGH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array,
) -> jax.Array:
  """``dense_attention`` as the textbook writes it, differentiated by JAX."""
  scores_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
  return jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS.astype(v_BSKH.dtype), v_BSKH)


def _dense_forward(q_BKQH, k_BSKH, v_BSKH, mask_BQS):
  scores_BKQS = jnp.einsum('BKQH,BSKH->BKQS', q_BKQH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKQS = jnp.where(mask_BQS[:, None], scores_BKQS, MASK_VALUE)
  exp_BKQS = jnp.exp(scores_BKQS - jnp.max(scores_BKQS, axis=-1, keepdims=True))
  probs_BKQS = (exp_BKQS / jnp.sum(exp_BKQS, axis=-1, keepdims=True)).astype(v_BSKH.dtype)
  o_BKQH = jnp.einsum('BKQS,BSKH->BKQH', probs_BKQS, v_BSKH)
  return o_BKQH, (q_BKQH, k_BSKH, v_BSKH, probs_BKQS, o_BKQH)


@jax.custom_vjp
def _dense_attention(q_BKQH, k_BSKH, v_BSKH, mask_BQS):
  return _dense_forward(q_BKQH, k_BSKH, v_BSKH, mask_BQS)[0]


def _dense_backward(residuals, do_BKQH):
  q_BKQH, k_BSKH, v_BSKH, probs_BKQS, o_BKQH = residuals
  f32 = jnp.float32
  dv_BSKH = jnp.einsum('BKQS,BKQH->BSKH', probs_BKQS, do_BKQH, preferred_element_type=f32)
  dprobs_BKQS = jnp.einsum('BKQH,BSKH->BKQS', do_BKQH, v_BSKH, preferred_element_type=f32)
  # rowsum(dP * P) = rowsum(dO * O): a [Q] vector without another pass over [Q, S].
  row_BKQ = jnp.einsum('BKQH,BKQH->BKQ', do_BKQH.astype(f32), o_BKQH.astype(f32))
  dscores_BKQS = (probs_BKQS * (dprobs_BKQS - row_BKQ[..., None])).astype(q_BKQH.dtype)
  dq_BKQH = jnp.einsum('BKQS,BSKH->BKQH', dscores_BKQS, k_BSKH, preferred_element_type=f32)
  dk_BSKH = jnp.einsum('BKQS,BKQH->BSKH', dscores_BKQS, q_BKQH, preferred_element_type=f32)
  return (dq_BKQH.astype(q_BKQH.dtype), dk_BSKH.astype(k_BSKH.dtype),
          dv_BSKH.astype(v_BSKH.dtype), None)


_dense_attention.defvjp(_dense_forward, _dense_backward)


def chunked_attention(
    q_BTKGH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
    segment_ids_BT: jax.Array, positions_BT: jax.Array, *, window: int, chunk_size: int,
) -> jax.Array:
  """Self-attention (queries and keys are the same ``T`` tokens) with an online softmax.

  Equal to ``dense_attention`` with ``attention_mask(seg, seg, pos, pos, window)`` to float
  tolerance, in values and gradients. Key blocks lying wholly after a query block, or wholly
  more than ``window`` tokens before it, are skipped: under the batch contract (positions
  count up by one inside a segment) every score in them is masked anyway.
  """
  batch, length, num_kv_heads, groups, head_dim = q_BTKGH.shape
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  padding = num_chunks * chunk - length
  if padding:
    # Padded tokens get segment id -1: no real token (segment >= 0) ever attends to them.
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2),
                                     constant_values=value)
    q_BTKGH, k_BTKH, v_BTKH, positions_BT = map(pad, (q_BTKGH, k_BTKH, v_BTKH, positions_BT))
    segment_ids_BT = pad(segment_ids_BT, -1)

  # Block axis first, for lax.map / lax.scan: x_nBc... with n blocks of c tokens.
  blocks = lambda x: jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)
  q_nBcKGH = blocks(q_BTKGH)
  k_nBcKH, v_nBcKH = blocks(k_BTKH), blocks(v_BTKH)
  seg_nBc, pos_nBc = blocks(segment_ids_BT), blocks(positions_BT)

  def key_block_needed(q_block, k_block):
    first_query, last_query = q_block * chunk, q_block * chunk + chunk - 1
    first_key, last_key = k_block * chunk, k_block * chunk + chunk - 1
    needed = first_key <= last_query
    if window:
      needed &= last_key > first_query - window
    return needed

  @jax.checkpoint  # backward recomputes one query block at a time: O(T * chunk) residuals
  def query_block(args):
    q_block, q_BcKGH, q_seg_Bc, q_pos_Bc = args

    def attend(carry, k_block):
      o_BcKGH, max_BKGc, sum_BKGc = carry
      mask_Bcc = attention_mask(q_seg_Bc, seg_nBc[k_block], q_pos_Bc, pos_nBc[k_block], window)
      scores_BKGcc = jnp.einsum('BTKGH,BSKH->BKGTS', q_BcKGH, k_nBcKH[k_block],
                                preferred_element_type=jnp.float32)
      scores_BKGcc = jnp.where(mask_Bcc[:, None, None], scores_BKGcc, MASK_VALUE)
      # The running max only stabilises exp(); the result does not depend on it.
      new_max_BKGc = jax.lax.stop_gradient(jnp.maximum(max_BKGc, scores_BKGcc.max(-1)))
      probs_BKGcc = jnp.exp(scores_BKGcc - new_max_BKGc[..., None])
      rescale_BKGc = jnp.exp(max_BKGc - new_max_BKGc)
      new_sum_BKGc = sum_BKGc * rescale_BKGc + probs_BKGcc.sum(-1)
      new_o_BcKGH = (jnp.einsum('BTKGH,BKGT->BTKGH', o_BcKGH, rescale_BKGc)
                     + jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGcc, v_nBcKH[k_block],
                                  preferred_element_type=jnp.float32))
      return new_o_BcKGH, new_max_BKGc, new_sum_BKGc

    def step(carry, k_block):
      carry = jax.lax.cond(key_block_needed(q_block, k_block), attend,
                           lambda carry, _: carry, carry, k_block)
      return carry, None

    stats_shape = (batch, num_kv_heads, groups, chunk)
    init = (jnp.zeros(q_BcKGH.shape, jnp.float32), jnp.full(stats_shape, MASK_VALUE),
            jnp.zeros(stats_shape, jnp.float32))
    (o_BcKGH, _, sum_BKGc), _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
    return jnp.einsum('BTKGH,BKGT->BTKGH', o_BcKGH, 1.0 / sum_BKGc)

  o_nBcKGH = jax.lax.map(query_block, (jnp.arange(num_chunks), q_nBcKGH, seg_nBc, pos_nBc))
  o_BTKGH = jnp.moveaxis(o_nBcKGH, 0, 1).reshape(batch, num_chunks * chunk, *o_nBcKGH.shape[3:])
  return o_BTKGH[:, :length].astype(v_BTKH.dtype)
