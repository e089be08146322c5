"""TextBatches: the batch contract, exact resume, and process shards of one global batch."""

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest

from gemini_mini.batch import check_batch
from gemini_mini.data import text_corpus
from gemini_mini.data.text_batches import DataError, TextBatches
from gemini_mini.modalities.text import Tokenizer

SHAPES = dict(num_patches=4, num_audio_frames=3, patch_dim=192, audio_dim=320)
BATCH, SEQ_LEN = 8, 128


def batches(data_dir, count, *, split='train', seed=0, process_index=0, process_count=1,
            state=None, batch_size=BATCH, seq_len=SEQ_LEN):
  iterator = TextBatches(data_dir, split, batch_size, seq_len, seed, process_index,
                         process_count, **SHAPES, subset='small')
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(count)], iterator


def assert_same(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    for field in dataclasses.fields(a):
      np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))


def concat(parts):
  return type(parts[0])(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(parts[0])})


def test_batches_honour_the_contract_and_never_leak(small_data_dir):
  tokenizer = Tokenizer()
  for batch in batches(small_data_dir, 6)[0]:
    check_batch(batch, vocab_size=tokenizer.vocab_size, patch_dim=192, audio_dim=320)
    assert batch.tokens.shape == (BATCH, SEQ_LEN) and batch.patches.shape == (BATCH, 4, 192)
    assert batch.audio.shape == (BATCH, 3, 320) and (batch.segment_ids > 0).all()
    # bos only opens a segment, eos only closes one: no document runs into another.
    assert (batch.positions[batch.tokens == tokenizer.bos_id] == 0).all()
    last = np.ones_like(batch.loss_mask, bool)
    last[:, :-1] = batch.segment_ids[:, 1:] != batch.segment_ids[:, :-1]
    assert last[batch.tokens == tokenizer.eos_id].all()
    np.testing.assert_array_equal(batch.loss_mask, ~last)


def test_deterministic_for_a_seed(small_data_dir):
  assert_same(batches(small_data_dir, 3)[0], batches(small_data_dir, 3)[0])
  assert not np.array_equal(batches(small_data_dir, 1)[0][0].tokens,
                            batches(small_data_dir, 1, seed=1)[0][0].tokens)


def test_resume_is_exact(small_data_dir):
  uninterrupted = batches(small_data_dir, 12)[0]
  _, stopped = batches(small_data_dir, 7)
  state = json.loads(json.dumps(stopped.get_state()))
  assert_same(batches(small_data_dir, 5, state=state)[0], uninterrupted[7:])


def test_process_shards_are_the_global_batch(small_data_dir):
  global_batches, global_iterator = batches(small_data_dir, 4)
  for process_count in (2, 4):
    shards = [batches(small_data_dir, 4, process_index=p, process_count=process_count)
              for p in range(process_count)]
    for step in range(4):
      parts = [shard_batches[step] for shard_batches, _ in shards]
      assert all(part.tokens.shape[0] == BATCH // process_count for part in parts)
      assert_same([concat(parts)], [global_batches[step]])
    # The processes' states merged restore a single process (a different process count).
    merged = dict(shards[0][1].get_state(),
                  rows=[row for _, it in shards for row in it.get_state()['rows']])
    assert merged == global_iterator.get_state()
    assert_same(batches(small_data_dir, 2, state=merged)[0], batches(small_data_dir, 6)[0][4:])


def test_rows_read_disjoint_documents(small_data_dir):
  bos = Tokenizer().bos_id
  starts = [set() for _ in range(BATCH)]  # per row, the first tokens of each document begun
  for batch in batches(small_data_dir, 4, split='eval')[0]:
    for row, column in zip(*np.nonzero(batch.tokens == bos)):
      segment = batch.segment_ids[row] == batch.segment_ids[row, column]
      starts[row].add(tuple(batch.tokens[row][segment][:12]))
  assert sum(map(len, starts)) == len(set().union(*starts)) > 2 * BATCH


def test_long_documents_run_down_one_row(small_data_dir):
  tokenizer = Tokenizer()
  builder = text_corpus.builder(small_data_dir, 'small')
  texts = [example['text'].decode() for example in builder.as_data_source('long')]
  steps = 5
  got, _ = batches(small_data_dir, steps, split='long', batch_size=2, seq_len=64)
  for row in range(2):
    tokens = np.concatenate([batch.tokens[row] for batch in got])
    assert all((batch.segment_ids[row] == 1).all() for batch in got)      # one piece a row
    assert all((batch.positions[row] == np.arange(64)).all() for batch in got)  # from 0
    assert tokens[0] == tokenizer.bos_id
    assert any(text.startswith(tokenizer.decode(tokens[1:])) for text in texts)


def test_bad_arguments_and_states_are_named(small_data_dir):
  with pytest.raises(DataError, match='divisible by the process count'):
    batches(small_data_dir, 1, process_count=3)
  with pytest.raises(DataError, match="split 'test'"):
    batches(small_data_dir, 1, split='test')
  _, iterator = batches(small_data_dir, 1)
  with pytest.raises(DataError, match='"seq_len": \\[128, 64\\]'):
    batches(small_data_dir, 1, seq_len=64, state=iterator.get_state())
  with pytest.raises(DataError, match='no cursor for rows'):
    batches(small_data_dir, 1, state=dict(iterator.get_state(), rows=[]))


def test_corrupt_prepared_data_names_the_fix(small_data_dir, tmp_path):
  copy = tmp_path / 'data'
  shutil.copytree(small_data_dir, copy)
  shard, = pathlib.Path(copy).glob('text_corpus/small/*/text_corpus-train.array_record-*')
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
  with pytest.raises(DataError, match='cannot be read .*delete that directory and rebuild'):
    batches(str(copy), 1)


def test_unprepared_data_names_the_command(tmp_path):
  with pytest.raises(DataError, match='gemini_mini.data.prepare --subset small'):
    batches(str(tmp_path), 1)
