"""The audio haystack task: the keyword lands in the frames its depth names, training
examples fit the row and repeat for a seed, and each split hears its own voices."""

import numpy as np
import pytest

from gemini_mini.batch import Modality
from gemini_mini.data import audio_haystack, prepare, speech, tasks, video_clips
from gemini_mini.modalities import interleave
from gemini_mini.modalities.text import Tokenizer

FRAME = audio_haystack.FRAME_SAMPLES
ROOMS = (tasks.Room(384, 96, 128), tasks.Room(512, 320, 256), tasks.Room(4096, 1024, 1024))


@pytest.fixture(scope='module')
def tokenizer():
  return Tokenizer()


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """The small speech dataset read as the task reads it: split -> ``KeywordedSentences``."""
  data_dir = str(tmp_path_factory.mktemp('speech'))
  prepare.ensure_dataset(audio_haystack, data_dir, 'small')
  builder = audio_haystack.builder(data_dir, 'small')
  return {split: builder.as_data_source(split) for split in speech.SPLITS}


def reader(source, start=0):
  """``next_record`` over ``source`` from ``start``, and the list of indices it read."""
  read = []

  def next_record():
    read.append((start + len(read)) % len(source))
    return source[read[-1]]

  return next_record, read


def features(samples_N):
  return tasks.audio_frames(samples_N)


def noise(rng, frames, extra=0):
  return rng.integers(-3000, 3000, frames * FRAME + extra).astype(np.int16)


def test_hide_puts_the_keyword_in_the_frames_of_its_depth():
  rng = np.random.default_rng(0)
  filler_N, keyword_K = noise(rng, 60, extra=300), noise(rng, 20, extra=-100)
  alone_AD = features(np.concatenate([keyword_K, np.zeros(100, np.int16)]))
  for depth, expected in ((0.0, 0), (0.25, 15), (0.5, 30), (1.0, 60)):
    samples_M, start = audio_haystack.hide(filler_N, keyword_K, depth)
    assert start == expected and len(samples_M) == (60 + 20) * FRAME  # filler cut to frames
    np.testing.assert_array_equal(samples_M[start * FRAME:start * FRAME + len(keyword_K)],
                                  keyword_K)
    frames_AD = features(samples_M)
    assert len(frames_AD) == 80
    # The windows of a frame reach 240 samples into the next one: compare all but the last.
    np.testing.assert_allclose(frames_AD[start:start + 19], alone_AD[:19], atol=1e-5)
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match='depth'):
      audio_haystack.hide(filler_N, keyword_K, bad)


def test_prompt_is_bos_audio_cue(tokenizer):
  rng = np.random.default_rng(1)
  prompt = audio_haystack.audio_haystack_prompt(noise(rng, 30), noise(rng, 10), 0.5, tokenizer)
  assert [segment.kind for segment in prompt] == ['text', 'audio', 'text']
  assert list(prompt[0].data) == [tokenizer.bos_id] and prompt[1].data.shape == (40, 320)
  assert tokenizer.decode(prompt[2].data) == audio_haystack.CUE
  assert tokenizer.decode(tasks.answer('apple', tokenizer).data) == ' apple'


def test_filler_takes_only_the_clips_it_needs():
  taken = []

  def clips():
    for index in range(10):
      taken.append(index)
      yield np.full(1000, index, np.int16)

  filler_N = audio_haystack.filler(clips(), 2500)
  assert len(filler_N) == 2500 and taken == [0, 1, 2] and filler_N[-1] == 2
  assert len(audio_haystack.filler(clips(), 0)) == 0 and taken == [0, 1, 2]
  assert len(audio_haystack.filler(iter([np.ones(10, np.int16)]), 50)) == 10  # ran out


def test_records_pair_sentences_with_keywords_of_the_same_voice_split(sources):
  for split, source in sources.items():
    assert len(source) == speech.NUM_EXAMPLES['small'][split]
    for index in range(len(source)):
      record = source[index]
      assert record['keyword'].upper() in video_clips.WORDS
      assert record['voice'].decode() in speech.voices(split)
      assert record['transcript'].decode() != speech.KEYWORD_TEXT.format(word=record['keyword'])
  with pytest.raises(ValueError, match='keywords_'):
    audio_haystack.builder('unused', 'small').as_data_source('keywords_train')


def test_examples_fit_the_room_and_hold_the_keyword(sources, tokenizer):
  for seed, room in enumerate(ROOMS * 3):
    next_record, read = reader(sources['train'], start=5 * seed)
    example = audio_haystack.audio_haystack_example(
        next_record, tokenizer, np.random.default_rng(seed), room)
    flat = interleave.flatten(example, tokenizer)
    assert len(flat.tokens) <= room.positions and len(flat.audio) <= room.audio_frames
    least = min(audio_haystack.MIN_FRAMES, room.audio_frames)
    assert len(flat.audio) >= least
    first = sources['train'][read[0]]
    assert tokenizer.decode(example[-1].data) == ' ' + first['keyword']
    assert example[-1].data[-1] == tokenizer.eos_id
    # The keyword's own frames are in the audio, whole (all but its last, see above).
    keyword_AD = features(first['keyword_audio'])[:-1]
    matches = [start for start in range(len(flat.audio) - len(keyword_AD) + 1)
               if np.allclose(flat.audio[start:start + len(keyword_AD)], keyword_AD, atol=1e-5)]
    assert len(matches) == 1
    # It reads the sentences its length needs, and no more.
    needed = (len(flat.audio) - audio_haystack.frames_of(len(first['keyword_audio']))) * FRAME
    lengths = [len(sources['train'][index]['audio']) for index in read]
    assert sum(lengths[:-1]) < needed <= sum(lengths)


def test_examples_repeat_for_a_seed_and_vary_with_it(sources, tokenizer):
  def example(seed):
    next_record, _ = reader(sources['train'])
    return audio_haystack.audio_haystack_example(next_record, tokenizer,
                                                 np.random.default_rng(seed), ROOMS[1])

  first, again, other = example(3), example(3), example(4)
  assert len(first) == len(again)
  for a, b in zip(first, again):
    assert a.kind == b.kind
    np.testing.assert_array_equal(a.data, b.data)
  assert not np.array_equal(first[1].data, other[1].data)


def test_a_keyword_longer_than_the_row_gives_an_example_the_mixture_skips(sources, tokenizer):
  next_record, _ = reader(sources['train'])
  room = tasks.Room(200, 96, 20)  # 0.8 s of audio: no keyword fits
  flat = interleave.flatten(audio_haystack.audio_haystack_example(
      next_record, tokenizer, np.random.default_rng(0), room), tokenizer)
  assert len(flat.audio) > room.audio_frames


def test_a_keyword_example_is_the_keyword_utterance_alone(sources, tokenizer):
  next_record, read = reader(sources['train'], start=7)
  example = audio_haystack.keyword_example(next_record, tokenizer, np.random.default_rng(0),
                                           ROOMS[0])
  record = sources['train'][read[0]]
  flat = interleave.flatten(example, tokenizer)
  keyword_AD = features(record['keyword_audio'])[:-1]  # the last frame is padded (above)
  assert len(read) == 1 and len(flat.audio) == audio_haystack.frames_of(
      len(record['keyword_audio']))
  np.testing.assert_allclose(flat.audio[:len(keyword_AD)], keyword_AD, atol=1e-5)
  text = tokenizer.decode(flat.tokens[flat.modality == Modality.TEXT])
  assert text == f'{audio_haystack.CUE} {record["keyword"]}'
  assert flat.tokens[-1] == tokenizer.eos_id
