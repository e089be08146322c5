"""Gated feed-forward layer (GeGLU or SwiGLU, Shazeer 2020): the dense block and each expert."""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.matmul import weight_einsum
from gemini_mini.layers.param import fan_in_init, flatten_tokens, param


# GeGLU (tanh-approximate GELU, as Gemma) is gemini_mini's own; SwiGLU (SiLU) is what the
# Mixtral family was trained with, so an imported checkpoint needs it.
ACTIVATIONS = {'gelu': lambda x: jax.nn.gelu(x, approximate=True), 'silu': jax.nn.silu}


def gated_activation(gate_F: jax.Array, up_F: jax.Array, activation: str = 'gelu') -> jax.Array:
  """``act(gate) * up``: the one nonlinearity shared by the dense MLP and the experts."""
  return ACTIVATIONS[activation](gate_F) * up_F


class GatedMLP(nnx.Module):
  """``y = (act(x W_gate) * (x W_up)) W_down``, ``act`` one of ``ACTIVATIONS``.

  Shapes: ``x_BTD -> y_BTD`` (any leading axes); matmuls run in ``dtype`` with float32
  accumulation (``weight_einsum``; parameters stay float32).
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str = 'gelu', dtype=jnp.float32,
               rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f'unknown activation {activation!r}; choose one of {tuple(ACTIVATIONS)}')
    self.activation = activation
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
    hidden_XF = gated_activation(gate_XF, up_XF, self.activation)
    y_XD = weight_einsum('XF,FD->XD', hidden_XF, self.down_FD[...], self.dtype)
    return y_XD.reshape(*x_BTD.shape[:-1], -1)
