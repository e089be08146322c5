"""The scalar head: a dot product per position, zero at the start, trainable."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_mini.layers.scalar_head import ScalarHead


def test_a_new_head_scores_everything_zero():
  head = ScalarHead(8, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(0), (2, 3, 8))
  np.testing.assert_array_equal(head(x_BTD), np.zeros((2, 3)))


def test_each_position_is_its_own_dot_product():
  head = ScalarHead(4, rngs=nnx.Rngs(0))
  head.w_D[...] = jnp.array([1.0, -2.0, 0.5, 0.0])
  head.b[...] = jnp.array(0.25)
  x_BTD = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
  expected = np.array([[sum(w * v for w, v in zip([1, -2, 0.5, 0], x_BTD[b, t])) + 0.25
                        for t in range(3)] for b in range(2)])
  np.testing.assert_allclose(head(jnp.asarray(x_BTD, jnp.bfloat16).astype(jnp.float32)),
                             expected, rtol=1e-6)
  assert head(jnp.asarray(x_BTD, jnp.bfloat16)).dtype == jnp.float32


def test_gradients_reach_both_parameters():
  head = ScalarHead(3, rngs=nnx.Rngs(0))
  x_BTD = jnp.ones((1, 2, 3))
  grads = nnx.grad(lambda head: head(x_BTD).sum())(head)
  np.testing.assert_allclose(grads.w_D[...], [2.0, 2.0, 2.0])
  np.testing.assert_allclose(grads.b[...], 2.0)
