"""Two int4 values per byte, for quantized checkpoints: numpy, nothing traced.

Element ``2i`` goes in the low nibble of byte ``i``, element ``2i + 1`` in the high one
(row-major order); an odd count pads the last high nibble with 0.
"""

import math

import numpy as np


def pack_int4(q: np.ndarray) -> np.ndarray:
  """``uint8[ceil(q.size / 2)]`` holding ``q``'s values in ``[-8, 7]`` as 4-bit two's
  complement."""
  q = np.asarray(q)
  if q.size and (q.min() < -8 or q.max() > 7):
    raise ValueError(f'int4 values lie in [-8, 7], got [{q.min()}, {q.max()}]; quantize '
                     'with 4 bits before packing')
  nibbles = (q.astype(np.int8).ravel() & 0xF).astype(np.uint8)
  if nibbles.size % 2:
    nibbles = np.append(nibbles, np.uint8(0))
  return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The ``int8`` array of ``shape`` that ``pack_int4`` packed into ``packed``."""
  size = math.prod(shape)
  if packed.shape != ((size + 1) // 2,):
    raise ValueError(f'{packed.shape} bytes cannot hold int4 values of shape {shape}; '
                     f'expected ({(size + 1) // 2},)')
  nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).ravel()[:size].astype(np.int8)
  return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)
