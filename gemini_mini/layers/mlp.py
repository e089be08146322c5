"""Gated feed-forward layer (GeGLU, Shazeer 2020): the dense block and each expert."""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.param import fan_in_init, param


def gated_activation(gate_F: jax.Array, up_F: jax.Array) -> jax.Array:
  """``gelu(gate) * up``: the one nonlinearity shared by the dense MLP and the experts."""
  return jax.nn.gelu(gate_F, approximate=True) * up_F


class GatedMLP(nnx.Module):
  """``y = (gelu(x W_gate) * (x W_up)) W_down``.

  Shapes: ``x_BTD -> y_BTD``; matmuls run in ``dtype`` (parameters stay float32).
  """

  def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.gate_DF = param(rngs, fan_in_init(d_model), (d_model, d_ff), ('embed', 'mlp'))
    self.up_DF = param(rngs, fan_in_init(d_model), (d_model, d_ff), ('embed', 'mlp'))
    self.down_FD = param(rngs, fan_in_init(d_ff), (d_ff, d_model), ('mlp', 'embed'))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD.astype(self.dtype)
    gate_BTF = jnp.einsum('BTD,DF->BTF', x_BTD, self.gate_DF[...].astype(self.dtype))
    up_BTF = jnp.einsum('BTD,DF->BTF', x_BTD, self.up_DF[...].astype(self.dtype))
    hidden_BTF = gated_activation(gate_BTF, up_BTF)
    return jnp.einsum('BTF,FD->BTD', hidden_BTF, self.down_FD[...].astype(self.dtype))
