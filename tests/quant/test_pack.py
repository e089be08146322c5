"""Tests for int4 nibble packing: every value and odd sizes round-trip."""

import numpy as np
import pytest

from gemini_mini.quant.pack import pack_int4, unpack_int4


@pytest.mark.parametrize('shape', [(16,), (3, 5), (1,), (2, 3, 7), (0,)])
def test_pack_then_unpack_gives_the_values_back(shape):
  q = np.random.default_rng(0).integers(-8, 8, shape).astype(np.int8)
  packed = pack_int4(q)
  assert packed.dtype == np.uint8 and packed.shape == ((q.size + 1) // 2,)
  np.testing.assert_array_equal(unpack_int4(packed, shape), q)


def test_every_int4_value_in_either_nibble_round_trips():
  q = np.arange(-8, 8, dtype=np.int8)
  for values in (q, q[::-1], np.append(q, np.int8(-8))):
    np.testing.assert_array_equal(unpack_int4(pack_int4(values), values.shape), values)


def test_low_nibble_holds_the_first_value():
  assert pack_int4(np.array([1, -1], np.int8))[0] == 0xF1


def test_out_of_range_values_and_wrong_byte_counts_are_refused():
  with pytest.raises(ValueError, match=r'\[-8, 7\]'):
    pack_int4(np.array([8], np.int8))
  with pytest.raises(ValueError, match='cannot hold'):
    unpack_int4(np.zeros(3, np.uint8), (7, 1))
