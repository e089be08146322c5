"""Prefetch: the unwrapped iterator's batches in order, its state after the batches handed
out (so a resume is exact), errors raised where the batch would have been, a clean close."""

import json
import time

import pytest

from gemini_mini.data.prefetch import Prefetch
from test_mixture import assert_same, batches


def test_batches_are_the_unwrapped_iterators(small_data_dir):
  expected = batches(small_data_dir, 5)[0]
  _, source = batches(small_data_dir, 0)
  prefetched = Prefetch(source, depth=2)
  try:
    assert_same([next(prefetched) for _ in range(5)], expected)
  finally:
    prefetched.close()


def test_state_is_after_the_last_batch_handed_out(small_data_dir):
  uninterrupted = batches(small_data_dir, 8)[0]
  _, after_three = batches(small_data_dir, 3)
  _, source = batches(small_data_dir, 0)
  prefetched = Prefetch(source, depth=3)
  try:
    for _ in range(3):
      next(prefetched)
    while not prefetched._ready.full():  # the thread builds 3 batches more
      time.sleep(0.01)
    assert prefetched.get_state() == after_three.get_state()
    assert prefetched.position_shares() == after_three.position_shares()
    state = json.loads(json.dumps(prefetched.get_state()))
  finally:
    prefetched.close()
  assert_same(batches(small_data_dir, 5, state=state)[0], uninterrupted[3:])


class Counting:
  """Batches 1, 2, 3, ...; with ``fail_after``, an error after that many, like a Mixture
  meeting a corrupt record."""

  def __init__(self, fail_after: int | None = None):
    self.drawn, self.fail_after = 0, fail_after

  def __next__(self):
    if self.drawn == self.fail_after:
      raise OSError(f'record {self.drawn + 1} is corrupt')
    self.drawn += 1
    return self.drawn

  def get_state(self):
    return {'drawn': self.drawn}

  def position_shares(self):
    return {}


def test_an_error_is_raised_by_the_next_that_would_return_its_batch():
  prefetched = Prefetch(Counting(fail_after=2), depth=4)
  assert [next(prefetched), next(prefetched)] == [1, 2]
  assert prefetched.get_state() == {'drawn': 2}
  with pytest.raises(OSError, match='record 3 is corrupt'):
    next(prefetched)
  with pytest.raises(RuntimeError, match='closed'):
    next(prefetched)


def test_close_stops_the_thread_while_the_queue_is_full():
  prefetched = Prefetch(Counting(), depth=1)
  next(prefetched)
  prefetched.close()
  assert not prefetched._thread.is_alive()
  with pytest.raises(ValueError, match='depth must be >= 1'):
    Prefetch(Counting(), depth=0)
