"""Rotary position embedding (Su et al. 2021), the "rotate halves" layout.

Each head vector is split into two halves ``(a, b)``; pair ``i`` is rotated by the angle
``position * max_wavelength ** (-2i / H)``. A query at position ``p`` and a key at ``q``
then have a dot product that depends only on ``p - q``.

``max_wavelength`` bounds how far attention can find a key by its content: see
``similar_token_reach``.
"""

import jax
import jax.numpy as jnp
import numpy as np


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


def similar_token_reach(head_dim: int, max_wavelength: float, limit: int) -> int:
  """The first distance ``m`` in ``[1, limit)`` at which RoPE no longer favours, on average, a
  key like the query over a random key; ``limit`` if there is none.

  For a query ``q`` with i.i.d. entries and a key ``q + noise`` at distance ``m``, the expected
  score margin over a random key is ``2 var(q) * sum_i cos(m * theta_i)``, ``theta_i =
  max_wavelength ** (-2i / H)`` (Men et al. 2024, "Base of RoPE bounds context length"). Where
  the sum is negative, matching content no longer finds the needle on average. It is not
  monotone in ``max_wavelength`` (a sum of cosines dips below zero here and there), so each
  wavelength is checked, not read off a curve (docs/retrieval.md#rope-wavelength).
  """
  theta_h = max_wavelength ** (-np.arange(0, head_dim, 2) / head_dim)
  for start in range(1, limit, 4096):  # chunks: [4096, H / 2] at a time, whatever the limit
    distance_S = np.arange(start, min(start + 4096, limit))  # S: key positions back
    margin_S = np.cos(distance_S[:, None] * theta_h).sum(axis=1)
    negative = np.flatnonzero(margin_S < 0)
    if negative.size:
      return int(distance_S[negative[0]])
  return limit
