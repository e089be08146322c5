"""The Gemini-style decoder: interleaved text, image and audio in, next-token logits out.

    x = embed(batch)                        # text tokens, image patches, audio frames -> x_BTD
    for block in blocks:                    # pre-norm residual blocks
      x = x + attention(norm(x))            # multi-query attention, RoPE, segment-causal mask
      x = x + ffn(norm(x))                  # gated MLP, or top-k MoE every moe_every-th layer
    logits = unembed(norm(x))               # float32 logits_BTV

With ``model.scan_layers`` the blocks are stacked instead: groups of ``moe_every`` blocks
(``moe_every - 1`` dense, then one MoE; one block per group for a dense model) whose
parameters carry a leading ``layers`` axis, run by one ``lax.scan`` over the groups, so the
compiled program holds one group whatever the depth. The parameters, logits, aux and caches
equal the unrolled loop's (``stack_layers`` converts a state between the two layouts).

This is the only module that reads ``ModelConfig``; every layer below takes plain dimensions.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.batch import Batch, Modality
from gemini_mini.config import ModelConfig
from gemini_mini.layers import (
    Attention, FeatureEmbed, GatedMLP, KVCache, MoE, RMSNorm, TokenEmbed)
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


class BlockGroup(nnx.Module):
  """``group_size`` consecutive blocks starting at layer ``first_layer``: one scan step.

  Inside a scanned ``Decoder`` every parameter carries a leading ``[num_groups]`` axis.
  """

  def __init__(self, config: ModelConfig, *, first_layer: int, rngs: nnx.Rngs):
    self.blocks = nnx.List([
        DecoderBlock(config, use_moe=config.is_moe_layer(first_layer + j), rngs=rngs)
        for j in range(group_size(config))])


def _set_layers_axis(tree, present: bool):
  """Adds (``present``) or removes the leading ``layers`` name of every variable's logical
  axes (``out_sharding``), in place."""
  for variable in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    if not isinstance(variable, nnx.Variable):
      continue
    names = variable.get_metadata().get('out_sharding')
    if not names:
      continue
    if present and names[0] != LAYERS_AXIS:
      variable.set_metadata(out_sharding=(LAYERS_AXIS, *names))
    elif not present and names[0] == LAYERS_AXIS:
      variable.set_metadata(out_sharding=tuple(names[1:]))
  return tree


def _stack(leaves):
  """One leaf from per-group leaves: arrays (or ``nnx.Variable``s) stacked on a new axis 0."""
  if isinstance(leaves[0], nnx.Variable):
    stacked = leaves[0].replace(jnp.stack([leaf[...] for leaf in leaves]))
    return _set_layers_axis(stacked, present=True)
  return jnp.stack(leaves)


def _stacked_groups(config: ModelConfig, rngs: nnx.Rngs) -> BlockGroup:
  """The blocks as one ``BlockGroup`` with stacked parameters. They are created one by one in
  layer order, as the unscanned decoder creates them, so the same seed gives the same values;
  under ``jit`` / ``eval_shape`` the per-group copies are intermediates."""
  size = group_size(config)
  groups = [BlockGroup(config, first_layer=g * size, rngs=rngs) for g in range(num_groups(config))]
  graphdef = nnx.graphdef(groups[0])
  states = [dict(nnx.to_flat_state(nnx.state(group))) for group in groups]
  stacked = {path: _stack([state[path] for state in states]) for path in states[0]}
  return nnx.merge(graphdef, nnx.from_flat_state(stacked))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedKVCache:
  """The KV caches of a scanned decoder, stacked like its parameters.

  ``members[j]`` is a ``KVCache`` whose arrays carry a leading group axis: index ``g`` holds
  layer ``g * group_size + j``. ``cache[i]`` (a slice) and ``len(cache)`` read it like the
  unscanned decoder's tuple of per-layer caches.
  """

  members: tuple[KVCache, ...]

  @property
  def empty(self) -> bool:
    return all(member.empty for member in self.members)

  def marked_written(self) -> 'StackedKVCache':
    """The same arrays with ``empty`` off: the structure of this cache after an append."""
    return StackedKVCache(tuple(dataclasses.replace(m, empty=False) for m in self.members))

  def __len__(self) -> int:
    return len(self.members) * self.members[0].end.shape[0]

  def __getitem__(self, layer: int) -> KVCache:
    if not -len(self) <= layer < len(self):
      raise IndexError(f'layer {layer} of a {len(self)}-layer cache')
    group, member = divmod(layer % len(self), len(self.members))
    return jax.tree.map(lambda a: a[group], self.members[member])

  @property
  def nbytes(self) -> int:
    return sum(member.nbytes for member in self.members)

  def group(self, g: jax.Array) -> tuple[KVCache, ...]:
    """Group ``g``'s per-layer caches (``g`` may be traced)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, g, keepdims=False),
                        self.members)

  def with_group(self, g: jax.Array, caches: tuple[KVCache, ...]) -> 'StackedKVCache':
    """This cache with group ``g`` replaced by ``caches`` (in place inside a loop carry)."""
    return StackedKVCache(jax.tree.map(
        lambda a, new: jax.lax.dynamic_update_index_in_dim(a, new, g, 0),
        self.members, tuple(caches)))


class Decoder(nnx.Module):
  """``decoder(batch) -> (logits_BTV, aux)``; ``decoder.decode(batch, cache)`` for inference.

  ``aux`` (all float32): ``load_balance`` and ``router_z`` averaged over MoE layers (0 for a
  dense model); per MoE layer L: ``dropped_L`` (fraction of routed slots dropped),
  ``expert_load_LE`` (fraction of routed slots per expert) and
  ``expert_load_by_modality_LME`` (the same, per modality M = text, image, audio).

  Blocks live in ``blocks`` (one module per layer), or with ``scan_layers`` in ``groups``
  (one ``BlockGroup`` whose parameters are stacked over the groups).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = compute_dtype(config)
    self.text = TokenEmbed(config.vocab_size, config.d_model, tied=config.tie_embeddings,
                           dtype=dtype, rngs=rngs)
    self.image = FeatureEmbed(config.patch_dim, config.d_model, config.d_ff, dtype=dtype, rngs=rngs)
    self.audio = FeatureEmbed(config.audio_dim, config.d_model, config.d_ff, dtype=dtype, rngs=rngs)
    if config.scan_layers:
      self.groups = _stacked_groups(config, rngs)
    else:
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
      if not items_BXI.shape[1]:  # no items of this kind (a decoding step): no encoder to run
        continue
      is_item_BT = batch.modality == modality
      item_BXD = encoder(items_BXI)
      index_BT = jnp.clip(jnp.cumsum(is_item_BT, axis=1) - 1, 0, item_BXD.shape[1] - 1)
      item_BTD = jnp.take_along_axis(item_BXD, index_BT[..., None], axis=1)
      x_BTD = jnp.where(is_item_BT[..., None], item_BTD.astype(x_BTD.dtype), x_BTD)
    return x_BTD

  def __call__(self, batch: Batch) -> tuple[jax.Array, dict]:
    logits_BTV, moe_aux, _ = self._forward(batch, None)
    return logits_BTV, self._collect_aux(moe_aux, batch)

  def init_cache(self, batch_size: int, max_length: int) -> tuple[KVCache, ...] | StackedKVCache:
    """Empty KV caches, one per layer, for ``decode`` (a ``StackedKVCache`` when scanned)."""
    c = self.config
    create = lambda: KVCache.create(batch_size, max_length, c.num_kv_heads, c.head_dim,
                                    compute_dtype(c))
    if not c.scan_layers:
      return tuple(create() for _ in range(c.num_layers))
    stacked = lambda a: jnp.zeros((num_groups(c), *a.shape), a.dtype)
    return StackedKVCache(tuple(jax.tree.map(stacked, jax.eval_shape(create))
                                for _ in range(group_size(c))))

  def decode(self, batch: Batch, cache, *, last_only: bool = False):
    """Appends ``batch`` (a prompt, or one new token per row) to ``cache`` and returns
    ``(logits_BTV, cache)``. The logits equal the full forward pass over everything seen;
    ``last_only`` gives the last position's alone (``T`` = 1), skipping the output layer
    elsewhere: a prompt needs only the logits of the token after it."""
    logits_BTV, _, cache = self._forward(batch, cache, last_only=last_only)
    return logits_BTV, cache

  def _forward(self, batch: Batch, cache, *, last_only: bool = False):
    """``(logits_BTV, moe_aux, cache)``: ``moe_aux`` holds the MoE layers' aux stacked on a
    leading layer axis (None for a dense model)."""
    x_BTD = self.embed(batch)
    run = self._scan_blocks if self.config.scan_layers else self._loop_blocks
    x_BTD, moe_aux, cache = run(x_BTD, batch, cache)
    if last_only:
      x_BTD = x_BTD[:, -1:]
    x_BTD = constrain(x_BTD, ('batch', 'length', 'activation_embed'))
    logits_BTV = self.text.logits(self.final_norm(x_BTD))
    return logits_BTV, moe_aux, cache

  def _run_block(self, block: DecoderBlock, x_BTD, batch: Batch, layer_cache):
    x_BTD = constrain(x_BTD, ('batch', 'length', 'activation_embed'))
    run_block = nnx.remat(type(block).__call__) if self.config.remat else type(block).__call__
    return run_block(block, x_BTD, batch.segment_ids, batch.positions, layer_cache)

  def _loop_blocks(self, x_BTD, batch: Batch, cache):
    moe_auxes, new_cache = [], []
    for i, block in enumerate(self.blocks):
      x_BTD, moe_aux, layer_cache = self._run_block(block, x_BTD, batch,
                                                    None if cache is None else cache[i])
      new_cache.append(layer_cache)
      if moe_aux is not None:
        moe_auxes.append(moe_aux)
    moe_aux = ({key: jnp.stack([aux[key] for aux in moe_auxes]) for key in moe_auxes[0]}
               if moe_auxes else None)
    return x_BTD, moe_aux, tuple(new_cache)

  def _scan_blocks(self, x_BTD, batch: Batch, cache: StackedKVCache | None):
    """``lax.scan`` over the groups; the cache rides in the carry (updated in place, one
    group at a time) and each group's MoE aux comes out stacked in layer order."""
    graphdef, stacked = nnx.split(self.groups)
    # The carry keeps one structure through the scan, so it holds the cache as written, and
    # each layer is told by hand whether its cache was empty before this call.
    empty = cache is not None and cache.empty
    if cache is not None:
      cache = cache.marked_written()

    def step(carry, xs):
      x_BTD, cache = carry
      g, group_state = xs
      group = nnx.merge(graphdef, _set_layers_axis(group_state, present=False))
      layer_caches = None if cache is None else [
          dataclasses.replace(layer_cache, empty=empty) for layer_cache in cache.group(g)]
      group_aux, new_caches = None, []
      for j, block in enumerate(group.blocks):
        x_BTD, moe_aux, layer_cache = self._run_block(
            block, x_BTD, batch, None if cache is None else layer_caches[j])
        new_caches.append(layer_cache)
        group_aux = moe_aux if moe_aux is not None else group_aux
      if cache is not None:
        cache = cache.with_group(g, new_caches)
      return (x_BTD, cache), group_aux

    xs = (jnp.arange(num_groups(self.config)), stacked)
    (x_BTD, cache), moe_aux = jax.lax.scan(step, (x_BTD, cache), xs)
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


def stack_layers(state: nnx.State, config: ModelConfig) -> nnx.State:
  """A state laid out like ``Decoder(config)`` without ``scan_layers`` (parameters, their
  gradients or optimizer moments) -> the same values laid out for ``scan_layers``: block
  ``i`` becomes index ``i // group_size`` of ``groups.blocks[i % group_size]``."""
  size, flat, members = group_size(config), {}, {}
  for path, leaf in nnx.to_flat_state(state):
    if path[0] != 'blocks':
      flat[path] = leaf
      continue
    layer = path[1]
    members.setdefault(('groups', 'blocks', layer % size, *path[2:]), {})[layer // size] = leaf
  for path, by_group in members.items():
    flat[path] = _stack([by_group[g] for g in range(len(by_group))])
  return nnx.from_flat_state(flat)


def unstack_layers(state: nnx.State, config: ModelConfig) -> nnx.State:
  """The inverse of ``stack_layers``: a ``scan_layers`` state -> the per-layer layout."""
  size, flat = group_size(config), {}
  for path, leaf in nnx.to_flat_state(state):
    if path[:2] != ('groups', 'blocks'):
      flat[path] = leaf
      continue
    for g in range(num_groups(config)):
      if isinstance(leaf, nnx.Variable):
        layer_leaf = _set_layers_axis(leaf.replace(leaf[...][g]), present=False)
      else:
        layer_leaf = leaf[g]
      flat[('blocks', g * size + path[2], *path[3:])] = layer_leaf
  return nnx.from_flat_state(flat)
