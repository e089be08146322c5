"""Multi-query attention (Shazeer 2019) with RoPE, segment masking and a KV cache.

``num_kv_heads`` picks the family: 1 is multi-query (MQA, the default, as in the Gemini
reports), ``num_heads`` is multi-head, anything between is grouped-query (GQA). Query heads
are grouped ``N = K * G``: the ``G`` query heads of a group share one key/value head.

Who may attend to whom is decided by data, never by array index: a query sees a key when both
belong to the same segment (packed document) and the key's position is not after the query's
(and, with a local window ``W``, less than ``W`` positions before it). The batch contract
(``gemini_mini.batch``) guarantees that positions count up by one inside each segment, so this
is exactly causal attention within each document.

The score computation itself lives in ``attention_kernels.py`` (dense and chunked).
"""

import dataclasses

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.attention_kernels import (
    KERNELS, attention_mask, cached_attention, chunked_attention, dense_attention)
from gemini_mini.layers.matmul import weight_einsum
from gemini_mini.layers.param import fan_in_init, flatten_tokens, param
from gemini_mini.layers.rope import apply_rope


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of the tokens seen so far, for one attention layer.

  Slots ``[0, end)`` are written; empty slots carry segment id 0, which no real query
  (segment >= 1) attends to. The cache holds ``K`` heads, not ``N``: with multi-query
  attention it is ``num_heads`` times smaller than a multi-head cache (``nbytes`` shows it).
  The caller keeps ``end + new tokens <= max_length`` (XLA would clamp the write).
  """

  k_JHS: jax.Array  # J = B * K (batch major): the layout ``cached_attention``'s matmuls
  v_JHS: jax.Array  # read fastest on XLA:CPU
  segment_ids_BS: jax.Array
  positions_BS: jax.Array
  end: jax.Array  # int32 scalar: the next slot to write

  @classmethod
  def create(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> 'KVCache':
    return cls(
        k_JHS=jnp.zeros((batch_size * num_kv_heads, head_dim, max_length), dtype),
        v_JHS=jnp.zeros((batch_size * num_kv_heads, head_dim, max_length), dtype),
        segment_ids_BS=jnp.zeros((batch_size, max_length), jnp.int32),
        positions_BS=jnp.zeros((batch_size, max_length), jnp.int32),
        end=jnp.zeros((), jnp.int32))

  @property
  def nbytes(self) -> int:
    return self.k_JHS.nbytes + self.v_JHS.nbytes

  def append(self, k_BTKH, v_BTKH, segment_ids_BT, positions_BT) -> 'KVCache':
    """Writes ``T`` new tokens at slot ``end`` and advances it."""
    def write(buffer, new, axis):
      start = [0] * buffer.ndim
      start[axis] = self.end
      return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)
    return KVCache(
        k_JHS=write(self.k_JHS, einops.rearrange(k_BTKH, 'B T K H -> (B K) H T'), 2),
        v_JHS=write(self.v_JHS, einops.rearrange(v_BTKH, 'B T K H -> (B K) H T'), 2),
        segment_ids_BS=write(self.segment_ids_BS, segment_ids_BT, 1),
        positions_BS=write(self.positions_BS, positions_BT, 1),
        end=self.end + k_BTKH.shape[1])


class Attention(nnx.Module):
  """Self-attention with ``num_kv_heads`` shared key/value heads.

  ``attention(x_BTD, segment_ids_BT, positions_BT) -> y_BTD`` attends within ``x`` using
  ``kernel`` ('dense' or 'chunked'). For decoding, ``prefill`` does the same for a prompt and
  writes its keys and values into an empty cache, and ``decode`` appends new tokens to the
  cache and attends over all its slots; both return ``(y_BTD, cache)``. For every token of a
  segment >= 1 the three give the same values as attending over everything seen.
  """

  def __init__(
      self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
      rope_max_wavelength: float = 10_000.0, window: int = 0, kernel: str = 'dense',
      chunk_size: int = 512, dtype=jnp.float32, rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f'num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})')
    if head_dim % 2:
      raise ValueError(f'head_dim ({head_dim}) must be even for RoPE')
    if kernel not in KERNELS:
      raise ValueError(f'unknown attention kernel {kernel!r}; choose one of {KERNELS}')
    self.num_kv_heads = num_kv_heads
    self.rope_max_wavelength = rope_max_wavelength
    self.window = window
    self.kernel = kernel
    self.chunk_size = chunk_size
    self.dtype = dtype
    self.q_DNH = param(rngs, fan_in_init(d_model), (d_model, num_heads, head_dim),
                       ('embed', 'heads', 'head_dim'), contract=('embed',))
    self.k_DKH = param(rngs, fan_in_init(d_model), (d_model, num_kv_heads, head_dim),
                       ('embed', 'kv_heads', 'head_dim'), contract=('embed',))
    self.v_DKH = param(rngs, fan_in_init(d_model), (d_model, num_kv_heads, head_dim),
                       ('embed', 'kv_heads', 'head_dim'), contract=('embed',))
    self.o_NHD = param(rngs, fan_in_init(num_heads * head_dim), (num_heads, head_dim, d_model),
                       ('heads', 'head_dim', 'embed'), contract=('heads', 'head_dim'))

  def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array,
               positions_BT: jax.Array) -> jax.Array:
    q_BTKGH, k_BTKH, v_BTKH = self._project(x_BTD, positions_BT)
    return self._output(self._within(q_BTKGH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT))

  def prefill(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array,
              cache: KVCache) -> tuple[jax.Array, KVCache]:
    """``x`` (a prompt) into an empty ``cache``: it attends within itself with the layer's
    kernel (the chunked one in O(T * chunk) memory), not over the cache's slots."""
    q_BTKGH, k_BTKH, v_BTKH = self._project(x_BTD, positions_BT)
    o_BTKGH = self._within(q_BTKGH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT)
    return self._output(o_BTKGH), cache.append(k_BTKH, v_BTKH, segment_ids_BT, positions_BT)

  def decode(self, x_BTD: jax.Array, segment_ids_BT: jax.Array, positions_BT: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Appends ``x``'s keys and values to ``cache``, then attends over all its slots."""
    q_BTKGH, k_BTKH, v_BTKH = self._project(x_BTD, positions_BT)
    cache = cache.append(k_BTKH, v_BTKH, segment_ids_BT, positions_BT)
    mask_BTS = attention_mask(segment_ids_BT, cache.segment_ids_BS, positions_BT,
                              cache.positions_BS, self.window)
    o_BTKGH = cached_attention(q_BTKGH, cache.k_JHS.astype(self.dtype),
                               cache.v_JHS.astype(self.dtype), mask_BTS)
    return self._output(o_BTKGH), cache

  def _project(self, x_BTD, positions_BT):
    """``(q_BTKGH, k_BTKH, v_BTKH)``: RoPE applied, queries scaled by ``H ** -0.5``."""
    batch, length, _ = x_BTD.shape
    x_XD = flatten_tokens(x_BTD)
    tokens = lambda y_X__: y_X__.reshape(batch, length, *y_X__.shape[1:])
    q_BTNH = tokens(self._matmul('XD,DNH->XNH', x_XD, self.q_DNH))
    k_BTKH = tokens(self._matmul('XD,DKH->XKH', x_XD, self.k_DKH))
    v_BTKH = tokens(self._matmul('XD,DKH->XKH', x_XD, self.v_DKH))
    q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope_max_wavelength)
    k_BTKH = apply_rope(k_BTKH, positions_BT, self.rope_max_wavelength)
    q_BTNH = q_BTNH * q_BTNH.shape[-1] ** -0.5
    q_BTKGH = einops.rearrange(q_BTNH, 'B T (K G) H -> B T K G H', K=self.num_kv_heads)
    return q_BTKGH, k_BTKH, v_BTKH

  def _within(self, q_BTKGH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT):
    """``o_BTKGH`` of ``x``'s tokens attending among themselves with ``kernel``."""
    if self.kernel == 'chunked':
      return chunked_attention(q_BTKGH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT,
                               window=self.window, chunk_size=self.chunk_size)
    mask_BTS = attention_mask(segment_ids_BT, segment_ids_BT, positions_BT, positions_BT,
                              self.window)
    return dense_attention(q_BTKGH, k_BTKH, v_BTKH, mask_BTS)

  def _output(self, o_BTKGH):
    batch, length = o_BTKGH.shape[:2]
    o_XNH = einops.rearrange(o_BTKGH, 'B T K G H -> (B T) (K G) H')
    return self._matmul('XNH,NHD->XD', o_XNH, self.o_NHD).reshape(batch, length, -1)

  def _matmul(self, spec, x, weight):
    return weight_einsum(spec, x, weight[...], self.dtype)
