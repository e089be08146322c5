"""Tests for round-to-nearest quantization against a numpy per-group reference."""

import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from gemini_mini.quant import rtn

QMAX = {4: 7.5, 8: 127.5}  # qwix's symmetric bound: the top bucket a whole one
QRANGE = {4: (-8, 7), 8: (-128, 127)}


def reference(w, bits, group, contract_axes):
  """Groups of ``group`` consecutive entries of the contraction axes flattened row-major:
  ``scale = absmax / qmax``, ``q = round(w / scale)`` clipped. Returns the dequantized ``w``
  and each entry's scale."""
  out_axes = [a for a in range(w.ndim) if a not in contract_axes]
  moved = np.transpose(w, out_axes + contract_axes).astype(np.float64)
  groups = moved.reshape(*moved.shape[:len(out_axes)], -1, group)
  scale = np.abs(groups).max(-1, keepdims=True) / QMAX[bits]
  q = np.clip(np.round(groups / scale), *QRANGE[bits])
  back = lambda x: np.transpose(np.broadcast_to(x, groups.shape).reshape(moved.shape),
                                np.argsort(out_axes + contract_axes))
  return back(q * scale), back(scale)


LAYOUTS = [  # shape, axes, contract, group
    ((64, 48), ('embed', 'mlp'), ('embed',), 32),
    ((4, 16, 24), ('heads', 'head_dim', 'embed'), ('heads', 'head_dim'), 8),   # group < H
    ((4, 16, 24), ('heads', 'head_dim', 'embed'), ('heads', 'head_dim'), 32),  # two heads
    ((3, 32, 20), ('expert', 'embed', 'mlp'), ('embed',), 16),
    ((2, 3, 40, 8), ('layers', 'expert', 'mlp', 'embed'), ('mlp',), 20),
]


@pytest.mark.parametrize('bits', [4, 8])
@pytest.mark.parametrize('shape, axes, contract, group', LAYOUTS)
def test_dequantized_weight_matches_the_numpy_reference(bits, shape, axes, contract, group):
  w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  q = rtn.quantize(jnp.asarray(w), bits, group, axes, contract, 'w')
  assert q.scale.shape == rtn.scale_shape(shape, axes, contract, group, 'w')
  expected, scale = reference(w, bits, group, [axes.index(a) for a in contract])
  dequantized = np.asarray(qwix.dequantize(q))
  # A group's extreme lies on a tie (qmax + 1/2 steps), which either neighbour may take.
  tie = np.isclose(np.abs(w), QMAX[bits] * scale, rtol=1e-6)
  np.testing.assert_allclose(dequantized[~tie], expected[~tie], rtol=1e-5, atol=1e-7)
  # The bound that follows, ties included: at most half a step of the entry's group.
  assert np.all(np.abs(w - dequantized) <= scale * (0.5 + 1e-4))  # float32 rounding


def test_tiling_reduces_inner_axes_and_tiles_the_first_that_holds_the_rest():
  axes, contract = ('heads', 'head_dim', 'embed'), ('heads', 'head_dim')
  assert rtn.tiling((4, 16, 24), axes, contract, 8, 'o') == ((0, 2), {1: 8})
  assert rtn.tiling((4, 16, 24), axes, contract, 16, 'o') == ((0, 2), {1: 16})
  assert rtn.tiling((4, 16, 24), axes, contract, 32, 'o') == ((2,), {0: 2})


def test_a_group_that_does_not_divide_the_contraction_names_the_weight_and_the_choices():
  with pytest.raises(ValueError, match=r"image.proj_ID: a group of 64 does not divide its "
                                       r"contraction \('features',\) of size 96; choose a "
                                       r"group among \[8, 12, 16, 24, 32, 48, 96\]"):
    rtn.quantize(jnp.ones((96, 8)), 4, 64, ('features', 'embed'), ('features',),
                 'image.proj_ID')
