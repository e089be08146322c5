"""A scalar read from each position's final hidden state: the reward model's score and PPO's
value estimate (``model.scalar_head``)."""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.param import param


class ScalarHead(nnx.Module):
  """``s_BT = x_BTD . w_D + b``, in float32.

  The weights start at zero, so a new head scores every response 0 and a new value head
  predicts 0: training starts from the fine-tuned decoder's behaviour, not from noise that the
  first updates must undo.
  """

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    self.w_D = param(rngs, nnx.initializers.zeros, (d_model,), ('embed',))
    self.b = param(rngs, nnx.initializers.zeros, (), ())

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return jnp.einsum('BTD,D->BT', x_BTD.astype(jnp.float32), self.w_D[...]) + self.b[...]
