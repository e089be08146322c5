"""PairStream and PromptStream: the same prompt in both replies of a pair, labels from the
judge, pairs packed whole and in order, eval in order once, exact resume, process shards,
errors."""

import dataclasses
import json

import numpy as np
import pytest

from gemini_mini.batch import check_batch
from gemini_mini.data import post_training
from gemini_mini.data.mixture import DataError
from gemini_mini.data.preferences import PairStream, PromptStream
from gemini_mini.modalities import conversation, interleave
from gemini_mini.modalities.text import Tokenizer

SHAPES = dict(seq_len=512, num_patches=16, num_audio_frames=320, patch_dim=192, audio_dim=320)
TOKENIZER = Tokenizer()


def pairs(data_dir, split='preference', *, batch_size=4, label_noise=0.0, state=None, **kwargs):
  stream = PairStream(data_dir, split, batch_size=batch_size, **dict(SHAPES, **kwargs), seed=3,
                      label_noise=label_noise, subset='small')
  if state is not None:
    stream.set_state(state)
  return stream


def prompts(data_dir, split='preference', *, batch_size=4, **kwargs):
  return PromptStream(data_dir, split, batch_size=batch_size, seed=3, subset='small', **kwargs)


def fields(batch):
  return {field.name: np.asarray(getattr(batch, field.name)) for field in dataclasses.fields(batch)}


def assert_same(first, second):
  for a, b in zip(first, second):
    for name, value in fields(a).items():
      np.testing.assert_array_equal(value, fields(b)[name], err_msg=name)


def rows_of(batch):
  """Per row: (prompt ids up to <model>, reply text), or None for a padding row."""
  for row in range(batch.tokens.shape[0]):
    assert set(np.unique(batch.segment_ids[row])) <= {0, 1}
    yield segment(batch, row, 1)


def segment(batch, row, number):
  """(prompt ids up to <model>, reply text) of segment ``number`` of ``row``, or None."""
  used = batch.segment_ids[row] == number
  if not used.any():
    return None
  start = int(np.flatnonzero(used)[0])
  assert used[start:start + used.sum()].all()
  tokens = batch.tokens[row][used]
  model = int(np.nonzero(tokens == TOKENIZER.model_id)[0][0])
  expected = np.zeros(len(tokens))
  expected[model:-1] = 1  # the reply and its <end_of_turn> only
  np.testing.assert_array_equal(batch.loss_mask[row][used], expected)
  assert tokens[-1] == TOKENIZER.end_of_turn_id
  return tokens[:model + 1], TOKENIZER.decode(tokens[model + 1:-1])


def test_pairs_share_the_prompt_and_the_judge_chooses(small_data_dir):
  items = post_training.builder(small_data_dir, 'small').as_data_source('preference')
  by_reply = {(items[i].reference, items[i].rejected): items[i] for i in range(len(items))}
  stream = pairs(small_data_dir)
  for _ in range(3):
    chosen, rejected = next(stream)
    for batch in (chosen, rejected):
      check_batch(batch, vocab_size=TOKENIZER.vocab_size, patch_dim=192, audio_dim=320)
    np.testing.assert_array_equal(chosen.patches, rejected.patches)
    np.testing.assert_array_equal(chosen.audio, rejected.audio)
    for (prompt, good), (same_prompt, bad) in zip(rows_of(chosen), rows_of(rejected)):
      np.testing.assert_array_equal(prompt, same_prompt)
      item = by_reply[good, bad]  # chosen is the reference, judged better
      assert post_training.judge(item, good).score > post_training.judge(item, bad).score
      flat = interleave.flatten(conversation.prompt(item.user_segments(TOKENIZER), TOKENIZER),
                                TOKENIZER)
      np.testing.assert_array_equal(prompt, flat.tokens)
  flipped_chosen, flipped_rejected = next(pairs(small_data_dir, label_noise=1.0))
  first_chosen, first_rejected = next(pairs(small_data_dir))
  assert_same([flipped_chosen, flipped_rejected], [first_rejected, first_chosen])


def test_eval_is_read_in_order_once_with_padding_rows_at_the_end(small_data_dir):
  items = post_training.builder(small_data_dir, 'small').as_data_source('eval')
  replies = [row[1] if row else None for chosen, _ in pairs(small_data_dir, 'eval', batch_size=5)
             for row in rows_of(chosen)]
  assert len(replies) == -(-len(items) // 5) * 5
  assert replies[:len(items)] == [items[i].reference for i in range(len(items))]
  assert replies[len(items):] == [None] * (len(replies) - len(items))
  packed = pairs(small_data_dir, 'eval', batch_size=2, pairs_per_row=4)
  read = [item.index for _ in packed for row in packed.last_items for item in row]
  assert read == list(range(len(items)))
  listed = [item for batch in prompts(small_data_dir, 'eval', batch_size=5) for _, item in batch]
  assert [item.index for item in listed] == list(range(len(items)))


def need(item):
  """The (positions, patches, audio frames) a pair takes in each of its two rows."""
  user = item.user_segments(TOKENIZER)
  flats = [interleave.flatten(conversation.conversation(user, reply, TOKENIZER), TOKENIZER)
           for reply in (item.reference, item.rejected)]
  return np.array([max(len(flat.tokens) for flat in flats), len(flats[0].patches),
                   len(flats[0].audio)])


def test_packed_rows_hold_whole_pairs_in_the_order_and_no_row_could_take_the_next(
    small_data_dir):
  room = np.array([320, 32, 320])
  stream = pairs(small_data_dir, pairs_per_row=3, seq_len=320, num_patches=32,
                 num_audio_frames=320)
  order = []
  for _ in range(4):
    chosen, rejected = next(stream)
    assert len(stream.last_items) == 4
    for row, row_items in enumerate(stream.last_items):
      assert 1 <= len(row_items) <= 3
      for u, item in enumerate(row_items):
        (prompt, good), (same_prompt, bad) = (segment(batch, row, u + 1)
                                              for batch in (chosen, rejected))
        np.testing.assert_array_equal(prompt, same_prompt)
        assert (good, bad) == (item.reference, item.rejected)  # no label noise here
      assert segment(chosen, row, len(row_items) + 1) is None
      assert (sum(need(item) for item in row_items) <= room).all()
      if row + 1 < 4:  # greedy: the next row's first pair did not fit, or the row was full
        with_next = sum(need(item) for item in row_items) + need(stream.last_items[row + 1][0])
        assert len(row_items) == 3 or (with_next > room).any()
      order.extend(item.index for item in row_items)
  assert max(len(row) for row in stream.last_items) > 1  # packing happened
  unpacked = pairs(small_data_dir, batch_size=1)
  assert order == [next(unpacked) and unpacked.last_items[0][0].index for _ in order]


@pytest.mark.parametrize('pairs_per_row', [1, 3])
def test_resume_is_exact_and_shards_make_the_global_batch(small_data_dir, pairs_per_row):
  stream = pairs(small_data_dir, pairs_per_row=pairs_per_row)
  straight = [next(stream) for _ in range(4)]
  stopped = pairs(small_data_dir, pairs_per_row=pairs_per_row)
  for _ in range(2):
    next(stopped)
  resumed = pairs(small_data_dir, pairs_per_row=pairs_per_row,
                  state=json.loads(json.dumps(stopped.get_state())))
  for step in (2, 3):
    assert_same(next(resumed), straight[step])
  shards = [PairStream(small_data_dir, 'preference', batch_size=4, **SHAPES, seed=3,
                       label_noise=0.0, pairs_per_row=pairs_per_row, subset='small',
                       process_index=p, process_count=2)
            for p in range(2)]
  for step in range(2):
    parts = [next(shard) for shard in shards]
    for which in range(2):
      glued = {name: np.concatenate([fields(part[which])[name] for part in parts])
               for name in fields(straight[step][which])}
      for name, value in fields(straight[step][which]).items():
        np.testing.assert_array_equal(glued[name], value)
  stream = prompts(small_data_dir)
  straight = [[item.index for _, item in next(stream)] for _ in range(3)]
  again = prompts(small_data_dir)
  next(again)
  resumed = prompts(small_data_dir)
  resumed.set_state(json.loads(json.dumps(again.get_state())))
  assert [[item.index for _, item in next(resumed)] for _ in range(2)] == straight[1:]


def test_prompts_are_the_pairs_items_up_to_the_model_turn(small_data_dir):
  chosen, _ = next(pairs(small_data_dir))
  batch = next(prompts(small_data_dir))
  assert len(batch) == 4
  for (segments, item), (prompt_ids, reply) in zip(batch, rows_of(chosen)):
    flat = interleave.flatten(segments, TOKENIZER)
    assert flat.tokens[:2].tolist() == [TOKENIZER.bos_id, TOKENIZER.user_id]
    assert flat.tokens[-2:].tolist() == [TOKENIZER.end_of_turn_id, TOKENIZER.model_id]
    assert not flat.scored.any()
    np.testing.assert_array_equal(flat.tokens, prompt_ids)  # the same item, the same order
    assert reply == item.reference


def test_bad_settings_are_named(small_data_dir, tmp_path):
  with pytest.raises(DataError, match='raise train.seq_len'):
    for _ in pairs(small_data_dir, 'eval', seq_len=24):
      pass
  with pytest.raises(DataError, match="split 'train' is not a post-training split"):
    pairs(small_data_dir, 'train')
  with pytest.raises(DataError, match='post.label_noise'):
    pairs(small_data_dir, label_noise=2.0)
  with pytest.raises(DataError, match='post.pairs_per_row'):
    pairs(small_data_dir, pairs_per_row=0)
  with pytest.raises(DataError, match='gemini_mini.data.prepare --subset small'):
    pairs(str(tmp_path))
  with pytest.raises(DataError, match='"label_noise": \\[0.0, 0.1\\]'):
    pairs(small_data_dir, label_noise=0.1, state=pairs(small_data_dir).get_state())
  with pytest.raises(DataError, match='"stream"'):
    prompts(small_data_dir).set_state(pairs(small_data_dir).get_state())
