"""Tests for the MoE row layouts: places in token order against a loop, the layout choice,
and every layout's index maps as a permutation of the kept slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.layers import moe_layout
from gemini_mini.layers.moe_layout import Layout

E = 4


def _routing(num_tokens, k, seed):
  rng = np.random.default_rng(seed)
  experts_XR = np.stack([rng.permutation(E)[:k] for _ in range(num_tokens)])
  return jnp.asarray(experts_XR, jnp.int32), jnp.asarray(rng.random(num_tokens) > 0.3)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_rank_in_expert_follows_token_order(k):
  experts_XR, valid_X = _routing(9, k, seed=k)
  rank_XR, count_E = moe_layout.rank_in_expert(experts_XR, valid_X, E)
  used = [0] * E
  for t in range(9):  # token t's choices before token t+1's
    for r in range(k):
      if valid_X[t]:
        assert rank_XR[t, r] == used[experts_XR[t, r]], (t, r)
        used[experts_XR[t, r]] += 1
  np.testing.assert_array_equal(count_E, used)


def test_choose_layout_takes_the_smaller_buffer():
  choose = lambda x, tile: moe_layout.choose_layout('dropless', x, 2, E, tile)
  # 2 X k <= E: per slot. E X rows against at most X k + E (tile - 1): equal at X = 254.
  assert [choose(x, 128) for x in (1, 2, 8, 254, 255, 4096)] == (
      [Layout.PER_SLOT] + [Layout.EVERY_TOKEN] * 3 + [Layout.SHARE_AND_TILES] * 2)
  assert [choose(x, 8) for x in (14, 15)] == [Layout.EVERY_TOKEN, Layout.SHARE_AND_TILES]
  assert moe_layout.choose_layout('capacity', 1, 2, E, 8) is Layout.CAPACITY


def _check_maps(rows, experts_XR, kept_XR):
  """Kept slots own distinct rows (a row of their own expert's block) and the inverse map
  names them back; every other row is empty."""
  row_of_slot, slot_of_row = np.asarray(rows.row_of_slot_XR), np.asarray(rows.slot_of_row_W)
  num_rows, k = len(slot_of_row), experts_XR.shape[1]
  np.testing.assert_array_equal(rows.kept_XR, kept_XR)
  kept_rows = row_of_slot[kept_XR]
  assert len(set(kept_rows)) == len(kept_rows) and (row_of_slot[~kept_XR] == num_rows).all()
  for (x, r) in zip(*np.nonzero(kept_XR)):
    assert slot_of_row[row_of_slot[x, r]] == x * k + r
  assert (np.delete(slot_of_row, kept_rows) == experts_XR.size).all()
  return row_of_slot


def test_capacity_rows_keep_the_first_slots_of_each_sequence():
  experts_XR, valid_X = _routing(12, 2, seed=0)
  experts_BTR, valid_BT = experts_XR.reshape(2, 6, 2), valid_X.reshape(2, 6)
  capacity = 2
  rows = moe_layout.capacity_rows(experts_BTR, valid_BT, E, capacity)
  rank_BTR = jax.vmap(moe_layout.rank_in_expert, in_axes=(0, 0, None))(experts_BTR, valid_BT,
                                                                       E)[0]
  kept_XR = np.asarray((valid_BT[..., None] & (rank_BTR < capacity)).reshape(12, 2))
  row_of_slot = _check_maps(rows, np.asarray(experts_XR), kept_XR)
  per_expert = rows.per_expert
  assert per_expert == 2 * capacity and len(rows.slot_of_row_W) == E * per_expert
  x, r = np.nonzero(kept_XR)
  np.testing.assert_array_equal(row_of_slot[x, r] // per_expert, np.asarray(experts_XR)[x, r])
  np.testing.assert_array_equal(row_of_slot[x, r] % per_expert // capacity, x // 6)


def test_share_and_tile_rows_keep_every_valid_slot_in_its_expert():
  experts_XR, valid_X = _routing(40, 2, seed=1)
  experts_XR = experts_XR.at[:25, 0].set(0)  # expert 0 overflows its even share
  tile = 8
  rows = moe_layout.share_and_tile_rows(experts_XR, valid_X, E, tile)
  kept_XR = np.broadcast_to(np.asarray(valid_X)[:, None], experts_XR.shape)
  row_of_slot = _check_maps(rows, np.asarray(experts_XR), kept_XR)
  share, overflow_E = rows.per_expert, np.asarray(rows.overflow_E)
  assert share == 40 * 2 // E and (overflow_E % tile == 0).all() and overflow_E[0] > 0
  bounds = np.concatenate([[E * share], E * share + np.cumsum(overflow_E)])
  for (x, r) in zip(*np.nonzero(kept_XR)):
    e, row = int(experts_XR[x, r]), row_of_slot[x, r]
    assert e * share <= row < (e + 1) * share or bounds[e] <= row < bounds[e + 1]


def test_gather_and_combine_have_gather_gradients():
  # take_rows' hand-written backward equals autodiff of a plain indexing reference.
  experts_XR, valid_X = _routing(6, 2, seed=2)
  rows = moe_layout.capacity_rows(experts_XR[None], valid_X[None], E, 2)
  x_XD = jax.random.normal(jax.random.key(0), (6, 3))
  weights_XR = jax.random.uniform(jax.random.key(1), (6, 2))
  fast = lambda x: jnp.sum(rows.combine(rows.gather(x) * 2.0, weights_XR) ** 2)

  def reference(x_XD):
    y_XD = jnp.zeros_like(x_XD)
    for x, r in zip(*np.nonzero(np.asarray(rows.kept_XR))):
      y_XD = y_XD.at[x].add(weights_XR[x, r] * 2.0 * x_XD[x])
    return jnp.sum(y_XD ** 2)

  np.testing.assert_allclose(fast(x_XD), reference(x_XD), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(fast)(x_XD), jax.grad(reference)(x_XD), rtol=1e-5,
                             atol=1e-6)
