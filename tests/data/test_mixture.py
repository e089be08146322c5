"""Mixture: the batch contract, whole examples aligned with their images and audio, task
weights, exact resume, process shards of one global batch, skips and errors."""

import dataclasses
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from gemini_mini.batch import Modality, check_batch
from gemini_mini.data import (arithmetic, examples, image_caption, mixture, needles,
                              post_training, tasks, text_corpus, video_clips)
from gemini_mini.data.mixture import DataError, Mixture
from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities.text import Tokenizer

SHAPES = dict(num_patches=96, num_audio_frames=128, patch_dim=192, audio_dim=320)
BATCH, SEQ_LEN = 4, 384
WORD_BOX_TOP = video_clips.WORD_BOX[1]
WEIGHTS = {'text': 0.3, 'caption': 0.15, 'speech': 0.15, 'video': 0.15, 'haystack': 0.15,
           'arithmetic': 0.1, 'repeat': 0.1}


def batches(data_dir, count, *, split='train', seed=0, process_index=0, process_count=1,
            state=None, batch_size=BATCH, seq_len=SEQ_LEN, weights=None, shapes=None):
  iterator = Mixture(data_dir, split, WEIGHTS if weights is None else weights,
                     batch_size=batch_size, seq_len=seq_len, seed=seed,
                     **(shapes or SHAPES), subset='small', process_index=process_index,
                     process_count=process_count)
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


def segments_of(batch, row):
  """``(tokens, modality, patch rows, audio rows)`` of each segment of ``row``, in order."""
  patches_used = audio_used = 0
  for segment in range(1, batch.segment_ids[row].max() + 1):
    where = batch.segment_ids[row] == segment
    modality = batch.modality[row][where]
    num_patches = int((modality == Modality.IMAGE).sum())
    num_audio = int((modality == Modality.AUDIO).sum())
    yield (batch.tokens[row][where], modality,
           batch.patches[row][patches_used:patches_used + num_patches],
           batch.audio[row][audio_used:audio_used + num_audio])
    patches_used += num_patches
    audio_used += num_audio


def test_batches_honour_the_contract_and_hold_whole_examples(small_data_dir):
  tokenizer = Tokenizer()
  captions = image_caption.builder(small_data_dir, 'small').as_data_source('train')
  images_by_caption = {}
  for record in captions:
    images_by_caption.setdefault(record['caption'].decode(), []).append(
        image_lib.patchify(record['image']))
  time_stamps = np.array([tokenizer.time_stamp_id(t) for t in range(64)])
  seen = set()
  for batch in batches(small_data_dir, 6)[0]:
    check_batch(batch, vocab_size=tokenizer.vocab_size, patch_dim=192, audio_dim=320)
    assert batch.tokens.shape == (BATCH, SEQ_LEN) and batch.patches.shape == (BATCH, 96, 192)
    assert batch.audio.shape == (BATCH, 128, 320)
    # bos only opens a segment, eos only closes one: no example runs into another.
    assert (batch.positions[batch.tokens == tokenizer.bos_id] == 0).all()
    last = np.ones_like(batch.loss_mask, bool)
    last[:, :-1] = batch.segment_ids[:, 1:] != batch.segment_ids[:, :-1]
    assert last[batch.tokens == tokenizer.eos_id].all()
    next_is_text = np.append(batch.modality[:, 1:] == Modality.TEXT, np.zeros((BATCH, 1), bool),
                             axis=1)
    expected_loss_mask = ~last & next_is_text & (batch.segment_ids > 0)
    for row in range(BATCH):
      for segment, (tokens, modality, patches, audio) in enumerate(segments_of(batch, row), 1):
        text = tokenizer.decode(tokens[modality == Modality.TEXT])
        if tokens[0] != tokenizer.bos_id:
          continue  # the rest of a document cut in an earlier batch
        if tokenizer.begin_video_id in tokens:
          kind = 'video'
          seconds = int((tokens == tokenizer.begin_image_id).sum())
          assert text.startswith('Word: ') and len(patches) == 16 * seconds
          # The answer's time stamp names the one frame showing the word (its white box).
          second = int(np.nonzero(time_stamps == tokens[-2])[0][0])
          box_rows = [image_lib.unpatchify(patches[16 * t:16 * (t + 1)])[WORD_BOX_TOP]
                      for t in range(seconds)]
          assert [t for t, rows in enumerate(box_rows) if (rows > 0.95).all()] == [second]
        elif 'Question: What is the special magic number for' in text:
          kind = 'haystack'
          # Every needle is asked about once, each answer is its needle's value.
          asked = re.findall(r'for (\S+)\?\nAnswer: The special magic number for \1 is (\d+)',
                             text)
          hidden = re.findall(r'The special magic number for (\S+) is (\d+)\.', text)
          assert sorted(asked) == sorted(hidden) and len({key for key, _ in hidden}) == len(hidden)
          assert text.endswith(f'{asked[-1][0]} is {asked[-1][1]}')
          assert tokens[-1] == tokenizer.eos_id
        elif text.startswith('Question: ') and 'The answer is' in text:
          kind = 'arithmetic'
          problem = re.fullmatch(r'Question: (.*) = \?\nAnswer: .*', text, re.DOTALL).group(1)
          assert arithmetic.parse_answer(text) == eval(problem)  # noqa: S307 (digits, + and -)
        elif text.startswith('Repeat:'):
          kind = 'repeat'
          prompt = 1 + len(tokenizer.encode('Repeat:'))
          span = tokens[prompt:-1]
          np.testing.assert_array_equal(span[:len(span) // 2], span[len(span) // 2:])
          # Neither the first copy, nor the second's first piece, nor <eos> is a target in
          # the loss (loss_mask[p] scores token p + 1).
          start = int(np.nonzero(batch.segment_ids[row] == segment)[0][0]) + prompt
          expected_loss_mask[row, start - 1:start + len(span) // 2] = False
          expected_loss_mask[row, start + len(span) - 1] = False
        elif tokenizer.begin_image_id in tokens:
          kind = 'caption'
          caption = text.removeprefix('Caption: ')
          assert text.startswith('Caption: ') and caption in images_by_caption
          assert any(np.array_equal(patches, image) for image in images_by_caption[caption])
        elif tokenizer.begin_audio_id in tokens:
          kind = 'speech'
          assert text.startswith('Transcript: ') and len(audio) == (modality == Modality.AUDIO).sum() > 0
          assert np.isfinite(audio).all() and audio.std() > 0.1
        else:
          kind = 'text'
          assert (modality == Modality.TEXT).all()
        if kind != 'text':
          assert tokens[-1] == tokenizer.eos_id  # whole
        seen.add(kind)
    np.testing.assert_array_equal(batch.loss_mask, expected_loss_mask)
  assert seen == set(WEIGHTS)


def test_log_uniform_draws_as_many_in_each_octave():
  rng = np.random.default_rng(0)
  draws = np.array([examples.log_uniform(rng, 256, 2047) for _ in range(3000)])
  assert draws.min() >= 256 and draws.max() <= 2047
  shares = np.histogram(draws, bins=[256, 512, 1024, 2048])[0] / len(draws)
  np.testing.assert_allclose(shares, 1 / 3, atol=0.04)  # uniform: 14%, 29%, 57%
  assert {examples.log_uniform(rng, 7, 8) for _ in range(50)} == {7, 8}  # both ends
  assert examples.log_uniform(rng, 7, 7) == 7


@pytest.fixture
def constant_filler(monkeypatch):
  """Haystack filler of ``the`` repeated, so haystack examples need no documents."""
  monkeypatch.setattr(tasks, 'filler', lambda next_record, tokenizer, length: np.full(
      length, int(tokenizer.encode('the')[0]), np.int32))


def test_haystack_lengths_are_log_uniform(constant_filler):
  """As many haystacks of 256-512 positions as of 512-1,024 and of 1,024-2,048 (uniform
  lengths would give 14%, 29% and 57%), none longer than the row."""
  tokenizer = Tokenizer()
  lengths = np.array([sum(len(segment.data) for segment in tasks.haystack_example(
      None, tokenizer, np.random.default_rng([5, i]), tasks.Room(2048, 1, 1)))
      for i in range(600)])
  assert lengths.min() >= 256 and lengths.max() <= 2048
  shares = np.histogram(lengths, bins=[256, 512, 1024, 2049])[0] / len(lengths)
  np.testing.assert_allclose(shares, 1 / 3, atol=0.06)


def test_haystack_needle_depths_are_arcsine(constant_filler, monkeypatch):
  """Needle depths follow Beta(1/2, 1/2), whose CDF is (2 / pi) asin(sqrt(x)): a fifth of
  the needles in each outer tenth of the filler, where uniform depths put a tenth."""
  tokenizer = Tokenizer()
  depths, hide = [], needles.hide

  def recording_hide(filler_ids, needle_ids, needle_depths):
    depths.extend(needle_depths)
    return hide(filler_ids, needle_ids, needle_depths)

  monkeypatch.setattr(needles, 'hide', recording_hide)
  for i in range(500):
    tasks.haystack_example(None, tokenizer, np.random.default_rng([6, i]), tasks.Room(2048, 1, 1))
  depths = np.array(depths)
  assert len(depths) > 2000 and depths.min() >= 0 and depths.max() <= 1
  for x in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98):
    assert abs(np.mean(depths < x) - 2 / np.pi * np.arcsin(np.sqrt(x))) < 0.03, x
  assert abs(np.mean(depths < 0.1) - 0.205) < 0.03 and abs(np.mean(depths > 0.9) - 0.205) < 0.03


def test_task_shares_follow_the_weights(small_data_dir):
  # These tasks read one record per example, so the state's record counts count examples.
  weights = {'text': 0.1, 'caption': 0.6, 'speech': 0.3}
  _, iterator = batches(small_data_dir, 16, weights=weights, batch_size=8)
  state = iterator.get_state()
  counts = np.sum([row[3:] for row in state['rows']], axis=0)
  assert state['tasks'] == list(weights)
  assert counts.sum() == sum(row[1] for row in state['rows']) > 400
  np.testing.assert_allclose(counts / counts.sum(), list(weights.values()), atol=0.06)


def test_deterministic_for_a_seed(small_data_dir):
  assert_same(batches(small_data_dir, 3)[0], batches(small_data_dir, 3)[0])
  assert not np.array_equal(batches(small_data_dir, 1)[0][0].tokens,
                            batches(small_data_dir, 1, seed=1)[0][0].tokens)


def test_resume_is_exact(small_data_dir):
  uninterrupted = batches(small_data_dir, 10)[0]
  _, stopped = batches(small_data_dir, 6)
  state = json.loads(json.dumps(stopped.get_state()))
  assert_same(batches(small_data_dir, 4, state=state)[0], uninterrupted[6:])


def test_process_shards_are_the_global_batch(small_data_dir):
  global_batches, global_iterator = batches(small_data_dir, 3)
  for process_count in (2, 4):
    shards = [batches(small_data_dir, 3, process_index=p, process_count=process_count)
              for p in range(process_count)]
    for step in range(3):
      parts = [shard_batches[step] for shard_batches, _ in shards]
      assert all(part.tokens.shape[0] == BATCH // process_count for part in parts)
      assert_same([concat(parts)], [global_batches[step]])
    # The processes' states merged restore a single process (a different process count).
    merged = dict(shards[0][1].get_state(),
                  rows=[row for _, it in shards for row in it.get_state()['rows']])
    assert merged == global_iterator.get_state()
    assert_same(batches(small_data_dir, 2, state=merged)[0], batches(small_data_dir, 5)[0][3:])


def test_rows_read_disjoint_documents(small_data_dir):
  bos = Tokenizer().bos_id
  starts = [set() for _ in range(8)]  # per row, the first tokens of each document begun
  for batch in batches(small_data_dir, 4, split='eval', batch_size=8, seq_len=128,
                       weights={'text': 1})[0]:
    for row, column in zip(*np.nonzero(batch.tokens == bos)):
      segment = batch.segment_ids[row] == batch.segment_ids[row, column]
      starts[row].add(tuple(batch.tokens[row][segment][:12]))
  assert sum(map(len, starts)) == len(set().union(*starts)) > 16


def test_long_documents_run_down_one_row(small_data_dir):
  tokenizer = Tokenizer()
  texts = [example['text'].decode()
           for example in text_corpus.builder(small_data_dir, 'small').as_data_source('long')]
  got, _ = batches(small_data_dir, 5, split='long', batch_size=2, seq_len=64,
                   weights={'text': 1})
  for row in range(2):
    tokens = np.concatenate([batch.tokens[row] for batch in got])
    assert all((batch.segment_ids[row] == 1).all() for batch in got)      # one piece a row
    assert all((batch.positions[row] == np.arange(64)).all() for batch in got)  # from 0
    assert tokens[0] == tokenizer.bos_id
    assert any(text.startswith(tokenizer.decode(tokens[1:])) for text in texts)


def test_examples_too_big_for_a_row_are_skipped_and_counted(small_data_dir, monkeypatch):
  tight = dict(SHAPES, num_audio_frames=8)  # 0.32 s: no sentence fits
  got, iterator = batches(small_data_dir, 4, shapes=tight,
                          weights={'text': 0.5, 'speech': 0.5})
  assert iterator.stats()['skipped/speech'] > 0
  assert all((batch.modality != Modality.AUDIO).all() for batch in got)
  monkeypatch.setattr(mixture, 'MAX_SKIPS_IN_A_ROW', 5)
  with pytest.raises(DataError, match='too big for a row .*raise those'):
    batches(small_data_dir, 1, shapes=tight, weights={'speech': 1})


def test_unused_tasks_need_no_data(small_data_dir, tmp_path):
  copy = tmp_path / 'data'
  shutil.copytree(pathlib.Path(small_data_dir) / 'text_corpus', copy / 'text_corpus')
  batches(str(copy), 1, weights={'text': 1, 'caption': 0})
  with pytest.raises(DataError, match="task 'caption' .*gemini_mini.data.prepare --subset small"):
    batches(str(copy), 1, weights={'text': 1, 'caption': 1})


def test_bad_arguments_and_states_are_named(small_data_dir):
  with pytest.raises(DataError, match='divisible by the process count'):
    batches(small_data_dir, 1, process_count=3)
  with pytest.raises(DataError, match="split 'test'"):
    batches(small_data_dir, 1, split='test')
  with pytest.raises(DataError, match='non-negative weights'):
    batches(small_data_dir, 1, weights={'text': 1, 'poetry': 1})
  _, iterator = batches(small_data_dir, 1)
  with pytest.raises(DataError, match='"seq_len": \\[384, 256\\]'):
    batches(small_data_dir, 1, seq_len=256, state=iterator.get_state())
  with pytest.raises(DataError, match='"weights"'):
    batches(small_data_dir, 1, weights={'text': 1}, state=iterator.get_state())
  with pytest.raises(DataError, match='no cursor for rows'):
    batches(small_data_dir, 1, state=dict(iterator.get_state(), rows=[]))


def test_corrupt_prepared_data_names_the_fix(small_data_dir, tmp_path):
  copy = tmp_path / 'data'
  shutil.copytree(small_data_dir, copy)
  shard, = pathlib.Path(copy).glob('text_corpus/small/*/text_corpus-train.array_record-*')
  shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
  with pytest.raises(DataError, match='cannot be read .*delete that directory and rebuild'):
    batches(str(copy), 1, weights={'text': 1})


def test_unprepared_data_names_the_command(tmp_path):
  with pytest.raises(DataError, match='gemini_mini.data.prepare --subset small'):
    batches(str(tmp_path), 1)


def test_word_frame_rows_are_the_clips_word_frames(small_data_dir):
  """Each ``word_frame`` example is one train clip's word frame (patches equal to the frame
  patchified) and ``Word: {word}``; dozens fit a row."""
  tokenizer = Tokenizer()
  clips = video_clips.builder(small_data_dir, 'small').as_data_source('train')
  frames_by_word = {}
  for index in range(len(clips)):
    clip = clips[index]
    frames_by_word.setdefault(clip['word'].decode(), []).append(
        image_lib.patchify(clip['frames'][int(clip['word_second'])]))
  [batch], _ = batches(small_data_dir, 1, weights={'word_frame': 1.0}, batch_size=1,
                       seq_len=512, shapes=dict(SHAPES, num_patches=512))
  examples = list(segments_of(batch, 0))
  assert len(examples) >= 15
  for tokens, modality, patches, _ in examples:
    text = tokenizer.decode(tokens[modality == Modality.TEXT])
    word = text.removeprefix('Word: ')
    assert text.startswith('Word: ') and word.upper() in frames_by_word
    assert len(patches) == image_lib.PATCHES_PER_IMAGE and tokens[-1] == tokenizer.eos_id
    assert any(np.array_equal(patches, frame) for frame in frames_by_word[word.upper()])


def test_needle_lists_ask_every_needle_once_and_fit_the_row():
  """A needle list is its needles, one per line with no filler, then one question per key in
  some order, each answered with that key's value; it holds 2-20 needles and never more
  positions than the row (fewer needles when the row is short)."""
  tokenizer = Tokenizer()
  needle_re = re.compile(r'The special magic number for (\S+) is (\d+)\.')
  answer_re = re.compile(r'Answer: The special magic number for (\S+) is (\d+)')
  counts = []
  for i, positions in enumerate([2048] * 40 + [300] * 10):
    example = tasks.needle_list_example(None, tokenizer, np.random.default_rng([7, i]),
                                        tasks.Room(positions, 1, 1))
    ids = np.concatenate([segment.data for segment in example])
    assert len(ids) <= positions and ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    text = tokenizer.decode(ids[1:-1])
    hidden, questions = text.split('\nQuestion:', 1)
    listed = dict(needle_re.findall(hidden))
    assert hidden.strip() == '\n\n'.join(f'The special magic number for {key} is {value}.'
                                         for key, value in listed.items())
    asked = answer_re.findall(questions)
    assert sorted(key for key, _ in asked) == sorted(listed)
    assert all(listed[key] == value for key, value in asked)
    counts.append(len(listed))
  assert min(counts[:40]) == 2 and max(counts[:40]) == tasks.MAX_LISTED_NEEDLES
  assert max(counts[40:]) < tasks.MAX_LISTED_NEEDLES


def test_demonstrations_are_sft_conversations_scored_on_the_model_turn_only(small_data_dir):
  """``demonstrations`` rows hold whole conversations of the ``sft`` split: ``<bos><user>``
  ... ``<end_of_turn><model>`` reply ``<end_of_turn>``, the loss on the reply alone."""
  tokenizer = Tokenizer()
  sft = post_training.builder(small_data_dir, 'small').as_data_source('sft')
  demonstrations = {sft[i].demonstration for i in range(len(sft))}
  [batch], _ = batches(small_data_dir, 1, weights={'demonstrations': 1.0}, batch_size=2,
                       seq_len=768, shapes=dict(SHAPES, num_audio_frames=512))
  count = 0
  for row in range(2):
    for segment in range(1, batch.segment_ids[row].max() + 1):
      where = np.nonzero(batch.segment_ids[row] == segment)[0]
      tokens = batch.tokens[row][where]
      model = int(np.nonzero(tokens == tokenizer.model_id)[0][0])
      assert tokens[:2].tolist() == [tokenizer.bos_id, tokenizer.user_id]
      assert tokens[model - 1] == tokens[-1] == tokenizer.end_of_turn_id
      assert tokenizer.decode(tokens[model + 1:-1]) in demonstrations
      expected = np.zeros(len(where))
      expected[model:-1] = 1  # <model> predicts the reply's first token ... <end_of_turn>
      np.testing.assert_array_equal(batch.loss_mask[row][where], expected)
      count += 1
  assert count >= 2
