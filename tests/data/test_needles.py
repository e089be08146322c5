"""Needles: values, keys by split, needles laid at their depths."""

import re

import numpy as np
import pytest
from helpers import longest_run

from gemini_mini.data import needles


def test_values_have_seven_digits_and_rarely_a_run():
  """Uniform values: seven digits, the first not 0; a run of 3 or more in about 4.6% of them
  (1 - P(no run of 3), counted exactly over the 9e6 values by a digit-by-digit recursion)."""
  rng = np.random.default_rng(0)
  values = [needles.draw_value(rng) for _ in range(20_000)]
  assert all(re.fullmatch(r'[1-9]\d{6}', value) for value in values)
  # P(no run of 3): states (last digit's run length 1 or 2), 9 first digits then 10 each.
  run1, run2 = 9.0, 0.0
  for _ in range(6):
    run1, run2 = 9 * (run1 + run2), run1
  share = 1 - (run1 + run2) / 9e6
  assert abs(share - 0.0457) < 1e-3
  assert abs(np.mean([longest_run(value) >= 3 for value in values]) - share) < 0.006


def test_keys_come_from_their_split_and_are_distinct():
  rng = np.random.default_rng(2)
  for split in ('train', 'eval'):
    keys = needles.draw_keys(rng, split, 50)
    assert len(set(keys)) == 50 and {needles.split_of(key) for key in keys} == {split}
  shares = np.mean([needles.split_of(f'{a}-{b}') == 'eval'
                    for a in needles.KEY_WORDS for b in needles.KEY_WORDS])
  assert abs(shares - needles.EVAL_PER_MILLE / 1000) < 0.01
  with pytest.raises(ValueError, match="'test' is unknown"):
    needles.draw_keys(rng, 'test', 1)


def test_hide_lays_each_needle_before_the_filler_token_at_its_depth():
  filler = np.arange(10, 20, dtype=np.int32)  # 10 tokens
  laid = needles.hide(filler, [np.array([1, 1]), np.array([2]), np.array([3])], [0.0, 0.55, 1.0])
  np.testing.assert_array_equal(laid, [1, 1, 10, 11, 12, 13, 14, 15, 2, 16, 17, 18, 19, 3])
  with pytest.raises(ValueError, match='depths in'):
    needles.hide(filler, [np.array([1])], [1.5])
