"""Tests for the MoE layer against a slow per-token loop reference.

The reference routes each token on its own (numpy top-k of its router logits), then sums
``weight * gated_mlp(x_t; expert e)`` over the kept slots with single-token jnp math, one
token at a time; jax autodiff of that one-token function gives the reference gradients for
the input and every parameter. Each configuration runs once per file (``_run`` is cached) and
several tests check different things on it, which keeps the number of compilations small.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_mini.layers import MoE
from gemini_mini.layers.grouped_matmul import Implementation
from gemini_mini.layers.moe_layout import Layout

D, F, E = 8, 16, 4
ATOL, RTOL = 1e-5, 1e-4
# Gradients sum products over tokens and slots in another order than the reference.
GRAD_ATOL = 5e-5


def _gelu_tanh(x):
  return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _mlp(x_D, gate_DF, up_DF, down_FD):
  return (_gelu_tanh(x_D @ gate_DF) * (x_D @ up_DF)) @ down_FD


def _inputs(batch, length, seed, invalid=()):
  rng = np.random.default_rng(seed)
  x_BTD = jnp.asarray(rng.normal(size=(batch, length, D)), jnp.float32)
  valid_BT = np.ones((batch, length), bool)
  for b, t in invalid:
    valid_BT[b, t] = False
  return x_BTD, jnp.asarray(valid_BT)


def _params(moe):
  return nnx.to_pure_dict(nnx.state(moe, nnx.Param))


def _route(params, x_BTD, k):
  """Numpy top-k of each token's router logits: ``experts_BTR`` (most probable first)."""
  logits_BTE = np.asarray(x_BTD, np.float64) @ np.asarray(params['router']['w_DE'], np.float64)
  return np.argsort(-logits_BTE, axis=-1, kind='stable')[..., :k]


def _capacity_kept(experts_BTR, valid_BT, capacity, count_invalid=False, choice_major=False):
  """Which slots capacity dispatch keeps, filling each expert per sequence in token order:
  token t's choices, then token t+1's. ``count_invalid`` lets padding take capacity, and
  ``choice_major`` takes every token's first choice before any second choice (GShard's order,
  which lets a later token take an earlier one's place): wrong behaviours, to show that the
  tests can tell the difference."""
  batch, length, k = experts_BTR.shape
  kept_BTR = np.zeros((batch, length, k), bool)
  order = ([(t, r) for r in range(k) for t in range(length)] if choice_major else
           [(t, r) for t in range(length) for r in range(k)])
  for b in range(batch):
    used = [0] * E
    for t, r in order:
      if not (valid_BT[b, t] or count_invalid):
        continue
      e = experts_BTR[b, t, r]
      if used[e] < capacity:
        kept_BTR[b, t, r] = bool(valid_BT[b, t])
        used[e] += 1
  return kept_BTR


@jax.jit
def _token_value_and_grad(params, x_D, experts_R, keep_R, dy_D):
  """One token's ``y_D`` (kept routed slots, weighted, plus the shared expert) and the
  gradients of ``y_D . dy_D`` w.r.t. the parameters and ``x_D``."""
  def loss(params, x_D):
    probs_E = jax.nn.softmax(x_D @ params['router']['w_DE'])
    chosen_R = probs_E[experts_R]
    weights_R = chosen_R if len(experts_R) == 1 else chosen_R / chosen_R.sum()
    y_D = jnp.zeros(D)
    for r in range(len(experts_R)):
      e = experts_R[r]
      y_D += keep_R[r] * weights_R[r] * _mlp(x_D, params['gate_EDF'][e], params['up_EDF'][e],
                                             params['down_EFD'][e])
    if 'shared' in params:
      shared = params['shared']
      y_D += _mlp(x_D, shared['gate_DF'], shared['up_DF'], shared['down_FD'])
    return jnp.dot(y_D, dy_D), y_D
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x_D)


def _reference(params, x_BTD, valid_BT, experts_BTR, kept_BTR, dy_BTD=None):
  """The loop reference: ``y_BTD`` and the gradients of ``sum(y * dy)`` (params, x)."""
  batch, length, _ = x_BTD.shape
  dy_BTD = np.zeros(x_BTD.shape, np.float32) if dy_BTD is None else np.asarray(dy_BTD)
  y_BTD, dx_BTD = np.zeros(x_BTD.shape), np.zeros(x_BTD.shape)
  d_params = jax.tree.map(lambda p: np.zeros(p.shape), params)
  for b in range(batch):
    for t in range(length):
      keep_R = np.asarray(kept_BTR[b, t] & valid_BT[b, t], np.float32)  # padding: no routing
      (_, y_D), (d_token, dx_D) = _token_value_and_grad(
          params, x_BTD[b, t], jnp.asarray(experts_BTR[b, t], jnp.int32), keep_R, dy_BTD[b, t])
      y_BTD[b, t], dx_BTD[b, t] = y_D, dx_D
      d_params = jax.tree.map(lambda acc, g: acc + np.asarray(g), d_params, d_token)
  return y_BTD, d_params, dx_BTD


def _assert_tree_close(actual, expected, atol, rtol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for path, a in jax.tree_util.tree_leaves_with_path(actual):
    b = expected
    for key in path:
      b = b[key.key]
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


@functools.cache
def _run(dispatch, k, shared_expert, capacity_factor=1.25, implementation='tiled', seed=0,
         shape=(2, 6), invalid=()):
  """One configuration, module and loop reference, values and gradients, run once per file.

  The module runs jitted with the grouped matmul ``implementation``; the traced program shows
  which one ran (``ragged_dot`` is a primitive of its own, the tiled loop a ``while``)."""
  moe = MoE(D, F, E, k, dispatch=dispatch, capacity_factor=capacity_factor,
            shared_expert=shared_expert, grouped_matmul=Implementation(implementation),
            rngs=nnx.Rngs(seed))
  x_BTD, valid_BT = _inputs(*shape, seed=seed, invalid=invalid)
  dy_BTD = jnp.asarray(np.random.default_rng(seed + 100).normal(size=x_BTD.shape), jnp.float32)
  graphdef, state = nnx.split(moe)

  def loss(state, x_BTD):
    y_BTD, aux = nnx.merge(graphdef, state)(x_BTD, valid_BT)
    return jnp.sum(y_BTD * dy_BTD), (y_BTD, aux)

  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, (y_BTD, aux)), (d_state, dx_BTD) = jax.jit(value_and_grad)(state, x_BTD)
  program = str(jax.make_jaxpr(value_and_grad)(state, x_BTD))
  grouped = moe.layout(math.prod(shape)) is Layout.SHARE_AND_TILES
  assert ('ragged_dot' in program) == (grouped and implementation == 'ragged_dot')
  assert ('while' in program) == (grouped and implementation == 'tiled')

  params = _params(moe)
  valid = np.asarray(valid_BT)
  experts_BTR = _route(params, x_BTD, k)
  if dispatch == 'capacity':
    kept_BTR = _capacity_kept(experts_BTR, valid, moe.capacity(shape[1]))
  else:
    kept_BTR = valid[..., None] & np.ones(experts_BTR.shape, bool)
  ref_y_BTD, ref_d_params, ref_dx_BTD = _reference(params, x_BTD, valid, experts_BTR, kept_BTR,
                                                   dy_BTD)
  return dict(moe=moe, params=params, x_BTD=x_BTD, valid=valid, y_BTD=y_BTD, aux=aux,
              d_params=nnx.to_pure_dict(d_state), dx_BTD=dx_BTD, experts_BTR=experts_BTR,
              kept_BTR=kept_BTR, ref_y_BTD=ref_y_BTD, ref_d_params=ref_d_params,
              ref_dx_BTD=ref_dx_BTD)


def _assert_matches_reference(run):
  assert run['y_BTD'].shape == run['x_BTD'].shape and run['y_BTD'].dtype == jnp.float32
  np.testing.assert_allclose(run['y_BTD'], run['ref_y_BTD'], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(run['dx_BTD'], run['ref_dx_BTD'], atol=GRAD_ATOL, rtol=RTOL)
  _assert_tree_close(run['d_params'], run['ref_d_params'], atol=GRAD_ATOL, rtol=RTOL)


# Padding in the middle and at both ends of the sequences. 12 tokens take the [E, X] token
# buffer (but k=1 with ragged_dot's 8-row tiles), 320 take the tiles.
DROPLESS = dict(dispatch='dropless', shape=(2, 6), invalid=((0, 2), (1, 0), (1, 5)))
DROPLESS_TILED = dict(dispatch='dropless', shape=(2, 160), invalid=((0, 2), (1, 0), (1, 159)))
# Small capacity; padding first in the sequences, where it would take capacity if counted.
OVERFLOW = dict(dispatch='capacity', shared_expert=False, capacity_factor=0.5, shape=(2, 8),
                invalid=((0, 0), (0, 1), (1, 0)))


# (a) Dropless dispatch.

@pytest.mark.parametrize('case', [DROPLESS, DROPLESS_TILED], ids=['few_tokens', 'tiled'])
@pytest.mark.parametrize('implementation', [i.value for i in Implementation])
@pytest.mark.parametrize('k, shared_expert', [(1, False), (2, True)])
def test_dropless_matches_loop_reference(case, implementation, k, shared_expert):
  run = _run(k=k, shared_expert=shared_expert, implementation=implementation, seed=k, **case)
  _assert_matches_reference(run)
  if not shared_expert:  # padding tokens get nothing from the routed experts
    np.testing.assert_array_equal(run['y_BTD'][~run['valid']], 0.0)


@pytest.mark.parametrize('k, shape, invalid', [(1, (2, 1), ((1, 0),)), (2, (1, 1), ())])
def test_decoding_few_slots_reads_only_their_experts(k, shape, invalid):
  # X * k slots with 2 X k <= E (decoding a row or two): each slot with its expert's weights.
  assert MoE(D, F, E, k, dispatch='dropless', rngs=nnx.Rngs(0)).layout(
      math.prod(shape)) is Layout.PER_SLOT
  run = _run(dispatch='dropless', k=k, shared_expert=False, seed=k, shape=shape,
             invalid=invalid)
  _assert_matches_reference(run)
  np.testing.assert_array_equal(run['y_BTD'][~run['valid']], 0.0)


@pytest.mark.parametrize('implementation', list(Implementation))
def test_dropless_extreme_group_sizes(implementation):
  # Every token's first choice is expert 0: its group spans more than one tiled tile (128
  # rows) and the other groups are empty. Then no valid token at all: every group is empty.
  moe = MoE(D, F, E, 1, dispatch='dropless', grouped_matmul=implementation, rngs=nnx.Rngs(3))
  x_BTD, valid_BT = _inputs(2, 200, seed=3, invalid=[(1, 198)])
  assert moe.layout(400) is Layout.SHARE_AND_TILES
  x_BTD = x_BTD.at[..., 0].set(jnp.abs(x_BTD[..., 0]) + 1.0)
  moe.router.w_DE[...] = moe.router.w_DE[...].at[0, 0].set(20.0)
  params = _params(moe)
  experts_BTR = _route(params, x_BTD, 1)
  assert np.all(experts_BTR == 0)
  forward = nnx.jit(lambda moe, x_BTD, valid_BT: moe(x_BTD, valid_BT))
  y_BTD, _ = forward(moe, x_BTD, valid_BT)
  ref_y_BTD, _, _ = _reference(params, x_BTD, np.asarray(valid_BT), experts_BTR,
                               np.ones(experts_BTR.shape, bool))
  np.testing.assert_allclose(y_BTD, ref_y_BTD, atol=ATOL, rtol=RTOL)

  y_BTD, aux = forward(moe, x_BTD, jnp.zeros(valid_BT.shape, bool))
  np.testing.assert_array_equal(y_BTD, 0.0)
  for name in ('load_balance', 'router_z', 'dropped'):
    assert aux[name] == 0.0, name  # zero, not NaN


# (b) Capacity dispatch.

@pytest.mark.parametrize('k, shared_expert', [(1, False), (2, True)])
def test_capacity_without_overflow_equals_dropless(k, shared_expert):
  run = _run('capacity', k, shared_expert, capacity_factor=float(E), seed=k,
             shape=DROPLESS['shape'], invalid=DROPLESS['invalid'])
  assert run['moe'].capacity(6) >= 6 * k  # room for every slot of a sequence in one expert
  _assert_matches_reference(run)
  assert run['aux']['dropped'] == 0.0
  dropless = _run(k=k, shared_expert=shared_expert, seed=k, **DROPLESS)
  _assert_tree_close(run['params'], dropless['params'], atol=0, rtol=0)  # same parameters
  np.testing.assert_allclose(run['y_BTD'], dropless['y_BTD'], atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(run['dx_BTD'], dropless['dx_BTD'], atol=GRAD_ATOL, rtol=RTOL)
  _assert_tree_close(run['d_params'], dropless['d_params'], atol=GRAD_ATOL, rtol=RTOL)
  for name in run['aux']:
    np.testing.assert_allclose(run['aux'][name], dropless['aux'][name], atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize('k', [1, 2])
def test_capacity_drops_exactly_the_overflow(k):
  run = _run(k=k, seed=20 + k, **OVERFLOW)
  valid, kept_BTR = run['valid'], run['kept_BTR']
  num_dropped = np.sum(valid[..., None] & ~kept_BTR)
  assert 0 < num_dropped < valid.sum() * k  # the example does overflow, but not completely
  if k == 2:  # and some second choices are kept while others are dropped
    assert kept_BTR[..., 1][valid].any() and not kept_BTR[..., 1][valid].all()
  _assert_matches_reference(run)  # the reference skips exactly the slots the loop dropped
  np.testing.assert_allclose(run['aux']['dropped'], num_dropped / (valid.sum() * k), rtol=1e-6)


@pytest.mark.parametrize('k', [1, 2])
def test_capacity_invalid_tokens_take_no_capacity(k):
  run = _run(k=k, seed=20 + k, **OVERFLOW)
  counting_padding = _capacity_kept(run['experts_BTR'], run['valid'], run['moe'].capacity(8),
                                    count_invalid=True)
  assert (counting_padding != run['kept_BTR']).any()  # the example tells the two apart
  np.testing.assert_allclose(run['y_BTD'], run['ref_y_BTD'], atol=ATOL, rtol=RTOL)
  wrong_y_BTD, _, _ = _reference(run['params'], run['x_BTD'], run['valid'], run['experts_BTR'],
                                 counting_padding)
  assert not np.allclose(run['y_BTD'], wrong_y_BTD, atol=1e-3)


@pytest.mark.parametrize('capacity_factor', [0.25, 0.5, 1.25])
@pytest.mark.parametrize('k', [1, 2])
def test_capacity_never_lets_a_later_token_change_an_earlier_output(capacity_factor, k):
  # Replace the tokens from t on (the future) with new ones, for every t: the outputs before
  # t stay bit for bit. The example drops slots, and for k = 2 GShard's choice-major order
  # would have let the same edits change earlier tokens' kept slots.
  length, rng = 24, np.random.default_rng(7)
  moe = MoE(D, F, E, k, capacity_factor=capacity_factor, rngs=nnx.Rngs(7))
  moe.router.w_DE[...] = moe.router.w_DE[...].at[0, 0].add(2.0)  # uneven load: cf 1.25 drops
  x_BTD, valid_BT = _inputs(2, length, seed=7, invalid=[(1, 3)])
  x_BTD = x_BTD.at[..., 0].add(1.0)
  forward = nnx.jit(lambda moe, x_BTD: moe(x_BTD, valid_BT))
  y_BTD, aux = forward(moe, x_BTD)
  assert aux['dropped'] > 0
  params, capacity = _params(moe), moe.capacity(length)
  experts_BTR = _route(params, x_BTD, k)
  leaks = changed = 0
  for t in range(1, length):
    future = jnp.asarray(rng.normal(size=(2, length - t, D)), jnp.float32).at[..., 0].add(1.0)
    edited_BTD = x_BTD.at[:, t:].set(future)
    edited_y_BTD, _ = forward(moe, edited_BTD)
    np.testing.assert_array_equal(edited_y_BTD[:, :t], y_BTD[:, :t], err_msg=f'edit at {t}')
    changed += not np.allclose(edited_y_BTD[:, t:], y_BTD[:, t:])
    old, new = (_capacity_kept(e, np.asarray(valid_BT), capacity, choice_major=True)
                for e in (experts_BTR, _route(params, edited_BTD, k)))
    leaks += (old[:, :t] != new[:, :t]).any()
  assert changed > 0  # the edits reach the outputs they may reach
  assert leaks > 0 if k == 2 else leaks == 0


def test_capacity_keeps_the_first_tokens_whole():
  # Hand-computed: E = 2, k = 2, cf 0.5, four tokens: C = ceil(0.5 * 4 * 2 / 2) = 2, and
  # every token routes to both experts, so tokens 0 and 1 fill both experts and tokens 2 and
  # 3 are dropped whole, whatever they are.
  moe = MoE(D, F, 2, 2, capacity_factor=0.5, rngs=nnx.Rngs(0))
  dropless = MoE(D, F, 2, 2, dispatch='dropless', rngs=nnx.Rngs(0))
  assert moe.capacity(4) == 2
  x_BTD, valid_BT = _inputs(1, 4, seed=0)
  y_BTD, aux = moe(x_BTD, valid_BT)
  np.testing.assert_allclose(y_BTD[:, :2], dropless(x_BTD, valid_BT)[0][:, :2], atol=1e-6)
  np.testing.assert_array_equal(y_BTD[:, 2:], 0.0)
  assert aux['dropped'] == 0.5
  edited_y_BTD, _ = moe(x_BTD.at[:, 3].set(-3 * x_BTD[:, 3]), valid_BT)
  np.testing.assert_array_equal(edited_y_BTD, y_BTD)


@pytest.mark.parametrize('capacity_factor, length, k, expected', [
    (1.25, 8, 2, 5),  # ceil(20 / 4)
    (1.0, 8, 1, 2),   # ceil(8 / 4)
    (0.5, 8, 2, 2),   # ceil(8 / 4), the OVERFLOW runs
    (0.5, 6, 1, 1),   # ceil(3 / 4)
    (1.5, 3, 1, 2),   # ceil(4.5 / 4) = 2: the exact quotient rounds up
])
def test_capacity_follows_the_documented_formula(capacity_factor, length, k, expected):
  # Module docstring: C = ceil(capacity_factor * T * k / E).
  assert math.ceil(capacity_factor * length * k / E) == expected
  moe = MoE(D, F, E, k, capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
  assert moe.capacity(length) == expected


# (c) aux, and (d) router gradients, on four of the runs above.

RUNS = {
    'dropless-k1': lambda: _run(k=1, shared_expert=False, seed=1, **DROPLESS),
    'dropless-k2-shared': lambda: _run(k=2, shared_expert=True, seed=2, **DROPLESS),
    'capacity-k1': lambda: _run(k=1, seed=21, **OVERFLOW),
    'capacity-k2': lambda: _run(k=2, seed=22, **OVERFLOW),
}


@pytest.mark.parametrize('name', RUNS)
def test_aux_contents(name):
  run = RUNS[name]()
  aux, valid, k = run['aux'], run['valid'], run['moe'].experts_per_token
  batch, length = valid.shape
  assert set(aux) == {'load_balance', 'router_z', 'dropped', 'expert_load_E', 'routed_BTE'}
  for key in ('load_balance', 'router_z', 'dropped'):
    assert aux[key].shape == () and aux[key].dtype == jnp.float32, key
  assert aux['expert_load_E'].shape == (E,)
  assert aux['routed_BTE'].shape == (batch, length, E)

  # The losses recomputed in numpy from the router logits, over valid tokens only.
  logits = (np.asarray(run['x_BTD'], np.float64)
            @ np.asarray(run['params']['router']['w_DE'], np.float64))[valid]  # [valid, E]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  experts = run['experts_BTR'][valid]
  load_E = np.bincount(experts.ravel(), minlength=E) / experts.size  # dropped slots included
  np.testing.assert_allclose(aux['expert_load_E'], load_E, rtol=1e-6)
  np.testing.assert_allclose(aux['expert_load_E'].sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(aux['load_balance'], E * np.sum(load_E * probs.mean(0)), rtol=1e-5)
  np.testing.assert_allclose(aux['router_z'], np.mean(np.log(np.exp(logits).sum(-1))**2),
                             rtol=1e-5)
  # routed_BTE: k-hot over each valid token's chosen experts, zero for padding.
  routed_BTE = np.asarray(aux['routed_BTE'])
  np.testing.assert_array_equal(routed_BTE.sum(-1), np.where(valid, k, 0))
  expected_BTE = np.zeros((batch, length, E))
  for b, t in zip(*np.nonzero(valid)):
    expected_BTE[b, t, run['experts_BTR'][b, t]] = 1
  np.testing.assert_array_equal(routed_BTE, expected_BTE)
  if name.startswith('dropless'):
    assert aux['dropped'] == 0.0


@pytest.mark.parametrize('name', RUNS)
def test_router_gets_gradient_through_combine_weights(name):
  # The loss is sum(y * dy) with no aux loss, so the router is trained by the combine weights
  # alone; its gradient matches the reference's, where the weights are its only path.
  run = RUNS[name]()
  d_router_DE = run['d_params']['router']['w_DE']
  assert np.all(np.isfinite(d_router_DE)) and np.abs(d_router_DE).max() > 1e-3
  np.testing.assert_allclose(d_router_DE, run['ref_d_params']['router']['w_DE'],
                             atol=GRAD_ATOL, rtol=RTOL)


# (e) Bad arguments.

def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='dispatch'):
    MoE(D, F, E, 1, dispatch='sorted', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='experts_per_token'):
    MoE(D, F, E, E + 1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='experts_per_token'):
    MoE(D, F, E, 0, rngs=nnx.Rngs(0))


# (f) Logical axis names, and dtypes.

def test_parameters_carry_logical_axis_names():
  moe = MoE(D, F, E, 2, shared_expert=True, rngs=nnx.Rngs(0))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(moe, nnx.Param)))
  assert tuple(specs['gate_EDF']) == ('expert', 'embed', 'mlp')
  assert tuple(specs['up_EDF']) == ('expert', 'embed', 'mlp')
  assert tuple(specs['down_EFD']) == ('expert', 'mlp', 'embed')
  assert tuple(specs['router']['w_DE']) == ('embed', None)
  assert tuple(specs['shared']['gate_DF']) == ('embed', 'mlp')
  assert tuple(specs['shared']['up_DF']) == ('embed', 'mlp')
  assert tuple(specs['shared']['down_FD']) == ('mlp', 'embed')


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
def test_bfloat16_activations_float32_params(dispatch):
  moe = MoE(D, F, E, 2, dispatch=dispatch, capacity_factor=float(E), shared_expert=True,
            dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x_BTD, valid_BT = _inputs(2, 4, seed=0)
  y_BTD, aux = nnx.jit(lambda moe, x_BTD, valid_BT: moe(x_BTD, valid_BT))(moe, x_BTD, valid_BT)
  assert y_BTD.dtype == jnp.bfloat16
  assert aux['load_balance'].dtype == jnp.float32 and aux['router_z'].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_params(moe)))
  params = _params(moe)
  ref_y_BTD, _, _ = _reference(params, x_BTD, np.asarray(valid_BT), _route(params, x_BTD, 2),
                               np.ones((2, 4, 2), bool))
  # bfloat16 activations and matmuls: about 2-3 significant digits.
  np.testing.assert_allclose(np.asarray(y_BTD, np.float32), ref_y_BTD, atol=0.1, rtol=0.05)
