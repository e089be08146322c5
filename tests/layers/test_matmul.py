"""Tests for weight_einsum against float64 numpy einsums of the same (rounded) operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_mini.layers.matmul import _low_precision_einsum, weight_einsum

# (spec, x shape, w shape): every spec the layers use.
SPECS = [
    ('XD,DF->XF', (6, 8), (8, 5)),            # MLP, projections
    ('XD,DNH->XNH', (6, 8), (8, 3, 4)),       # query heads
    ('XNH,NHD->XD', (6, 3, 4), (3, 4, 8)),    # attention output
    ('XD,VD->XV', (6, 8), (11, 8)),           # tied logits
    ('ECD,EDF->ECF', (3, 4, 8), (3, 8, 5)),   # experts on their buffers
    ('I,IO->O', (8,), (8, 5)),                # one routed slot
]


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _grads(fn, x, w, dy):
  """``d sum(fn(x, w) * dy)`` w.r.t. ``x`` and ``w``."""
  return jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * dy), argnums=(0, 1))(x, w)


@pytest.mark.parametrize('spec,x_shape,w_shape', SPECS)
def test_float32_is_the_einsum(spec, x_shape, w_shape):
  x, w = _normal(x_shape, 0), _normal(w_shape, 1)
  y = weight_einsum(spec, x, w, jnp.float32)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, np.einsum(spec, _f64(x), _f64(w)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('spec,x_shape,w_shape', SPECS)
def test_hand_written_backward_equals_autodiff(spec, x_shape, w_shape):
  """The bfloat16 path's custom VJP, run in float32, against JAX's own gradients."""
  x, w = _normal(x_shape, 0), _normal(w_shape, 1)
  dy = _normal(jnp.einsum(spec, x, w).shape, 2)
  custom = _grads(lambda x, w: _low_precision_einsum(spec, jnp.dtype(jnp.float32), x, w), x, w, dy)
  plain = _grads(lambda x, w: jnp.einsum(spec, x, w), x, w, dy)
  for got, want in zip(custom, plain):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('spec,x_shape,w_shape', SPECS)
def test_bfloat16_values_and_gradients(spec, x_shape, w_shape):
  """Every layer's spec compiles in bfloat16 (XLA:CPU refused some multi-axis ones, e.g. the
  query weight's gradient 'XD,XNH->DNH') and matches float64 at bfloat16 precision."""
  x, w = _normal(x_shape, 0).astype(jnp.bfloat16), _normal(w_shape, 1)
  dy = _normal(jnp.einsum(spec, x, w).shape, 2)
  fn = lambda x, w: weight_einsum(spec, x, w, jnp.bfloat16)
  y, (dx, dw) = jax.jit(fn)(x, w), jax.jit(lambda x, w: _grads(fn, x, w, dy))(x, w)
  assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  x64, w64 = _f64(x), _f64(w)
  reference_grads = _grads(lambda x, w: jnp.einsum(spec, x, w), x.astype(jnp.float32), w, dy)
  for got, want in ((y, np.einsum(spec, x64, w64)),
                    (dw, reference_grads[1]), (dx, reference_grads[0])):
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(_f64(got), want, atol=2e-2 * scale)


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='the hand-written backward (float32 weight gradient) is CPU only')
def test_bfloat16_accumulates_in_float32():
  """A 4,096-term contraction of bfloat16-exact operands: summed in float32 the result is
  the float64 sum up to the final rounding to bfloat16 (and the weight gradient, returned
  in float32, to about 1e-6), which bfloat16 accumulation would miss by far more."""
  x = _normal((4, 4096), 0).astype(jnp.bfloat16)
  w = _normal((4096, 3), 1).astype(jnp.bfloat16).astype(jnp.float32)  # a float32 parameter
  y = weight_einsum('XD,DF->XF', x, w, jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  want = np.einsum('XD,DF->XF', _f64(x), _f64(w))
  np.testing.assert_allclose(_f64(y), want, rtol=2 ** -8, atol=0)

  dy = _normal((4, 3), 2).astype(jnp.bfloat16).astype(jnp.float32)
  dx, dw = _grads(lambda x, w: weight_einsum('XD,DF->XF', x, w, jnp.bfloat16), x, w, dy)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(dw, np.einsum('XD,XF->DF', _f64(x), _f64(dy)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_f64(dx), _f64(dy) @ _f64(w).T, rtol=2 ** -8, atol=1e-6)


def test_out_dtype_keeps_float32_logits():
  x, w = _normal((6, 8), 0).astype(jnp.bfloat16), _normal((8, 11), 1)
  logits = weight_einsum('XD,DV->XV', x, w, jnp.bfloat16, out_dtype=jnp.float32)
  assert logits.dtype == jnp.float32
  want = np.einsum('XD,DV->XV', _f64(x), _f64(w.astype(jnp.bfloat16)))
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  dx, dw = _grads(lambda x, w: weight_einsum('XD,DV->XV', x, w, jnp.bfloat16,
                                             out_dtype=jnp.float32), x, w, jnp.ones((6, 11)))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_bad_specs_are_refused(dtype):
  x, w = _normal((6, 8), 0), _normal((8, 5), 1)
  with pytest.raises(ValueError, match="'XD,DF->F'.*sum it out"):
    weight_einsum('XD,DF->F', x, w, dtype)
  with pytest.raises(ValueError, match="'XD, DF->XF'.*without spaces"):
    weight_einsum('XD, DF->XF', x, w, dtype)
  with pytest.raises(ValueError, match="two operands"):
    weight_einsum('XD->XD', x, w, dtype)
