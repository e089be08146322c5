"""The video clips builder: expected counts, uint8 1 fps frames, exactly one legible word frame,
train/eval disjoint in emoji and frames, deterministic clips, video segments, clear errors."""

import itertools

import numpy as np
import pytest

from gemini_mini.data import prepare, sources, video_clips
from gemini_mini.modalities import video
from gemini_mini.modalities.text import Tokenizer

LEFT, TOP, RIGHT, BOTTOM = video_clips.WORD_BOX


def _read(builder):
  return {split: [{key: value.decode() if isinstance(value, bytes) else value
                   for key, value in builder.as_data_source(split)[i].items()}
                  for i in range(builder.info.splits[split].num_examples)]
          for split in video_clips.SPLITS}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """The small config, built once for this module: ``(examples by split, metadata)``."""
  builder = prepare.ensure_dataset(video_clips, str(tmp_path_factory.mktemp('video_clips')), 'small')
  return _read(builder), builder.info.metadata


def _has_word_box(frame_HWC) -> bool:
  """Whether the box's white rim (its top and bottom rows, above and below the text) is there:
  32 near-white pixels in a row, which neither a background nor an emoji ever makes."""
  rim = frame_HWC[[TOP, BOTTOM - 1], LEFT:RIGHT]
  return bool((rim >= video_clips.NEAR_WHITE).all())


def test_counts_match_the_config(small):
  examples, metadata = small
  assert metadata['fps'] == 1 and metadata['num_words'] == len(video_clips.WORDS)
  for split in video_clips.SPLITS:
    stats = metadata[split]
    assert stats['num_examples'] == len(examples[split]) == video_clips.NUM_EXAMPLES['small'][split]
    assert stats['seconds'] == sum(example['seconds'] for example in examples[split])
    assert stats['num_emoji'] == len(video_clips.emoji_of(split)) > 100
    assert stats['num_words'] == len({example['word'] for example in examples[split]})


def test_frames_are_uint8_seconds_of_shots(small):
  examples, _ = small
  low, high = video_clips.SECONDS_RANGE
  lengths = set()
  for example in examples['train'] + examples['eval']:
    frames, seconds, starts = example['frames'], example['seconds'], example['shot_starts']
    assert frames.dtype == np.uint8 and frames.shape == (seconds, 32, 32, 3)
    assert low <= seconds <= high and 0 <= example['word_second'] < seconds
    assert starts[0] == 0 and (np.diff(starts) >= video_clips.SHOT_SECONDS_RANGE[0]).all()
    assert starts[-1] < seconds and len(example['emoji']) == len(starts)
    assert len(set(example['emoji'])) == len(starts)  # each shot a different emoji
    lengths.add(int(seconds))
  assert len(lengths) > 5  # lengths vary


def test_exactly_one_frame_carries_a_legible_word(small):
  examples, _ = small
  for example in examples['train'] + examples['eval']:
    frames = example['frames'].astype(np.int32)
    second = example['word_second']
    assert [_has_word_box(frame) for frame in frames].count(True) == 1, example['clip_id']
    assert _has_word_box(frames[second])
    box = frames[second, TOP:BOTTOM, LEFT:RIGHT]
    assert (box.max(axis=2) < 64).sum() >= 40  # black text inside the white box
    for neighbour in (second - 1, second + 1):
      if 0 <= neighbour < len(frames):
        assert np.abs(frames[second] - frames[neighbour]).mean() > 40
    starts = list(example['shot_starts']) + [len(frames)]
    for start, end in itertools.pairwise(starts):  # the emoji drifts: frames change, a little
      for t in range(start, end - 1):
        if second not in (t, t + 1):
          assert 0 < np.abs(frames[t] - frames[t + 1]).mean() < 40, (example['clip_id'], t)


def test_words_come_from_the_shared_list(small):
  examples, _ = small
  words = video_clips.WORDS
  assert 100 <= len(words) == len(set(words)) <= 200
  assert all(word.isalpha() and word.isupper() and 3 <= len(word) <= 5 for word in words)
  for split in video_clips.SPLITS:
    assert {example['word'] for example in examples[split]} <= set(words)


def test_splits_are_disjoint_in_clips_emoji_and_frames(small):
  examples, _ = small
  emoji = {split: set(video_clips.emoji_of(split)) for split in video_clips.SPLITS}
  assert not emoji['train'] & emoji['eval']
  ids = {split: {example['clip_id'] for example in examples[split]}
         for split in video_clips.SPLITS}
  assert not ids['train'] & ids['eval']
  frames = {split: set() for split in video_clips.SPLITS}
  for split in video_clips.SPLITS:
    assert len(ids[split]) == len(examples[split])
    for example in examples[split]:
      assert set(example['emoji']) <= emoji[split]
      frames[split].update(frame.tobytes() for frame in example['frames'])
  assert not frames['train'] & frames['eval']


def test_clips_are_deterministic(small):
  examples, _ = small
  for split in video_clips.SPLITS:
    for stored in examples[split]:  # TFDS stores them shuffled by key
      split_name, index = stored['clip_id'].split('/')
      again = video_clips.clip(split, int(index))
      assert split_name == split and again['clip_id'] == stored['clip_id']
      for key in ('frames', 'seconds', 'word', 'word_second', 'emoji', 'shot_starts'):
        np.testing.assert_array_equal(again[key], stored[key], err_msg=key)
    assert sorted(example['clip_id'] for example in examples[split]) == [
        f'{split}/{index:05d}' for index in range(video_clips.NUM_EXAMPLES['small'][split])]


def test_a_clip_becomes_video_segments(small):
  examples, _ = small
  example = examples['eval'][0]
  segments = video.video_segments(example['frames'], 1.0, Tokenizer())
  assert len(segments) == 2 + 2 * example['seconds']


def test_render_functions_compose_frames():
  char = video_clips.emoji_of('eval')[0]
  frame = video_clips.render_emoji_frame(char, (40, 90, 160), (16.0, 16.0), 20.0)
  moved = video_clips.render_emoji_frame(char, (40, 90, 160), (17.0, 16.0), 20.0)
  assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
  assert (frame[0, 0] == (40, 90, 160)).all() and (frame[16, 16] != (40, 90, 160)).any()
  assert 0 < np.abs(frame.astype(int) - moved).mean() < 20
  word = video_clips.render_word_frame('HAPPY', frame)
  assert _has_word_box(word) and not _has_word_box(frame)
  assert (word[:TOP] == frame[:TOP]).all() and (word[BOTTOM:] == frame[BOTTOM:]).all()
  assert (video_clips.render_word_frame('CAT')[0] == 128).all()  # grey without a frame
  with pytest.raises(ValueError, match='no glyph'):
    video_clips.render_emoji_frame('A', (0, 0, 0), (16, 16), 20)
  with pytest.raises(ValueError, match=r'not uint8 \[32, 32, 3\]'):
    video_clips.render_word_frame('CAT', np.zeros((32, 32, 3), np.float32))


def test_missing_font_names_the_apt_line(monkeypatch, tmp_path):
  monkeypatch.setattr(video_clips, 'EMOJI_FONT', str(tmp_path / 'NotoColorEmoji.ttf'))
  with pytest.raises(sources.MissingSourceError,
                     match='apt-get install -y fonts-noto-color-emoji$'):
    video_clips.check_installed()
  monkeypatch.setattr(video_clips, 'WORD_FONT', str(tmp_path / 'DejaVuSans-Bold.ttf'))
  with pytest.raises(sources.MissingSourceError, match='DejaVuSans-Bold.ttf'):
    video_clips.render_word_frame('CAT')
  monkeypatch.setattr(video_clips.os, 'geteuid', lambda: 1000)  # never apt-get from a test
  with pytest.raises(sources.MissingSourceError,
                     match='apt-get install -y fonts-dejavu-core fonts-noto-color-emoji$'):
    prepare.ensure_dataset(video_clips, str(tmp_path / 'data'), 'small')
