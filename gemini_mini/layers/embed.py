"""Embedders: text tokens (with the output head) and continuous features (image patches,
audio frames) mapped into the model width."""

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_mini.layers.matmul import weight_einsum
from gemini_mini.layers.mlp import GatedMLP
from gemini_mini.layers.norm import RMSNorm
from gemini_mini.layers.param import fan_in_init, flatten_tokens, param


class TokenEmbed(nnx.Module):
  """Token ids to vectors (``embed``) and vectors to vocabulary logits (``logits``).

  With ``tied`` the output head is the input table itself, scaled by ``D ** -0.5`` so logits
  start at unit scale: ``logits = x @ E.T / sqrt(D)`` (``scale_tied=False`` drops the scale,
  as Hugging Face's tied heads do). Copying a token from the context then
  needs one map shared by the whole vocabulary (attention's value-output product near the
  identity), where untied matrices need each token's two vectors aligned one by one, which
  rare tokens seldom train (docs/retrieval.md#the-copy-circuit). Logits are float32 for a
  stable softmax.
  """

  def __init__(self, vocab_size: int, d_model: int, *, tied: bool = False,
               scale_tied: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.tied_scale = d_model ** -0.5 if scale_tied else 1.0
    self.embedding_VD = param(rngs, nnx.initializers.normal(1.0), (vocab_size, d_model),
                              ('vocab', 'embed'))
    if not tied:
      self.unembedding_DV = param(rngs, fan_in_init(d_model), (d_model, vocab_size),
                                  ('embed', 'vocab'))

  @property
  def tied(self) -> bool:
    return not hasattr(self, 'unembedding_DV')

  def embed(self, tokens_BT: jax.Array) -> jax.Array:
    """``tokens_BT`` int -> ``x_BTD`` in ``dtype``."""
    return jnp.take(self.embedding_VD[...], tokens_BT, axis=0).astype(self.dtype)

  def logits(self, x_BTD: jax.Array) -> jax.Array:
    """``x_BTD`` -> ``logits_BTV`` float32."""
    x_XD = flatten_tokens(x_BTD)
    if self.tied:
      logits_XV = weight_einsum('XD,VD->XV', x_XD * self.tied_scale, self.embedding_VD[...],
                                self.dtype, out_dtype=jnp.float32)
    else:
      logits_XV = weight_einsum('XD,DV->XV', x_XD, self.unembedding_DV[...], self.dtype,
                                out_dtype=jnp.float32)
    return logits_XV.reshape(*x_BTD.shape[:-1], -1)


class FeatureEmbed(nnx.Module):
  """A small encoder for one continuous modality: ``x_BPI -> y_BPD``.

  A linear projection from the feature width ``I`` (a flattened image patch, a stack of
  log-mel frames), then a residual gated MLP and an RMSNorm so the result has the scale of a
  token embedding. ``P`` is the item axis: image patches, or audio frames (``A``).
  """

  def __init__(self, in_dim: int, d_model: int, d_ff: int, *, activation: str = 'gelu',
               norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.proj_ID = param(rngs, fan_in_init(in_dim), (in_dim, d_model), ('features', 'embed'),
                         contract=('features',))
    self.mlp = GatedMLP(d_model, d_ff, activation=activation, dtype=dtype, rngs=rngs)
    self.norm = RMSNorm(d_model, eps=norm_eps, rngs=rngs)

  def __call__(self, x_BPI: jax.Array) -> jax.Array:
    h_XD = weight_einsum('XI,ID->XD', flatten_tokens(x_BPI), self.proj_ID[...], self.dtype)
    h_BPD = h_XD.reshape(*x_BPI.shape[:-1], -1)
    return self.norm(h_BPD + self.mlp(h_BPD))
