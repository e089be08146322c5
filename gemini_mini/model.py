"""The Gemini-style decoder: interleaved text, image and audio in, next-token logits out.

    x = embed(batch)                        # text tokens, image patches, audio frames -> x_BTD
    for block in blocks:                    # pre-norm residual blocks
      x = x + attention(norm(x))            # multi-query attention, RoPE, segment-causal mask
      x = x + ffn(norm(x))                  # gated MLP, or top-k MoE every moe_every-th layer
    logits = unembed(norm(x))               # float32 logits_BTV
    scalar = head(norm(x))                  # with model.scalar_head: a reward or value, s_BT

With ``model.scan_layers`` the blocks are stacked instead, Flax NNX's way: ``nnx.vmap``
creates the groups of ``moe_every`` blocks (``moe_every - 1`` dense, then one MoE; one block
per group for a dense model) with a leading ``layers`` axis on every parameter, and
``nnx.scan`` runs them, so the compiled program holds one group whatever the depth. The
logits, aux and caches equal the unrolled loop's for the same parameters; the parameters a
seed gives differ (each group draws from its own split of the seed's streams).

This is the only module that reads ``ModelConfig``; every layer below takes plain dimensions.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.batch import Batch, Modality
from gemini_mini.config import ModelConfig
from gemini_mini.layers import (
    Attention, FeatureEmbed, GatedMLP, KVCache, MoE, RMSNorm, ScalarHead, TokenEmbed)
from gemini_mini.parallel import constrain

LAYERS_AXIS = 'layers'  # logical name of the stacked layer-group axis (replicated)


def compute_dtype(config: ModelConfig):
  return jnp.dtype(config.dtype)


def group_size(config: ModelConfig) -> int:
  """Blocks per scanned group: ``moe_every`` (the last one MoE), or 1 for a dense model."""
  return config.moe_every if config.num_experts else 1


def num_groups(config: ModelConfig) -> int:
  return config.num_layers // group_size(config)


class DecoderBlock(nnx.Module):
  """Pre-norm block: ``x + attention(norm(x))``, then ``x + ffn(norm(x))``."""

  def __init__(self, config: ModelConfig, *, use_moe: bool, rngs: nnx.Rngs):
    dtype = compute_dtype(config)
    self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    self.attention = Attention(
        config.d_model, config.num_heads, config.num_kv_heads, config.head_dim,
        rope_max_wavelength=config.rope_max_wavelength, window=config.attention_window,
        kernel=config.attention_kernel, chunk_size=config.attention_chunk, dtype=dtype,
        rngs=rngs)
    self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    if use_moe:
      self.ffn = MoE(config.d_model, config.d_ff, config.num_experts, config.experts_per_token,
                     dispatch=config.moe_dispatch, capacity_factor=config.capacity_factor,
                     shared_expert=config.shared_expert, activation=config.activation,
                     renormalize=config.renormalize_top_k, dtype=dtype, rngs=rngs)
    else:
      self.ffn = GatedMLP(config.d_model, config.d_ff, activation=config.activation, dtype=dtype,
                          rngs=rngs)

  def __call__(self, x_BTD, segment_ids_BT, positions_BT, cache: KVCache | None = None, *,
               prefill: bool = False):
    """Returns ``(x_BTD, moe_aux or None, cache)``. With a ``cache`` the attention is
    ``Attention.prefill`` (``prefill``: the cache is empty) or ``Attention.decode``."""
    h_BTD = self.attention_norm(x_BTD)
    if cache is None:
      h_BTD = self.attention(h_BTD, segment_ids_BT, positions_BT)
    else:
      attend = self.attention.prefill if prefill else self.attention.decode
      h_BTD, cache = attend(h_BTD, segment_ids_BT, positions_BT, cache)
    x_BTD = x_BTD + h_BTD.astype(x_BTD.dtype)
    moe_aux = None
    if isinstance(self.ffn, MoE):
      h_BTD, moe_aux = self.ffn(self.ffn_norm(x_BTD), segment_ids_BT != 0)
    else:
      h_BTD = self.ffn(self.ffn_norm(x_BTD))
    return x_BTD + h_BTD.astype(x_BTD.dtype), moe_aux, cache


class BlockGroup(nnx.Module):
  """``group_size`` consecutive blocks: one scan step. In a scanned ``Decoder`` every
  parameter carries a leading ``[num_groups]`` axis (``nnx.vmap`` made them)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([DecoderBlock(config, use_moe=config.is_moe_layer(j), rngs=rngs)
                            for j in range(group_size(config))])


class Decoder(nnx.Module):
  """``decoder(batch) -> (logits_BTV, aux)``; ``prefill`` and ``decode`` for inference.

  ``aux`` (all float32): ``load_balance`` and ``router_z`` averaged over MoE layers (0 for a
  dense model); per MoE layer L: ``dropped_L`` (fraction of routed slots dropped),
  ``expert_load_LE`` (fraction of routed slots per expert) and
  ``expert_load_by_modality_LME`` (the same, per modality M = text, image, audio).

  With ``model.scalar_head``, ``scalar_head`` reads one number per position from the same
  final hidden states as the output layer (``hidden``): the reward model's score and PPO's
  value estimate.

  Blocks live in ``blocks`` (one module per layer), or with ``scan_layers`` in ``groups``
  (one ``BlockGroup`` whose parameters are stacked over the groups).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = compute_dtype(config)
    self.text = TokenEmbed(config.vocab_size, config.d_model, tied=config.tie_embeddings,
                           scale_tied=config.scale_tied_logits, dtype=dtype, rngs=rngs)
    features = lambda in_dim: FeatureEmbed(in_dim, config.d_model, config.d_ff,
                                           activation=config.activation,
                                           norm_eps=config.norm_eps, dtype=dtype, rngs=rngs)
    self.image = features(config.patch_dim)
    self.audio = features(config.audio_dim)
    if config.scan_layers:
      @nnx.split_rngs(splits=num_groups(config))
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
      def stacked_groups(rngs):
        return BlockGroup(config, rngs=rngs)
      self.groups = stacked_groups(rngs)
    else:
      self.blocks = nnx.List([
          DecoderBlock(config, use_moe=config.is_moe_layer(i), rngs=rngs)
          for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    if config.scalar_head:
      self.scalar_head = ScalarHead(config.d_model, rngs=rngs)

  def embed(self, batch: Batch) -> jax.Array:
    """``x_BTD``: token embeddings, with each image/audio position replaced by the next
    encoded patch/frame of its row (the k-th image position takes patch k)."""
    x_BTD = self.text.embed(batch.tokens)
    for modality, encoder, items_BXI in ((Modality.IMAGE, self.image, batch.patches),
                                         (Modality.AUDIO, self.audio, batch.audio)):
      if not items_BXI.shape[1]:  # no items of this kind (a decoding step): no encoder to run
        continue
      is_item_BT = batch.modality == modality
      item_BXD = encoder(items_BXI)
      index_BT = jnp.clip(jnp.cumsum(is_item_BT, axis=1) - 1, 0, item_BXD.shape[1] - 1)
      item_BTD = jnp.take_along_axis(item_BXD, index_BT[..., None], axis=1)
      x_BTD = jnp.where(is_item_BT[..., None], item_BTD.astype(x_BTD.dtype), x_BTD)
    return x_BTD

  def __call__(self, batch: Batch) -> tuple[jax.Array, dict]:
    h_BTD, aux = self.hidden(batch)
    return self.text.logits(h_BTD), aux

  def hidden(self, batch: Batch) -> tuple[jax.Array, dict]:
    """``(h_BTD, aux)``: the normalised final hidden states that the output layer
    (``text.logits``) and the ``scalar_head`` read."""
    x_BTD, moe_aux, _ = self._blocks(self.embed(batch), batch)
    return self._final(x_BTD), self._collect_aux(moe_aux, batch)

  def init_cache(self, batch_size: int, max_length: int) -> tuple[KVCache, ...]:
    """Empty KV caches for ``prefill``: one per layer, or when scanned one per block of a
    group whose arrays carry a leading ``[num_groups]`` axis (index g: layer
    ``g * group_size + j``)."""
    c = self.config
    create = lambda: KVCache.create(batch_size, max_length, c.num_kv_heads, c.head_dim,
                                    compute_dtype(c))
    if not c.scan_layers:
      return tuple(create() for _ in range(c.num_layers))
    return tuple(jax.vmap(create, axis_size=num_groups(c))() for _ in range(group_size(c)))

  def prefill(self, batch: Batch, cache: tuple[KVCache, ...], *, last_only: bool = False):
    """Writes ``batch`` (prompts) into the empty ``cache`` and returns ``(logits_BTV, cache)``,
    the logits those of the forward pass: the prompt attends within itself with the configured
    kernel. ``last_only`` gives the last position's alone (``T`` = 1), skipping the output
    layer elsewhere: a prompt needs only the logits of the token after it."""
    x_BTD, _, cache = self._blocks(self.embed(batch), batch, cache, prefill=True)
    return self.text.logits(self._final(x_BTD[:, -1:] if last_only else x_BTD)), cache

  def decode(self, batch: Batch, cache: tuple[KVCache, ...]):
    """Appends ``batch`` (one new token per row, or more) to a ``cache`` that ``prefill``
    wrote, and returns ``(logits_BTV, cache)``: the logits equal the forward pass over
    everything seen."""
    x_BTD, _, cache = self._blocks(self.embed(batch), batch, cache)
    return self.text.logits(self._final(x_BTD)), cache

  def _final(self, x_BTD):
    return self.final_norm(constrain(x_BTD, ('batch', 'length', 'activation_embed')))

  def _blocks(self, x_BTD, batch: Batch, cache=None, *, prefill: bool = False):
    """``(x_BTD, moe_aux, cache)``: ``moe_aux`` holds the MoE layers' aux stacked on a
    leading layer axis (None for a dense model)."""
    run_block = lambda block, x_BTD, layer_cache: _run_block(
        self.config, block, x_BTD, batch, layer_cache, prefill)
    if not self.config.scan_layers:
      moe_auxes, new_cache = [], []
      for i, block in enumerate(self.blocks):
        x_BTD, moe_aux, layer_cache = run_block(block, x_BTD, None if cache is None else cache[i])
        new_cache.append(layer_cache)
        if moe_aux is not None:
          moe_auxes.append(moe_aux)
      moe_aux = ({key: jnp.stack([aux[key] for aux in moe_auxes]) for key in moe_auxes[0]}
                 if moe_auxes else None)
      return x_BTD, moe_aux, tuple(new_cache)

    # One step per group, the cache in the carry: a step reads its group's caches and writes
    # them back, so decoding updates one cache in place (as scanned xs and ys it would hold a
    # second copy). graph_updates=False passes the group as a plain pytree, so a decoder
    # merged outside a jax loop (generate's while_loop) may run inside one.
    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), graph_updates=False)
    def step(carry, group: BlockGroup, g):
      x_BTD, cache = carry
      caches = None if cache is None else jax.tree.map(
          lambda a: jax.lax.dynamic_index_in_dim(a, g, keepdims=False), cache)
      group_aux, new_caches = None, []
      for j, block in enumerate(group.blocks):
        x_BTD, moe_aux, layer_cache = run_block(block, x_BTD, None if cache is None else caches[j])
        new_caches.append(layer_cache)
        group_aux = moe_aux if moe_aux is not None else group_aux
      if cache is not None:
        cache = jax.tree.map(lambda a, new: jax.lax.dynamic_update_index_in_dim(a, new, g, 0),
                             cache, tuple(new_caches))
      return (x_BTD, cache), group_aux

    (x_BTD, cache), moe_aux = step((x_BTD, cache), self.groups,
                                   jnp.arange(num_groups(self.config)))
    return x_BTD, moe_aux, cache

  def _collect_aux(self, moe_aux: dict | None, batch: Batch) -> dict:
    num_experts = max(self.config.num_experts, 1)
    if moe_aux is None:
      zero = jnp.zeros((), jnp.float32)
      return {'load_balance': zero, 'router_z': zero, 'dropped_L': jnp.zeros((0,)),
              'expert_load_LE': jnp.zeros((0, num_experts)),
              'expert_load_by_modality_LME': jnp.zeros((0, len(Modality), num_experts))}
    valid_BT = (batch.segment_ids != 0).astype(jnp.float32)
    modality_BTM = jax.nn.one_hot(batch.modality, len(Modality)) * valid_BT[..., None]
    routed_LBTE = moe_aux['routed_BTE']
    slots_LM = jnp.einsum('BTM,LBTE->LM', modality_BTM, routed_LBTE)
    load_by_modality_LME = (jnp.einsum('BTM,LBTE->LME', modality_BTM, routed_LBTE)
                            / jnp.maximum(slots_LM, 1)[..., None])
    return {
        'load_balance': moe_aux['load_balance'].mean(),
        'router_z': moe_aux['router_z'].mean(),
        'dropped_L': moe_aux['dropped'],
        'expert_load_LE': moe_aux['expert_load_E'],
        'expert_load_by_modality_LME': load_by_modality_LME,
    }


def _run_block(config: ModelConfig, block: DecoderBlock, x_BTD, batch: Batch, cache,
               prefill: bool):
  x_BTD = constrain(x_BTD, ('batch', 'length', 'activation_embed'))
  call = lambda block, *args: block(*args, prefill=prefill)
  call = nnx.remat(call) if config.remat else call
  return call(block, x_BTD, batch.segment_ids, batch.positions, cache)
