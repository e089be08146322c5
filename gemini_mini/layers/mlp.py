"""Gated feed-forward layer (GeGLU, Shazeer 2020): the dense block and each expert."""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.matmul import weight_einsum
from gemini_mini.layers.param import fan_in_init, flatten_tokens, param


def gated_activation(gate_F: jax.Array, up_F: jax.Array) -> jax.Array:
  """``gelu(gate) * up``: the one nonlinearity shared by the dense MLP and the experts."""
  return jax.nn.gelu(gate_F, approximate=True) * up_F


class GatedMLP(nnx.Module):
  """``y = (gelu(x W_gate) * (x W_up)) W_down``.

  Shapes: ``x_BTD -> y_BTD`` (any leading axes); matmuls run in ``dtype`` with float32
  accumulation (``weight_einsum``; parameters stay float32).
  """

  def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.gate_DF = param(rngs, fan_in_init(d_model), (d_model, d_ff), ('embed', 'mlp'),
                         contract=('embed',))
    self.up_DF = param(rngs, fan_in_init(d_model), (d_model, d_ff), ('embed', 'mlp'),
                       contract=('embed',))
    self.down_FD = param(rngs, fan_in_init(d_ff), (d_ff, d_model), ('mlp', 'embed'),
                         contract=('mlp',))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_XD = flatten_tokens(x_BTD)
    gate_XF = weight_einsum('XD,DF->XF', x_XD, self.gate_DF[...], self.dtype)
    up_XF = weight_einsum('XD,DF->XF', x_XD, self.up_DF[...], self.dtype)
    hidden_XF = gated_activation(gate_XF, up_XF)
    y_XD = weight_einsum('XF,FD->XD', hidden_XF, self.down_FD[...], self.dtype)
    return y_XD.reshape(*x_BTD.shape[:-1], -1)
