"""Repeat task: the span twice, only its predictable pieces in the loss, from the pool,
fitting its row."""

import numpy as np
import pytest
from helpers import longest_run

from gemini_mini.data import repeat
from gemini_mini.data.examples import Room
from gemini_mini.modalities import interleave
from gemini_mini.modalities.text import Tokenizer


@pytest.fixture(scope='module')
def tokenizer():
  return Tokenizer()


def no_records():
  raise AssertionError('the repeat task reads no dataset')


def example(seed, tokenizer, positions=512):
  return repeat.repeat_example(no_records, tokenizer, np.random.default_rng(seed),
                               Room(positions, 0, 0))


def test_the_span_comes_twice_after_the_prompt(tokenizer):
  pool = set(repeat.pool(tokenizer).tolist())
  lengths = set()
  for seed in range(100):
    prompt, first, second, end = example(seed, tokenizer)
    np.testing.assert_array_equal(
        prompt.data, np.concatenate([[tokenizer.bos_id], tokenizer.encode('Repeat:')]))
    span = first.data[:-1]
    np.testing.assert_array_equal(np.concatenate([first.data, second.data]),
                                  np.concatenate([span, span]))
    np.testing.assert_array_equal(end.data, [tokenizer.eos_id])
    assert set(span.tolist()) <= pool
    lengths.add(len(span))
  assert min(lengths) == repeat.MIN_SPAN and max(lengths) == repeat.MAX_SPAN


def test_only_the_prompt_and_the_second_copy_after_its_first_piece_are_in_the_loss(tokenizer):
  segments = example(3, tokenizer)
  flat = interleave.flatten(segments, tokenizer)
  prompt, span = len(segments[0].data), len(segments[1].data) - 1
  batch, _ = interleave.pack_examples([flat], batch_size=1, seq_len=len(flat.tokens) + 3,
                                      num_patches=1, num_audio_frames=1, patch_dim=4,
                                      audio_dim=4)
  # Position p predicts token p + 1. Tokens: prompt, span, span, eos (hand-counted indices).
  targets_in_loss = np.nonzero(batch.loss_mask[0])[0] + 1
  second_copy_after_its_first = range(prompt + span + 1, prompt + 2 * span)
  assert set(targets_in_loss) == set(range(1, prompt)) | set(second_copy_after_its_first)
  assert flat.tokens[prompt + 2 * span] == tokenizer.eos_id
  np.testing.assert_array_equal(flat.tokens[second_copy_after_its_first],
                                flat.tokens[prompt + 1:prompt + span])


def test_pool_is_frequent_pieces_and_every_digit(tokenizer):
  pool = repeat.pool(tokenizer)
  assert len(pool) == len(set(pool.tolist())) <= repeat.POOL_SIZE + 10
  assert set(tokenizer.ordinary_ids[:repeat.POOL_SIZE]) <= set(pool.tolist())
  for digit in '0123456789':
    assert tokenizer.decode([int(i) for i in tokenizer.encode(digit)]) == digit
    assert set(tokenizer.encode(digit).tolist()) <= set(pool.tolist())


def test_same_seed_same_example_and_short_rows_are_respected(tokenizer):
  ids = lambda seed, positions=512: interleave.flatten(
      example(seed, tokenizer, positions), tokenizer).tokens
  np.testing.assert_array_equal(ids(7), ids(7))
  assert not np.array_equal(ids(7), ids(8))
  for positions in (12, 20, 40):
    for seed in range(20):
      assert len(ids(seed, positions)) <= positions


def test_half_the_spans_hold_a_run_of_three_to_five(tokenizer):
  """Spans of 74 distinct pieces drawn uniformly hold a run of 3 by chance in under 1% of
  examples; ``RUN_SHARE`` of them get one laid in."""
  runs = [longest_run(example(seed, tokenizer)[1].data[:-1].tolist()) for seed in range(600)]
  assert abs(np.mean([run >= 3 for run in runs]) - repeat.RUN_SHARE) < 0.07
  assert {3, 4, 5} <= set(runs)


def test_lay_run_repeats_one_piece_in_place_and_keeps_the_rest():
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(200):
    span = np.arange(10, 22)  # piece 10 + i at place i
    repeat.lay_run(span, rng)
    changed = np.nonzero(span != np.arange(10, 22))[0]
    assert len(changed)
    start = span[changed[0]] - 10  # the place of the piece the run repeats
    # The laid run: the piece at its start, then RUN_LENGTHS - 1 more copies of it.
    assert np.all(span[changed] == span[start])
    length = changed[-1] - start + 1
    assert repeat.RUN_LENGTHS[0] <= length <= repeat.RUN_LENGTHS[1]
    np.testing.assert_array_equal(span[start:start + length], np.full(length, 10 + start))
    kept = np.setdiff1d(np.arange(12), np.arange(start, start + length))
    np.testing.assert_array_equal(span[kept], 10 + kept)
    seen.add((start, length))
  assert {start for start, _ in seen} == set(range(12 - 3 + 1))  # every place a run fits
  short = np.array([5, 6])
  repeat.lay_run(short, rng)
  np.testing.assert_array_equal(short, [5, 5])  # a run as long as the span allows
