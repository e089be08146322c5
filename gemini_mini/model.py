"""The Gemini-style decoder: interleaved text, image and audio in, next-token logits out.

    x = embed(batch)                        # text tokens, image patches, audio frames -> x_BTD
    for block in blocks:                    # pre-norm residual blocks
      x = x + attention(norm(x))            # multi-query attention, RoPE, segment-causal mask
      x = x + ffn(norm(x))                  # gated MLP, or top-k MoE every moe_every-th layer
    logits = unembed(norm(x))               # float32 logits_BTV

This is the only module that reads ``ModelConfig``; every layer below takes plain dimensions.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.batch import Batch, Modality
from gemini_mini.config import ModelConfig
from gemini_mini.layers import (
    Attention, FeatureEmbed, GatedMLP, KVCache, MoE, RMSNorm, TokenEmbed)
from gemini_mini.parallel import constrain


def compute_dtype(config: ModelConfig):
  return jnp.dtype(config.dtype)


class DecoderBlock(nnx.Module):
  """Pre-norm block: ``x + attention(norm(x))``, then ``x + ffn(norm(x))``."""

  def __init__(self, config: ModelConfig, *, use_moe: bool, rngs: nnx.Rngs):
    dtype = compute_dtype(config)
    self.attention_norm = RMSNorm(config.d_model, rngs=rngs)
    self.attention = Attention(
        config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
        rope_max_wavelength=config.rope_max_wavelength, window=config.attention_window,
        kernel=config.attention_kernel, chunk_size=config.attention_chunk, dtype=dtype,
        rngs=rngs)
    self.ffn_norm = RMSNorm(config.d_model, rngs=rngs)
    if use_moe:
      self.ffn = MoE(config.d_model, config.d_ff, config.num_experts, config.experts_per_token,
                     dispatch=config.moe_dispatch, capacity_factor=config.capacity_factor,
                     shared_expert=config.shared_expert, dtype=dtype, rngs=rngs)
    else:
      self.ffn = GatedMLP(config.d_model, config.d_ff, dtype=dtype, rngs=rngs)

  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache: KVCache | None = None):
    """Returns ``(x_BTD, moe_aux or None, cache)``."""
    h_BTD, cache = self.attention(self.attention_norm(x_BTD), segment_ids_BT, positions_BT, cache)
    x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
    moe_aux = None
    if isinstance(self.ffn, MoE):
      h_BTD, moe_aux = self.ffn(self.ffn_norm(x_BTD), segment_ids_BT != 0)
    else:
      h_BTD = self.ffn(self.ffn_norm(x_BTD))
    return x_BTD + h_BTD.astype(x_BTD.dtype), moe_aux, cache


class Decoder(nnx.Module):
  """``decoder(batch) -> (logits_BTV, aux)``; ``decoder.decode(batch, cache)`` for inference.

  ``aux`` (all float32): ``load_balance`` and ``router_z`` averaged over MoE layers (0 for a
  dense model); per MoE layer L: ``dropped_L`` (fraction of routed slots dropped),
  ``expert_load_LE`` (fraction of routed slots per expert) and
  ``expert_load_by_modality_LME`` (the same, per modality M = text, image, audio).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = compute_dtype(config)
    self.text = TokenEmbed(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
    self.image = FeatureEmbed(config.patch_dim, config.d_model, config.d_ff, dtype=dtype, rngs=rngs)
    self.audio = FeatureEmbed(config.audio_dim, config.d_model, config.d_ff, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        DecoderBlock(config, use_moe=config.is_moe_layer(i), rngs=rngs)
        for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, rngs=rngs)

  def embed(self, batch: Batch) -> jax.Array:
    """``x_BTD``: token embeddings, with each image/audio position replaced by the next
    encoded patch/frame of its row (the k-th image position takes patch k)."""
    x_BTD = self.text.embed(batch.tokens)
    for modality, encoder, items_BXI in ((Modality.IMAGE, self.image, batch.patches),
                                         (Modality.AUDIO, self.audio, batch.audio)):
      is_item_BT = batch.modality == modality
      item_BXD = encoder(items_BXI)
      index_BT = jnp.clip(jnp.cumsum(is_item_BT, axis=1) - 1, 0, item_BXD.shape[1] - 1)
      item_BTD = jnp.take_along_axis(item_BXD, index_BT[..., None], axis=1)
      x_BTD = jnp.where(is_item_BT[..., None], item_BTD.astype(x_BTD.dtype), x_BTD)
    return x_BTD

  def __call__(self, batch: Batch) -> tuple[jax.Array, dict]:
    logits_BTV, moe_auxes, _ = self._forward(batch, None)
    return logits_BTV, self._collect_aux(moe_auxes, batch)

  def init_cache(self, batch_size: int, max_length: int) -> tuple[KVCache, ...]:
    """Empty KV caches, one per layer, for ``decode``."""
    c = self.config
    return tuple(KVCache.create(batch_size, max_length, c.num_kv_heads, c.head_dim,
                                compute_dtype(c)) for _ in range(c.num_layers))

  def decode(self, batch: Batch, cache: tuple[KVCache, ...]):
    """Appends ``batch`` (a prompt, or one new token per row) to ``cache`` and returns
    ``(logits_BTV, cache)``. The logits equal the full forward pass over everything seen."""
    logits_BTV, _, cache = self._forward(batch, cache)
    return logits_BTV, cache

  def _forward(self, batch: Batch, cache):
    x_BTD = self.embed(batch)
    moe_auxes, new_cache = [], []
    for i, block in enumerate(self.blocks):
      x_BTD = constrain(x_BTD, ('batch', 'length', 'activation_embed'))
      run_block = nnx.remat(type(block).__call__) if self.config.remat else type(block).__call__
      x_BTD, moe_aux, layer_cache = run_block(block, x_BTD, batch.segment_ids, batch.positions,
                                              None if cache is None else cache[i])
      new_cache.append(layer_cache)
      if moe_aux is not None:
        moe_auxes.append(moe_aux)
    x_BTD = constrain(x_BTD, ('batch', 'length', 'activation_embed'))
    logits_BTV = self.text.logits(self.final_norm(x_BTD))
    return logits_BTV, moe_auxes, tuple(new_cache)

  def _collect_aux(self, moe_auxes: list[dict], batch: Batch) -> dict:
    num_experts = max(self.config.num_experts, 1)
    if not moe_auxes:
      zero = jnp.zeros((), jnp.float32)
      return {'load_balance': zero, 'router_z': zero, 'dropped_L': jnp.zeros((0,)),
              'expert_load_LE': jnp.zeros((0, num_experts)),
              'expert_load_by_modality_LME': jnp.zeros((0, len(Modality), num_experts))}
    stack = lambda key: jnp.stack([aux[key] for aux in moe_auxes])
    valid_BT = (batch.segment_ids != 0).astype(jnp.float32)
    modality_BTM = jax.nn.one_hot(batch.modality, len(Modality)) * valid_BT[..., None]
    routed_LBTE = stack('routed_BTE')
    slots_LM = jnp.einsum('BTM,LBTE->LM', modality_BTM, routed_LBTE)
    load_by_modality_LME = (jnp.einsum('BTM,LBTE->LME', modality_BTM, routed_LBTE)
                            / jnp.maximum(slots_LM, 1)[..., None])
    return {
        'load_balance': stack('load_balance').mean(),
        'router_z': stack('router_z').mean(),
        'dropped_L': stack('dropped'),
        'expert_load_LE': stack('expert_load_E'),
        'expert_load_by_modality_LME': load_by_modality_LME,
    }
