"""Round-to-nearest quantization of one weight, and where its scales go.

A weight's group runs along its contraction axes flattened row-major (``o_NHD``'s ``N`` and
``H``: a group of ``H`` is one head, of ``2H`` two heads). ``qwix`` describes scales per axis,
so the group maps onto its axes walking the contraction axes from the last: an axis smaller
than what remains of the group lies whole inside each group (its scale axis has size 1), the
first that does not is tiled by what remains, and every other axis, output or leading
(experts, scanned layers) or an outer contraction axis, has a scale per index.

Symmetric integers: ``scale = absmax / B`` per group, ``q = round(w / scale)`` clipped to the
type's range, with qwix's bound ``B = qmax + 1/2`` (7.5 for int4, 127.5 for int8) so that the
top bucket is a whole one: ``|w - scale * q| <= scale / 2`` for every entry, the clipped
extreme ``B * scale`` included.
"""

import math

import jax
import jax.numpy as jnp
import qwix

QTYPES = {4: jnp.int4, 8: jnp.int8}


def qtype(bits: int):
  if bits not in QTYPES:
    raise ValueError(f'cannot quantize to {bits} bits; choose one of {sorted(QTYPES)}')
  return QTYPES[bits]


def tiling(shape, axes, contract, group: int, name: str) -> tuple[tuple[int, ...], dict]:
  """``(channelwise_axes, tiled_axes)`` for ``qwix.quantize`` of a weight of ``shape`` with
  logical ``axes``, grouped by ``group`` along its ``contract`` axes.

  Raises:
    ValueError: ``group`` does not tile the contraction axes; names the groups that do.
  """
  found = _tiling(shape, [axes.index(a) for a in contract], group)
  if found is None:
    size = math.prod(shape[axes.index(a)] for a in contract)
    works = [g for g in range(8, size + 1) if _tiling(shape, [axes.index(a) for a in contract], g)]
    raise ValueError(f'{name}: a group of {group} does not divide its contraction {contract} '
                     f'of size {size}; choose a group among {works}')
  return found


def _tiling(shape, contract_axes, group):
  remaining, tiled, whole = group, {}, set()
  for axis in reversed(contract_axes):
    if shape[axis] < remaining:
      whole.add(axis)
      remaining, left = divmod(remaining, shape[axis])
      if left:
        return None
    elif shape[axis] % remaining:
      return None
    else:
      tiled[axis] = remaining
      break
  else:
    return None
  return tuple(a for a in range(len(shape)) if a not in tiled and a not in whole), tiled


def scale_shape(shape, axes, contract, group: int, name: str) -> tuple[int, ...]:
  """The shape of the scales of a weight (``QArray.scale``), the same for every method."""
  channelwise, tiled = tiling(shape, axes, contract, group, name)
  return tuple(n if a in channelwise else n // tiled[a] if a in tiled else 1
               for a, n in enumerate(shape))


def quantize(w: jax.Array, bits: int, group: int, axes, contract, name: str) -> qwix.QArray:
  """``w`` rounded to the nearest integer of ``bits`` bits in scale units, per group."""
  channelwise, tiled = tiling(w.shape, axes, contract, group, name)
  return qwix.quantize(w, qtype(bits), channelwise_axes=channelwise, tiled_axes=tiled)
