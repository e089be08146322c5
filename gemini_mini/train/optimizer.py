"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax)."""

import jax
import optax
from flax import nnx


def _is_matrix(variable) -> bool:
  names = ()
  if isinstance(variable, nnx.Variable):
    names = tuple(variable.get_metadata().get('out_sharding') or ())
  return variable.ndim - (names[:1] == ('layers',)) > 1


def learning_rate_schedule(peak: float, steps: int, warmup_steps: int) -> optax.Schedule:
  """``peak / warmup_steps`` up to ``peak`` linearly over ``warmup_steps`` (so step 0 already
  learns), then cosine down to ``peak / 10`` at ``steps``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / max(warmup_steps, 1), peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(steps, warmup_steps + 1), end_value=peak / 10)


def make_optimizer(*, learning_rate: float, steps: int, warmup_steps: int, weight_decay: float,
                   grad_clip: float, b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
  """Weight decay applies to matrices only, not to norm scales (a scanned model's leading
  ``'layers'`` axis does not make a vector a matrix)."""
  decay_mask = lambda params: jax.tree.map(_is_matrix, params,
                                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  return optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(learning_rate_schedule(learning_rate, steps, warmup_steps), b1=b1, b2=b2,
                  weight_decay=weight_decay, mask=decay_mask))
