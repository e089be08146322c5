"""Repeat task: the span twice, drawn from the pool, reproducible, fitting its row."""

import numpy as np
import pytest

from gemini_mini.data import repeat
from gemini_mini.data.examples import Room
from gemini_mini.modalities.text import Tokenizer


@pytest.fixture(scope='module')
def tokenizer():
  return Tokenizer()


def no_records():
  raise AssertionError('the repeat task reads no dataset')


def example_ids(seed, tokenizer, positions=512):
  [segment] = repeat.repeat_example(no_records, tokenizer, np.random.default_rng(seed),
                                    Room(positions, 0, 0))
  return np.asarray(segment.data)


def test_the_span_comes_twice_after_the_prompt(tokenizer):
  prompt = list(tokenizer.encode('Repeat:'))
  pool = set(repeat.pool(tokenizer).tolist())
  lengths = set()
  for seed in range(100):
    ids = example_ids(seed, tokenizer)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert list(ids[1:1 + len(prompt)]) == prompt
    body = ids[1 + len(prompt):-1]
    half = len(body) // 2
    assert len(body) == 2 * half
    np.testing.assert_array_equal(body[:half], body[half:])
    assert set(body.tolist()) <= pool
    lengths.add(half)
  assert min(lengths) == repeat.MIN_SPAN and max(lengths) == repeat.MAX_SPAN


def test_pool_is_frequent_pieces_and_every_digit(tokenizer):
  pool = repeat.pool(tokenizer)
  assert len(pool) == len(set(pool.tolist())) <= repeat.POOL_SIZE + 10
  assert set(tokenizer.ordinary_ids[:repeat.POOL_SIZE]) <= set(pool.tolist())
  for digit in '0123456789':
    assert tokenizer.decode([int(i) for i in tokenizer.encode(digit)]) == digit
    assert set(tokenizer.encode(digit).tolist()) <= set(pool.tolist())


def test_same_seed_same_example_and_short_rows_are_respected(tokenizer):
  np.testing.assert_array_equal(example_ids(7, tokenizer), example_ids(7, tokenizer))
  assert not np.array_equal(example_ids(7, tokenizer), example_ids(8, tokenizer))
  for positions in (12, 20, 40):
    for seed in range(20):
      assert len(example_ids(seed, tokenizer, positions)) <= positions
