"""``model.scan_layers``: the scanned decoder (blocks stacked in groups of ``moe_every`` by
``nnx.vmap``, run by ``nnx.scan``) holds the unscanned one's parameters stacked, and given
them gives its numbers: logits, aux, loss gradients, KV-cache decoding and generation;
full-size presets keep their parameter count; sharded training on 8 fake CPU devices equals
one device.

Run as a script (``python tests/test_scan.py sharded``) it is the 8-device subprocess of
``test_sharded_scanned_training_matches_one_device``.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemini_mini import Batch
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.model import Decoder, group_size, num_groups

sys.path.insert(0, os.path.dirname(__file__))
from helpers import make_batch  # noqa: E402

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# moe_every 1 (every layer MoE), 2 (dense then MoE, two groups), and a dense model.
SHAPES = {'moe_every1': dict(moe_every=1, num_layers=2),
          'moe_every2': dict(moe_every=2, num_layers=4),
          'dense': dict(num_experts=0, num_layers=3)}


def pair(test_config, **overrides):
  """``(unscanned, scanned, model_config)``, the scanned decoder holding the unscanned one's
  parameters."""
  model_config = dataclasses.replace(test_config.model, **overrides)
  unscanned = Decoder(model_config, rngs=nnx.Rngs(0))
  scanned = Decoder(dataclasses.replace(model_config, scan_layers=True), rngs=nnx.Rngs(1))
  nnx.update(scanned, stacked(nnx.state(unscanned), nnx.state(scanned), model_config))
  return unscanned, scanned, model_config


def stacked(state, like, model_config):
  """``state`` (an unscanned decoder's parameters, gradients or moments) laid out like
  ``like`` (the scanned decoder's): block i at index ``i // group_size`` of
  ``groups.blocks[i % group_size]``."""
  size, flat = group_size(model_config), dict(nnx.to_flat_state(state))
  def value(path):
    if path[:2] != ('groups', 'blocks'):
      return flat[path][...]
    return jnp.stack([flat[('blocks', g * size + path[2], *path[3:])][...]
                      for g in range(num_groups(model_config))])
  return nnx.from_flat_state([(path, leaf.replace(value(path)))
                              for path, leaf in nnx.to_flat_state(like)])


def assert_states_close(actual, expected, **tolerance):
  actual, expected = nnx.to_flat_state(actual), nnx.to_flat_state(expected)
  assert [path for path, _ in actual] == [path for path, _ in expected]
  for (path, a), (_, b) in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path),
                               **tolerance)


@pytest.mark.parametrize('shape', SHAPES)
def test_scanned_parameters_are_the_blocks_stacked_on_a_layers_axis(test_config, shape):
  model_config = dataclasses.replace(test_config.model, **SHAPES[shape])
  params = nnx.state(Decoder(model_config, rngs=nnx.Rngs(0)))
  scanned_params = nnx.state(Decoder(dataclasses.replace(model_config, scan_layers=True),
                                     rngs=nnx.Rngs(0)))
  layout = stacked(params, scanned_params, model_config)
  for (path, a), (_, b) in zip(nnx.to_flat_state(layout), nnx.to_flat_state(scanned_params)):
    assert a.shape == b.shape and a.dtype == b.dtype, path
    if path[0] != 'groups':  # created as without scanning: the same values
      np.testing.assert_array_equal(b[...], a[...], err_msg=str(path))
      continue
    unscanned = dict(nnx.to_flat_state(params))[('blocks', path[2], *path[3:])]
    assert b.get_metadata()['out_sharding'] == ('layers', *unscanned.get_metadata()['out_sharding'])
    if path[-1] != 'scale_D' and num_groups(model_config) > 1:  # norm scales start at 1
      assert not np.array_equal(b[0], b[1]), f'{path}: the groups drew the same values'
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(scanned_params) == count(params)


def loss_fn(graphdef, batch):
  """The training objective's numerator over the batch's tokens (aux losses included)."""
  from gemini_mini.train.loss import LossWeights, loss_sums
  def loss(params):
    logits, aux = nnx.merge(graphdef, params)(batch)
    numerator, sums = loss_sums(logits, aux, batch, LossWeights(0.01, 0.001, 1e-4))
    return numerator / sums['tokens'], (logits, aux)
  return loss


@pytest.mark.parametrize('shape,remat', [('moe_every1', False), ('moe_every2', False),
                                         ('moe_every2', True), ('dense', False)])
def test_logits_aux_and_gradients_equal_the_unscanned_model(test_config, shape, remat):
  unscanned, scanned, model_config = pair(test_config, remat=remat, **SHAPES[shape])
  batch = make_batch(model_config, images=[(0, 5, 8)], audio=[(1, 3, 8)])
  results = []
  for decoder in (unscanned, scanned):
    graphdef, params = nnx.split(decoder)
    grad_fn = jax.value_and_grad(loss_fn(graphdef, batch), has_aux=True)
    results.append(jax.jit(grad_fn)(params))
  ((loss, (logits, aux)), grads), ((loss_s, (logits_s, aux_s)), grads_s) = results
  np.testing.assert_allclose(logits_s, logits, **TOLERANCE)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  assert aux_s.keys() == aux.keys()
  for key in aux:
    assert aux_s[key].shape == aux[key].shape, key
    np.testing.assert_allclose(aux_s[key], aux[key], err_msg=key, **TOLERANCE)
  num_moe = sum(model_config.is_moe_layer(i) for i in range(model_config.num_layers))
  assert aux_s['expert_load_LE'].shape[0] == num_moe
  assert_states_close(grads_s, stacked(grads, grads_s, model_config), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('shape', ['moe_every1', 'moe_every2'])
def test_kv_cache_decoding_equals_the_unscanned_model(test_config, shape):
  unscanned, scanned, model_config = pair(test_config, num_kv_heads=2, **SHAPES[shape])
  length, prompt = 40, 28
  batch = make_batch(model_config, length=length, documents=((40,), (40,)),
                     images=[(0, 4, 6)], audio=[(1, 10, 5)])
  take = lambda start, stop: jax.tree.map(
      lambda a: a[:, start:stop] if a.ndim == 2 else a, batch)  # per-position fields only
  no_items = dict(patches=jnp.zeros((2, 1, model_config.patch_dim)),
                  audio=jnp.zeros((2, 1, model_config.audio_dim)))
  prefill = nnx.jit(lambda decoder, batch, cache: decoder.prefill(batch, cache))
  decode = nnx.jit(lambda decoder, batch, cache: decoder.decode(batch, cache))
  outputs = []
  for decoder in (unscanned, scanned):
    cache = decoder.init_cache(batch_size=2, max_length=48)
    logits, cache = prefill(decoder, take(0, prompt), cache)
    steps = [logits]
    for t in range(prompt, length):
      logits, cache = decode(decoder, dataclasses.replace(take(t, t + 1), **no_items), cache)
      steps.append(logits)
    outputs.append((np.concatenate(steps, axis=1), cache))
  (logits, cache), (logits_s, cache_s) = outputs
  np.testing.assert_allclose(logits_s, logits, **TOLERANCE)
  np.testing.assert_allclose(logits_s, scanned(batch)[0], atol=2e-5)  # == the full forward
  size = group_size(model_config)
  assert len(cache_s) == size and cache_s[0].end.shape == (num_groups(model_config),)
  for layer in range(model_config.num_layers):  # layer g * size + j: group g of member j
    layer_s = jax.tree.map(lambda a: a[layer // size], cache_s[layer % size])
    assert int(layer_s.end) == length
    assert layer_s.k_JHS.shape == cache[layer].k_JHS.shape
    np.testing.assert_allclose(layer_s.k_JHS, cache[layer].k_JHS, **TOLERANCE)
    np.testing.assert_array_equal(layer_s.segment_ids_BS, cache[layer].segment_ids_BS)
  assert sum(c.nbytes for c in cache_s) == sum(c.nbytes for c in cache)


def test_generation_equals_the_unscanned_model(test_config):
  from gemini_mini.infer.generate import generate
  from gemini_mini.modalities import text as text_lib
  from gemini_mini.modalities.segments import Segment
  tokenizer = text_lib.Tokenizer()
  unscanned, scanned, model_config = pair(test_config, **SHAPES['moe_every2'])
  rng = np.random.default_rng(0)
  prompts = [[Segment.text([tokenizer.bos_id] + list(tokenizer.encode('The cat sat on the')))],
             [Segment.text([tokenizer.bos_id]),
              Segment.image(rng.normal(size=(6, model_config.patch_dim))),
              Segment.text(tokenizer.encode('Caption:'))]]
  run = lambda decoder, **kw: [g.tokens.tolist() for g in generate(
      decoder, prompts, tokenizer, max_new_tokens=6, stop_ids=(), **kw)]
  assert run(scanned) == run(unscanned)
  assert run(scanned, temperature=1.0, seed=3) == run(unscanned, temperature=1.0, seed=3)


def test_indivisible_depth_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match=r'^model\.scan_layers: .*moe_every \(2\)'):
    config_lib.load('configs/test.yaml', ['model.num_layers=3', 'model.scan_layers=true'])
  # A dense model scans one block per step, so any depth works.
  config_lib.load('configs/test.yaml', ['model.num_layers=3', 'model.num_experts=0',
                                        'model.scan_layers=true'])


def abstract_batch(config):
  b, t, m = 1, config.train.seq_len, config.model
  spec = jax.ShapeDtypeStruct
  return Batch(tokens=spec((b, t), jnp.int32), modality=spec((b, t), jnp.int8),
               segment_ids=spec((b, t), jnp.int32), positions=spec((b, t), jnp.int32),
               targets=spec((b, t), jnp.int32), loss_mask=spec((b, t), jnp.float32),
               patches=spec((b, config.data.num_patches, m.patch_dim), jnp.float32),
               audio=spec((b, config.data.num_audio_frames, m.audio_dim), jnp.float32))


@pytest.mark.parametrize('preset', ['pro', 'ultra'])
def test_full_size_presets_keep_their_parameter_count(preset):
  config = config_lib.load(f'configs/{preset}.yaml')
  counts = {}
  for scan in (False, True):
    model_config = dataclasses.replace(config.model, scan_layers=scan)
    decoder = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(decoder, nnx.Param))
    counts[scan] = sum(int(np.prod(p.shape)) for p in params)
  assert counts[True] == counts[False]
  graphdef, state = nnx.split(decoder)  # the scanned one
  for path, variable in nnx.to_flat_state(state):
    if path[0] == 'groups':
      names = variable.get_metadata()['out_sharding']
      assert names[0] == 'layers' and len(names) == len(variable.shape), path
      assert parallel.logical_spec(names)[0] is None  # the layer axis stays replicated
  logits, aux = jax.eval_shape(lambda state, batch: nnx.merge(graphdef, state)(batch), state,
                               abstract_batch(config))
  m = config.model
  assert logits.shape == (1, config.train.seq_len, m.vocab_size)
  num_moe = sum(m.is_moe_layer(i) for i in range(m.num_layers))
  assert aux['expert_load_LE'].shape == (num_moe, m.num_experts)
  assert aux['expert_load_by_modality_LME'].shape == (num_moe, 3, m.num_experts)


def test_one_train_step_equals_the_unscanned_model(test_config):
  """The whole train step (loss, clipping, AdamW) on stacked parameters."""
  from gemini_mini.train.loss import LossWeights
  from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
  from gemini_mini.train.step import TrainState, make_train_step
  model_config = dataclasses.replace(test_config.model, **SHAPES['moe_every2'])
  batch = make_batch(model_config, images=[(0, 5, 8)], audio=[(1, 3, 8)])
  optimizer = make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=2, weight_decay=0.1,
                             grad_clip=1.0)
  results = []
  for decoder in pair(test_config, **SHAPES['moe_every2'])[:2]:
    graphdef, params = nnx.split(decoder)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params))
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(1e-3, 10, 2),
                           LossWeights(), grad_accum_steps=2)
    results.append(jax.jit(step)(state, batch))
  (state, metrics), (state_s, metrics_s) = results
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(metrics_s[key], metrics[key], rtol=1e-5, err_msg=key)
  for key in ('expert_load_LE', 'dropped_L'):
    np.testing.assert_allclose(metrics_s[key], metrics[key], err_msg=key, **TOLERANCE)
  # Adam's first moment is the clipped gradient g times 1 - b1 = 0.1: compared tightly. The
  # first step moves a parameter by lr * g / (|g| + eps), ill-conditioned where |g| is near
  # eps = 1e-8 (on an H200, another summation order moved one such element of 8,192 by 8e-6
  # at lr 5e-4). So parameters whose gradient exceeds 100 eps are compared tightly, and the
  # rest only to within one step (lr).
  first_moment, first_moment_s = (optax.tree_utils.tree_get(s.opt_state, 'mu')
                                  for s in (state, state_s))
  expected_mu, actual_mu, expected_params, actual_params = (
      dict(nnx.to_flat_state(tree)) for tree in (
          stacked(first_moment, first_moment_s, model_config), first_moment_s,
          stacked(state.params, state_s.params, model_config), state_s.params))
  assert expected_params.keys() == actual_params.keys() == expected_mu.keys() == actual_mu.keys()
  # Every parameter, the stacked [groups, D] norm scales included (not weight-decayed).
  assert any(path[0] == 'groups' and path[-1] == 'scale_D' for path in expected_params)
  learning_rate = float(learning_rate_schedule(1e-3, 10, 2)(0))
  adam_b1, adam_eps = 0.9, 1e-8  # make_optimizer's b1 and optax.adamw's eps
  well_conditioned = []
  for path in expected_params:
    mu, params, params_s = (np.asarray(tree[path][...]) for tree in
                            (expected_mu, expected_params, actual_params))
    np.testing.assert_allclose(actual_mu[path][...], mu, rtol=1e-5, atol=1e-7, err_msg=str(path))
    steep = np.abs(mu) > (1 - adam_b1) * 100 * adam_eps  # |g| > 100 eps
    np.testing.assert_allclose(params_s[steep], params[steep], rtol=1e-5, atol=1e-7,
                               err_msg=str(path))
    np.testing.assert_allclose(params_s, params, atol=learning_rate, err_msg=str(path))
    well_conditioned.append(steep.mean())
  assert np.mean(well_conditioned) > 0.9  # the tight comparison covers most parameters


# ---- 8 fake CPU devices, in a fresh process ---------------------------------------------------

# One sharded mesh splits parameters along fsdp, experts and tensor at once (data and fsdp
# alone: tests/train/test_sharding.py).
MESHES = {'single': dict(data=1), 'fsdp2_expert2_tensor2': dict(data=1, fsdp=2, expert=2, tensor=2)}
SHARDED_OVERRIDES = ['model.num_layers=4', 'model.moe_every=2', 'train.batch_size=8']


def sharded_main():
  """Loss, gradients and one train step of the unscanned test model on one device, and of
  the scanned one holding its parameters on every mesh, printed as one JSON line."""
  from gemini_mini.train.loss import LossWeights, loss_sums
  from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
  from gemini_mini.train.step import (
      TrainState, abstract_train_state, init_train_state, jit_steps, make_eval_step,
      make_train_step)
  assert len(jax.devices()) == 8, jax.devices()
  config = config_lib.load('configs/test.yaml', SHARDED_OVERRIDES)
  weights = LossWeights(0.01, 0.001, 1e-4)
  batch = make_batch(config.model, batch_size=8, documents=[(64,), (40, 24)] * 4,
                     images=[(0, 3, 4), (5, 10, 6)], audio=[(2, 7, 5)])
  optimizer = make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=2, weight_decay=0.1,
                             grad_clip=1.0)
  runs = [('unscanned', MESHES['single'], False)]
  runs += [(name, sizes, True) for name, sizes in MESHES.items()]
  results, all_grads = {}, {}
  for name, sizes, scan in runs:
    model_config = dataclasses.replace(config.model, scan_layers=scan)
    devices = jax.devices() if sizes != MESHES['single'] else jax.devices()[:1]
    mesh = parallel.make_mesh(config_lib.MeshConfig(**sizes), devices)
    graphdef, shardings, _ = abstract_train_state(model_config, optimizer, mesh, seed=0)
    state = init_train_state(model_config, optimizer, shardings, seed=0)
    if not scan:
      unscanned_params = jax.device_get(state.params)
    else:
      params = stacked(unscanned_params, state.params, model_config)
      state = jax.jit(lambda params: TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                opt_state=optimizer.init(params)),
                      out_shardings=shardings)(params)
    layer_axis_split = [
        key for key, leaf in ((jax.tree_util.keystr(path), leaf) for path, leaf
                              in jax.tree_util.tree_leaves_with_path(state.params))
        if 'groups' in key and leaf.sharding.spec and leaf.sharding.spec[0]]

    def objective(params, batch):
      logits, aux = nnx.merge(graphdef, params)(batch)
      numerator, sums = loss_sums(logits, aux, batch, weights)
      return numerator / sums['tokens']

    global_batch = parallel.host_local_to_global(batch, mesh)
    with jax.set_mesh(mesh):
      loss, grads = jax.jit(jax.value_and_grad(objective))(state.params, global_batch)
      train_step, _ = jit_steps(make_train_step(graphdef, optimizer,
                                                learning_rate_schedule(1e-3, 10, 2), weights, 2),
                                make_eval_step(graphdef, weights), shardings, mesh)
      _, metrics = train_step(state, global_batch)
    all_grads[name] = grads
    results[name] = {
        'loss': float(loss), 'step_loss': float(metrics['loss']),
        'step_grad_norm': float(metrics['grad_norm']),
        'sharded_leaves': sum(not leaf.sharding.is_fully_replicated
                              for leaf in jax.tree.leaves(state.params)),
        'layer_axis_split': layer_axis_split,
    }
  all_grads['unscanned'] = stacked(jax.device_get(all_grads['unscanned']),
                                   jax.device_get(all_grads['single']), config.model)
  for name, grads in all_grads.items():
    results[name]['grads'] = {jax.tree_util.keystr(path): np.asarray(g).ravel()[:64].tolist()
                              for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  print(json.dumps(results))


@pytest.mark.slow
def test_sharded_scanned_training_matches_one_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, __file__, 'sharded'], capture_output=True, text=True,
                          env=env, cwd=pathlib.Path(__file__).parent.parent)
  assert result.returncode == 0, result.stderr[-4000:]
  results = json.loads(result.stdout.strip().splitlines()[-1])
  reference = results.pop('single')
  assert set(results) == {'fsdp2_expert2_tensor2', 'unscanned'}
  for name, run in results.items():
    assert not run['layer_axis_split'], f'{name}: the layer axis is split'
    if name == 'fsdp2_expert2_tensor2':
      assert run['sharded_leaves'] > 0, f'{name}: no parameter is actually sharded'
    np.testing.assert_allclose(run['loss'], reference['loss'], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(run['step_loss'], reference['step_loss'], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(run['step_grad_norm'], reference['step_grad_norm'], rtol=1e-5,
                               err_msg=name)
    assert run['grads'].keys() == reference['grads'].keys()
    for path, grad in reference['grads'].items():
      np.testing.assert_allclose(run['grads'][path], grad, rtol=1e-4, atol=1e-7,
                                 err_msg=f'{name} {path}')


if __name__ == '__main__' and sys.argv[1:] == ['sharded']:
  sharded_main()
