"""Attention kernels: the same function computed two ways.

``dense_attention`` materialises the ``[T, S]`` score matrix: memory O(T * S), as fast as
chunked at the peers' 512 tokens. ``chunked_attention`` is the flash-attention recipe written
in JAX: queries and keys in blocks of ``chunk_size``, an online softmax over key blocks,
block pairs that the mask rules out wholly skipped, and a hand-written backward that
recomputes each block's probabilities, so forward and backward hold O(T * chunk) scores at a
time. ``cached_attention`` is the dense forward over a KV cache's layouts (decoding). All take
pre-scaled queries grouped as ``q_BTKGH`` and return ``o_BTKGH``; scores and softmax are
float32.
"""

import functools

import einops
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


def cached_attention(
    q_BTKGH: jax.Array, k_JHS: jax.Array, v_JHS: jax.Array, mask_BTS: jax.Array,
) -> jax.Array:
  """``dense_attention`` (forward only) over a KV cache laid out for XLA:CPU's dot: keys and
  values both ``[J, H, S]``, ``J = B * K`` (batch major).

  With the cache as ``[B, S, K, H]``, the dot's reshape of it (dropping ``K = 1``) fused into
  the cache write, so XLA wrote each layer's updated value cache twice and made five copies
  of the cache per layer and decoding step; these layouts are read as they are. Values as
  ``[J, S, H]`` made XLA:CPU emit the probabilities-times-values dot as a slow generic dot
  (4x the time of ``[J, H, S]`` in a decoding step at batch 8).
  """
  B, T, K, G, H = q_BTKGH.shape
  q_JQH = q_BTKGH.transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, H)
  mask_JQS = jnp.repeat(jnp.tile(mask_BTS, (1, G, 1)), K, axis=0)
  scores_JQS = jnp.einsum('JQH,JHS->JQS', q_JQH, k_JHS, preferred_element_type=jnp.float32)
  scores_JQS = jnp.where(mask_JQS, scores_JQS, MASK_VALUE)
  probs_JQS = jax.nn.softmax(scores_JQS, axis=-1).astype(v_JHS.dtype)
  o_JQH = jnp.einsum('JQS,JHS->JQH', probs_JQS, v_JHS)
  return o_JQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)


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
  tolerance, in values and gradients. Tokens are cut into blocks of ``chunk_size``; a pair of
  query and key blocks in which the mask allows no score (above the diagonal, past the window,
  or, in packed rows, between different segments) is skipped at run time, in the forward and
  the backward pass. That is exact because every query may attend to itself, so no row is
  left without a key. The backward pass is flash attention's, written by hand: it recomputes
  each block's probabilities from the saved log-sum-exp, so memory stays O(T * chunk).
  """
  length, groups = q_BTKGH.shape[1], q_BTKGH.shape[3]
  # Host batches hold numpy ids, which the block loops index with traced block numbers.
  segment_ids_BT, positions_BT = jnp.asarray(segment_ids_BT), jnp.asarray(positions_BT)
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  padding = num_chunks * chunk - length
  if padding:
    # Padded tokens get segment id -1: no real token (segment >= 0) ever attends to them.
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2),
                                     constant_values=value)
    q_BTKGH, k_BTKH, v_BTKH, positions_BT = map(pad, (q_BTKGH, k_BTKH, v_BTKH, positions_BT))
    segment_ids_BT = pad(segment_ids_BT, -1)

  # Block axis first (n blocks of c tokens), heads before tokens, and the G query heads of a
  # KV head folded into the query axis (Q = G * c): each block pair is one batched matmul.
  q_nBKQH = einops.rearrange(q_BTKGH, 'B (n c) K G H -> n B K (G c) H', c=chunk)
  k_nBKcH = einops.rearrange(k_BTKH, 'B (n c) K H -> n B K c H', c=chunk)
  v_nBKcH = einops.rearrange(v_BTKH, 'B (n c) K H -> n B K c H', c=chunk)
  seg_nBc = einops.rearrange(segment_ids_BT, 'B (n c) -> n B c', c=chunk)
  pos_nBc = einops.rearrange(positions_BT, 'B (n c) -> n B c', c=chunk)
  o_nBKQH = _chunked_attention(q_nBKQH, k_nBKcH, v_nBKcH, seg_nBc, pos_nBc, window)
  o_BTKGH = einops.rearrange(o_nBKQH, 'n B K (G c) H -> B (n c) K G H', G=groups)
  return o_BTKGH[:, :length].astype(v_BTKH.dtype)


def _block_mask(seg_nBc, pos_nBc, q_block, k_block, window, groups):
  """``mask_BQS`` of one query block (its G heads stacked, as ``Q = G * c``) x one key block."""
  mask_Bcc = attention_mask(seg_nBc[q_block], seg_nBc[k_block], pos_nBc[q_block],
                            pos_nBc[k_block], window)
  return jnp.tile(mask_Bcc, (1, groups, 1))


def _block_scores(q_BKQH, k_BKcH, mask_BQS):
  scores_BKQS = jnp.einsum('BKQH,BKSH->BKQS', q_BKQH, k_BKcH, preferred_element_type=jnp.float32)
  return jnp.where(mask_BQS[:, None], scores_BKQS, MASK_VALUE)


def _chunked_forward(q_nBKQH, k_nBKcH, v_nBKcH, seg_nBc, pos_nBc, window):
  num_chunks = q_nBKQH.shape[0]
  groups = q_nBKQH.shape[3] // k_nBKcH.shape[3]

  def query_block(args):
    q_block, q_BKQH = args

    def step(carry, k_block):
      mask_BQS = _block_mask(seg_nBc, pos_nBc, q_block, k_block, window, groups)

      def attend(carry):
        o_BKQH, max_BKQ, sum_BKQ = carry
        scores_BKQS = _block_scores(q_BKQH, k_nBKcH[k_block], mask_BQS)
        # The running max only stabilises exp(); the result does not depend on it.
        new_max_BKQ = jnp.maximum(max_BKQ, scores_BKQS.max(-1))
        probs_BKQS = jnp.exp(scores_BKQS - new_max_BKQ[..., None])
        rescale_BKQ = jnp.exp(max_BKQ - new_max_BKQ)
        v_BKcH = v_nBKcH[k_block]
        pv_BKQH = jnp.einsum('BKQS,BKSH->BKQH', probs_BKQS.astype(v_BKcH.dtype), v_BKcH,
                             preferred_element_type=jnp.float32)
        return (o_BKQH * rescale_BKQ[..., None] + pv_BKQH, new_max_BKQ,
                sum_BKQ * rescale_BKQ + probs_BKQS.sum(-1))

      return jax.lax.cond(mask_BQS.any(), attend, lambda carry: carry, carry), None

    stats_shape = q_BKQH.shape[:-1]
    init = (jnp.zeros(q_BKQH.shape, jnp.float32), jnp.full(stats_shape, MASK_VALUE),
            jnp.zeros(stats_shape, jnp.float32))
    (o_BKQH, max_BKQ, sum_BKQ), _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
    return o_BKQH / sum_BKQ[..., None], max_BKQ + jnp.log(sum_BKQ)

  o_nBKQH, logsumexp_nBKQ = jax.lax.map(query_block, (jnp.arange(num_chunks), q_nBKQH))
  o_nBKQH = o_nBKQH.astype(v_nBKcH.dtype)
  return o_nBKQH, (q_nBKQH, k_nBKcH, v_nBKcH, seg_nBc, pos_nBc, o_nBKQH, logsumexp_nBKQ)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked_attention(q_nBKQH, k_nBKcH, v_nBKcH, seg_nBc, pos_nBc, window):
  return _chunked_forward(q_nBKQH, k_nBKcH, v_nBKcH, seg_nBc, pos_nBc, window)[0]


def _chunked_backward(window, residuals, do_nBKQH):
  q_nBKQH, k_nBKcH, v_nBKcH, seg_nBc, pos_nBc, o_nBKQH, logsumexp_nBKQ = residuals
  f32 = jnp.float32
  num_chunks = q_nBKQH.shape[0]
  groups = q_nBKQH.shape[3] // k_nBKcH.shape[3]
  # rowsum(dP * P) = rowsum(dO * O), per query row.
  row_nBKQ = jnp.einsum('nBKQH,nBKQH->nBKQ', do_nBKQH.astype(f32), o_nBKQH.astype(f32))

  def query_block(dkv, args):
    q_block, q_BKQH, do_BKQH, logsumexp_BKQ, row_BKQ = args

    def step(carry, k_block):
      mask_BQS = _block_mask(seg_nBc, pos_nBc, q_block, k_block, window, groups)

      def accumulate(carry):
        dq_BKQH, dk_nBKcH, dv_nBKcH = carry
        k_BKcH, v_BKcH = k_nBKcH[k_block], v_nBKcH[k_block]
        scores_BKQS = _block_scores(q_BKQH, k_BKcH, mask_BQS)
        probs_BKQS = jnp.exp(scores_BKQS - logsumexp_BKQ[..., None])
        dv_BKcH = jnp.einsum('BKQS,BKQH->BKSH', probs_BKQS.astype(do_BKQH.dtype), do_BKQH,
                             preferred_element_type=f32)
        dprobs_BKQS = jnp.einsum('BKQH,BKSH->BKQS', do_BKQH, v_BKcH, preferred_element_type=f32)
        dscores_BKQS = (probs_BKQS * (dprobs_BKQS - row_BKQ[..., None])).astype(q_BKQH.dtype)
        dq_BKQH += jnp.einsum('BKQS,BKSH->BKQH', dscores_BKQS, k_BKcH, preferred_element_type=f32)
        dk_BKcH = jnp.einsum('BKQS,BKQH->BKSH', dscores_BKQS, q_BKQH, preferred_element_type=f32)
        return dq_BKQH, dk_nBKcH.at[k_block].add(dk_BKcH), dv_nBKcH.at[k_block].add(dv_BKcH)

      return jax.lax.cond(mask_BQS.any(), accumulate, lambda carry: carry, carry), None

    (dq_BKQH, *dkv), _ = jax.lax.scan(step, (jnp.zeros(q_BKQH.shape, f32), *dkv),
                                      jnp.arange(num_chunks))
    return tuple(dkv), dq_BKQH

  zeros_kv = jnp.zeros(k_nBKcH.shape, f32)
  (dk_nBKcH, dv_nBKcH), dq_nBKQH = jax.lax.scan(
      query_block, (zeros_kv, zeros_kv),
      (jnp.arange(num_chunks), q_nBKQH, do_nBKQH, logsumexp_nBKQ, row_nBKQ))
  return (dq_nBKQH.astype(q_nBKQH.dtype), dk_nBKcH.astype(k_nBKcH.dtype),
          dv_nBKcH.astype(v_nBKcH.dtype), None, None)


_chunked_attention.defvjp(_chunked_forward, _chunked_backward)
