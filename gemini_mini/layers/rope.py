"""Rotary position embedding (Su et al. 2021), the "rotate halves" layout.

Each head vector is split into two halves ``(a, b)``; pair ``i`` is rotated by the angle
``position * max_wavelength ** (-2i / H)``. A query at position ``p`` and a key at ``q``
then have a dot product that depends only on ``p - q``.
"""

import jax
import jax.numpy as jnp


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, max_wavelength: float) -> jax.Array:
  """Rotates ``x_BTNH`` (any number of heads, even H) by its token positions.

  Works for queries ``[B, T, N, H]`` and keys ``[B, S, K, H]`` alike. Computed in float32,
  returned in the input dtype.
  """
  head_dim = x_BTNH.shape[-1]
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head dim, got {head_dim}')
  half = head_dim // 2
  inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angle_BTh)[:, :, None, :]
  cos = jnp.cos(angle_BTh)[:, :, None, :]
  a, b = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)
