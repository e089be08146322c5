"""RMSNorm (Zhang & Sennrich 2019), computed in float32 whatever the input dtype."""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.param import param


class RMSNorm(nnx.Module):
  """``y = x / sqrt(mean(x**2) + eps) * scale`` over the last axis.

  Shapes: ``x_...D -> y_...D`` in the input dtype; the statistics are float32. ``eps`` is
  part of a trained model (Mixtral's is 1e-5): an imported one keeps its own.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
    self.eps = eps
    self.scale_D = param(rngs, nnx.initializers.ones, (dim,), ('embed',))

  def __call__(self, x_D: jax.Array) -> jax.Array:
    x32 = x_D.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv_rms * self.scale_D[...]).astype(x_D.dtype)
