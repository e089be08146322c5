"""Decoder invariants: causality, segment isolation, modality placement, KV-cache decoding,
one compilation per shape, and full-size presets checked abstractly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_mini import Batch, Modality
from gemini_mini import config as config_lib
from gemini_mini.layers.routing import Router
from gemini_mini.model import Decoder
from helpers import make_batch


def build(test_config, **model_overrides):
  model_config = dataclasses.replace(test_config.model, **model_overrides)
  return Decoder(model_config, rngs=nnx.Rngs(0)), model_config


def jit_forward(decoder):
  graphdef, state = nnx.split(decoder)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
  return lambda batch: forward(state, batch)


def replace(batch, **fields):
  return dataclasses.replace(batch, **fields)


def skew_routing(decoder):
  """Gives every token embedding a common direction that every router prefers expert 0
  along, so expert loads are uneven and capacity 1.25 drops slots, as in trained models."""
  direction_D = jnp.ones(decoder.config.d_model) / decoder.config.d_model ** 0.5
  decoder.text.embedding_VD[...] = decoder.text.embedding_VD[...] + 3.0 * direction_D
  for _, module in nnx.iter_graph(decoder):
    if isinstance(module, Router):
      module.w_DE[...] = module.w_DE[...].at[:, 0].add(direction_D)


# Capacity factors that drop many, some and few of the test model's routed slots.
DISPATCHES = {'dropless': dict(moe_dispatch='dropless'),
              **{f'capacity-{cf}': dict(moe_dispatch='capacity', capacity_factor=cf)
                 for cf in (0.25, 0.5, 1.25)}}


@pytest.mark.parametrize('dispatch', DISPATCHES)
@pytest.mark.parametrize('kernel', ['dense', 'chunked'])
def test_future_tokens_never_change_past_logits(test_config, kernel, dispatch):
  # The future from each cut on is replaced: tokens, and the audio frames of a run (30-33).
  # Capacity dispatch shares expert slots along a row, so a later token must never take a
  # slot an earlier one would have had.
  decoder, model_config = build(test_config, attention_kernel=kernel, attention_chunk=16,
                                **DISPATCHES[dispatch])
  skew_routing(decoder)
  forward = jit_forward(decoder)
  batch = make_batch(model_config, images=[(0, 10, 4)], audio=[(0, 30, 4)])
  logits, aux = forward(batch)
  if dispatch.startswith('capacity'):
    assert aux['dropped_L'].max() > 0  # the test sees drops
  rng = np.random.default_rng(0)
  for cut in (1, 17, 31, 33, 50, 63):
    new_tokens = rng.integers(0, model_config.vocab_size, batch.tokens.shape, dtype=np.int32)
    tokens = batch.tokens.at[:, cut:].set(new_tokens[:, cut:])
    audio = batch.audio.at[0, max(cut - 30, 0):].add(5.0)  # frame i sits at position 30 + i
    changed, _ = forward(replace(batch, tokens=tokens, audio=audio))
    np.testing.assert_allclose(changed[:, :cut], logits[:, :cut], atol=1e-5, err_msg=f'{cut}')
    assert not np.allclose(changed[:, cut:], logits[:, cut:], atol=1e-3)


def test_the_scalar_head_reads_the_logits_hidden_states_and_never_the_future(test_config):
  # Adding the head changes no logit for the same seed; its value is w . h + b at every
  # position, and a later token never changes an earlier scalar (the reward model reads the
  # last response position, PPO's value every position).
  plain, model_config = build(test_config)
  decoder, _ = build(test_config, scalar_head=True)
  decoder.scalar_head.w_D[...] = jax.random.normal(jax.random.key(1), (model_config.d_model,))
  decoder.scalar_head.b[...] = jnp.array(0.5)
  batch = make_batch(model_config, images=[(0, 10, 4)])
  logits, _ = plain(batch)
  h_BTD, _ = decoder.hidden(batch)
  np.testing.assert_allclose(decoder(batch)[0], logits, atol=1e-6)
  scalar_BT = decoder.scalar_head(h_BTD)
  np.testing.assert_allclose(scalar_BT, np.einsum('btd,d->bt', np.asarray(h_BTD),
                                                  np.asarray(decoder.scalar_head.w_D[...])) + 0.5,
                             rtol=1e-5, atol=1e-5)
  cut = 37
  tokens = batch.tokens.at[:, cut:].set((batch.tokens[:, cut:] + 1) % model_config.vocab_size)
  changed_BT = decoder.scalar_head(decoder.hidden(replace(batch, tokens=tokens))[0])
  np.testing.assert_allclose(changed_BT[:, :cut], scalar_BT[:, :cut], atol=1e-5)
  assert not np.allclose(changed_BT[:, cut:], scalar_BT[:, cut:], atol=1e-3)


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_editing_one_document_never_changes_another(test_config, dispatch):
  # Capacity dispatch shares expert slots within a row; with room for every slot it must
  # isolate documents too (a tight capacity is allowed to couple them through drops).
  decoder, model_config = build(test_config, moe_dispatch=dispatch, capacity_factor=4.0)
  forward = jit_forward(decoder)
  batch = make_batch(model_config, documents=((30, 20), (40, 24)))
  logits, aux = forward(batch)
  first = batch.segment_ids == 1
  tokens = jnp.where(first, (batch.tokens + 1) % model_config.vocab_size, batch.tokens)
  changed, changed_aux = forward(replace(batch, tokens=tokens))
  assert aux['dropped_L'].max() == changed_aux['dropped_L'].max() == 0
  others = ~np.asarray(first)
  np.testing.assert_allclose(np.asarray(changed)[others], np.asarray(logits)[others], atol=1e-5)
  assert not np.allclose(np.asarray(changed)[~others], np.asarray(logits)[~others], atol=1e-3)


def test_images_and_audio_take_their_items_in_order(test_config):
  decoder, model_config = build(test_config)
  batch = make_batch(model_config, images=[(0, 5, 3), (0, 20, 2), (1, 0, 4)],
                     audio=[(0, 40, 4), (1, 50, 2)])
  x = np.asarray(decoder.embed(batch))
  patches = np.asarray(decoder.image(batch.patches))
  frames = np.asarray(decoder.audio(batch.audio))
  tokens = np.asarray(decoder.text.embed(batch.tokens))
  modality = np.asarray(batch.modality)
  for row in range(2):
    np.testing.assert_allclose(x[row][modality[row] == Modality.IMAGE],
                               patches[row][:(modality[row] == Modality.IMAGE).sum()], atol=1e-6)
    np.testing.assert_allclose(x[row][modality[row] == Modality.AUDIO],
                               frames[row][:(modality[row] == Modality.AUDIO).sum()], atol=1e-6)
    np.testing.assert_array_equal(x[row][modality[row] == Modality.TEXT],
                                  tokens[row][modality[row] == Modality.TEXT])


def test_swapping_two_images_swaps_their_effect(test_config):
  decoder, model_config = build(test_config)
  # Row 0: image A at positions 8..11 (patches 0..3), image B at 30..33 (patches 4..7).
  batch = make_batch(model_config, images=[(0, 8, 4), (0, 30, 4)])
  swapped_patches = batch.patches.at[0].set(jnp.concatenate(
      [batch.patches[0, 4:8], batch.patches[0, 0:4], batch.patches[0, 8:]]))
  x = np.asarray(decoder.embed(batch))
  x_swapped = np.asarray(decoder.embed(replace(batch, patches=swapped_patches)))
  np.testing.assert_allclose(x_swapped[0, 8:12], x[0, 30:34], atol=1e-6)
  np.testing.assert_allclose(x_swapped[0, 30:34], x[0, 8:12], atol=1e-6)
  # And the model sees it: the logits before image B are those of a batch whose first image is B.
  logits, _ = jit_forward(decoder)(replace(batch, patches=swapped_patches))
  original, _ = jit_forward(decoder)(batch)
  assert not np.allclose(logits[0, 8:30], original[0, 8:30], atol=1e-3)
  np.testing.assert_allclose(logits[1], original[1], atol=1e-6)


@pytest.mark.parametrize('num_kv_heads', [1, 2, 4])
def test_decoding_with_kv_cache_matches_full_forward(test_config, num_kv_heads):
  decoder, model_config = build(test_config, num_kv_heads=num_kv_heads)
  length, prompt = 48, 32
  batch = make_batch(model_config, length=length, documents=((48,), (48,)),
                     images=[(0, 4, 6)], audio=[(1, 10, 5)])
  full_logits, _ = decoder(batch)
  cache = decoder.init_cache(batch_size=2, max_length=64)
  decode = nnx.jit(lambda decoder, batch, cache: decoder.decode(batch, cache))
  take = lambda start, stop: jax.tree.map(
      lambda a: a[:, start:stop] if a.ndim == 2 else a, batch)  # per-position fields only
  last, _ = nnx.jit(lambda decoder, batch, cache: decoder.prefill(batch, cache, last_only=True))(
      decoder, take(0, prompt), cache)
  logits, cache = nnx.jit(lambda decoder, batch, cache: decoder.prefill(batch, cache))(
      decoder, take(0, prompt), cache)
  np.testing.assert_allclose(last, logits[:, -1:], atol=1e-5)  # the prompt's next-token logits
  steps = [logits]
  # Generated tokens are text: steps carry no image or audio items, as in `generate`.
  no_items = dict(patches=jnp.zeros((2, 0, model_config.patch_dim)),
                  audio=jnp.zeros((2, 0, model_config.audio_dim)))
  for t in range(prompt, length):
    step = replace(take(t, t + 1), **no_items)
    logits, cache = decode(decoder, step, cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full_logits, atol=2e-5)
  assert int(cache[0].end) == length


def test_forward_compiles_once_for_new_data_of_the_same_shapes(test_config):
  decoder, model_config = build(test_config)
  graphdef, state = nnx.split(decoder)
  traces = []

  @jax.jit
  def forward(state, batch):
    traces.append(1)
    return nnx.merge(graphdef, state)(batch)[0]

  for seed, docs in enumerate([((64,), (40, 24)), ((10, 54), (64,)), ((32,), (16, 16, 16))]):
    forward(state, make_batch(model_config, documents=docs, images=[(0, seed, 3)], seed=seed))
  assert len(traces) == 1


def test_aux_reports_router_losses_and_loads(test_config):
  decoder, model_config = build(test_config)
  batch = make_batch(model_config, images=[(0, 5, 8)], audio=[(1, 3, 8)])
  _, aux = decoder(batch)
  num_moe = sum(model_config.is_moe_layer(i) for i in range(model_config.num_layers))
  assert aux['expert_load_LE'].shape == (num_moe, model_config.num_experts)
  np.testing.assert_allclose(aux['expert_load_LE'].sum(-1), 1.0, rtol=1e-6)
  by_modality = np.asarray(aux['expert_load_by_modality_LME'])
  assert by_modality.shape == (num_moe, 3, model_config.num_experts)
  np.testing.assert_allclose(by_modality.sum(-1), 1.0, rtol=1e-6)  # all three modalities present
  assert aux['load_balance'] >= 1.0 - 1e-6  # its minimum, reached by uniform routing
  assert aux['router_z'] > 0 and np.all(np.asarray(aux['dropped_L']) == 0)  # dropless


def test_dense_model_and_bfloat16(test_config):
  decoder, model_config = build(test_config, num_experts=0, dtype='bfloat16')
  logits, aux = jit_forward(decoder)(make_batch(model_config))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert float(aux['load_balance']) == 0.0 and aux['expert_load_LE'].shape[0] == 0
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(decoder, nnx.Param)))


def hand_count(m: config_lib.ModelConfig) -> int:
  """Parameter count written out from the architecture, independently of the code."""
  attention = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp = 3 * m.d_model * m.d_ff
  moe = m.num_experts * mlp + m.d_model * m.num_experts + (mlp if m.shared_expert else 0)
  layers = sum(attention + 2 * m.d_model + (moe if m.is_moe_layer(i) else mlp)
               for i in range(m.num_layers))
  encoders = (m.patch_dim + m.audio_dim) * m.d_model + 2 * (mlp + m.d_model)
  tables = 1 if m.tie_embeddings else 2  # the input table, and the output head unless tied
  return tables * m.vocab_size * m.d_model + encoders + layers + m.d_model


@pytest.mark.parametrize('preset', ['nano', 'pro', 'ultra'])
def test_full_size_presets_shape_check_without_allocating(preset):
  config = config_lib.load(f'configs/{preset}.yaml')
  m = config.model
  decoder = nnx.eval_shape(lambda: Decoder(m, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(decoder, nnx.Param))
  assert sum(int(np.prod(p.shape)) for p in params) == hand_count(m)
  graphdef, state = nnx.split(decoder)
  b, t = 1, config.train.seq_len
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  batch = Batch(tokens=spec((b, t), jnp.int32), modality=spec((b, t), jnp.int8),
                segment_ids=spec((b, t), jnp.int32), positions=spec((b, t), jnp.int32),
                targets=spec((b, t), jnp.int32), loss_mask=spec((b, t), jnp.float32),
                patches=spec((b, config.data.num_patches, m.patch_dim), jnp.float32),
                audio=spec((b, config.data.num_audio_frames, m.audio_dim), jnp.float32))
  logits, aux = jax.eval_shape(lambda state, batch: nnx.merge(graphdef, state)(batch), state, batch)
  assert logits.shape == (b, t, m.vocab_size) and logits.dtype == jnp.float32
  num_moe = sum(m.is_moe_layer(i) for i in range(m.num_layers))
  assert aux['expert_load_LE'].shape == (num_moe, m.num_experts)


def test_remat_gives_the_same_loss_and_gradients(test_config):
  batch = make_batch(test_config.model, images=[(0, 3, 4)])

  def loss_and_grads(remat):
    decoder, _ = build(test_config, remat=remat)
    graphdef, state = nnx.split(decoder)
    loss = lambda state: jnp.mean(nnx.merge(graphdef, state)(batch)[0] ** 2)
    return jax.jit(jax.value_and_grad(loss))(state)

  (loss, grads), (loss_remat, grads_remat) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_remat, grads)
