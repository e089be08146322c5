"""flatten and pack_examples against hand-built rows; order, isolation, check_batch, errors."""

import numpy as np
import pytest

from gemini_mini import batch as batch_lib
from gemini_mini.modalities import interleave
from gemini_mini.modalities import text as text_lib
from gemini_mini.modalities import video as video_lib
from gemini_mini.modalities.segments import Segment

TOKENIZER = text_lib.Tokenizer()
IDS = TOKENIZER.special_ids
IMG, AUD = IDS['<image>'], IDS['<audio>']
BOI, EOI, BOA, EOA = (IDS[name] for name in ('<begin_image>', '<end_image>', '<begin_audio>',
                                             '<end_audio>'))
PATCH_DIM, AUDIO_DIM = 4, 6
RNG = np.random.default_rng(0)


def pack(examples, batch_size=2, seq_len=20, num_patches=4, num_audio_frames=4):
  return interleave.pack_examples(
      examples, batch_size=batch_size, seq_len=seq_len, num_patches=num_patches,
      num_audio_frames=num_audio_frames, patch_dim=PATCH_DIM, audio_dim=AUDIO_DIM)


def check(batch):
  batch_lib.check_batch(batch, vocab_size=TOKENIZER.vocab_size, patch_dim=PATCH_DIM,
                        audio_dim=AUDIO_DIM)


def test_hand_built_row():
  patches = RNG.normal(size=(2, PATCH_DIM)).astype(np.float32)
  frames = RNG.normal(size=(3, AUDIO_DIM)).astype(np.float32)
  first = interleave.flatten([Segment.text([1, 100, 101]), Segment.image(patches),
                              Segment.text([102]), Segment.audio(frames),
                              Segment.text([103, 2])], TOKENIZER)
  second = interleave.flatten([Segment.text([1, 200, 2])], TOKENIZER)
  batch, count = pack([first, second])
  assert count == 2
  check(batch)
  row = {name: getattr(batch, name)[0].tolist() for name in (
      'tokens', 'modality', 'segment_ids', 'positions', 'targets', 'loss_mask')}
  assert row == {
      'tokens': [1, 100, 101, BOI, IMG, IMG, EOI, 102, BOA, AUD, AUD, AUD, EOA, 103, 2,
                 1, 200, 2, 0, 0],
      'modality': [0, 0, 0, 0, 1, 1, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0],
      'segment_ids': [1] * 15 + [2] * 3 + [0, 0],
      'positions': list(range(15)) + [0, 1, 2, 0, 0],
      'targets': [100, 101, BOI, IMG, IMG, EOI, 102, BOA, AUD, AUD, AUD, EOA, 103, 2, 0,
                  200, 2, 0, 0, 0],
      'loss_mask': [1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0],
  }
  np.testing.assert_array_equal(batch.patches[0, :2], patches)
  np.testing.assert_array_equal(batch.patches[0, 2:], 0)
  np.testing.assert_array_equal(batch.audio[0, :3], frames)
  np.testing.assert_array_equal(batch.audio[0, 3:], 0)
  for name in ('tokens', 'segment_ids', 'loss_mask', 'patches', 'audio'):  # row 1: padding
    assert not getattr(batch, name)[1].any()
  assert (batch.tokens.dtype, batch.modality.dtype, batch.loss_mask.dtype) == (
      np.int32, np.int8, np.float32)


def test_unscored_text_is_never_a_target_in_the_loss():
  """``Segment.text(..., loss=False)`` positions are context only; everything else as before."""
  patches = RNG.normal(size=(1, PATCH_DIM)).astype(np.float32)
  example = interleave.flatten([Segment.text([1, 100]), Segment.text([101, 102], loss=False),
                                Segment.image(patches), Segment.text([103, 2])], TOKENIZER)
  np.testing.assert_array_equal(
      example.scored, [True, True, False, False, True, False, True, True, True])
  batch, _ = pack([example], batch_size=1, seq_len=12)
  # tokens 1 100 101 102 BOI IMG EOI 103 2: position p scores token p + 1, so 101 and 102
  # (targets of positions 1 and 2) and the placeholder drop out.
  assert batch.loss_mask[0].tolist() == [1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0]
  assert batch.targets[0, :8].tolist() == [100, 101, 102, BOI, IMG, EOI, 103, 2]


def test_an_unscored_image_or_clip_keeps_its_brackets_out_of_the_loss():
  """``Segment.image(..., loss=False)`` (an image in a user turn) scores neither bracket."""
  patches = RNG.normal(size=(1, PATCH_DIM)).astype(np.float32)
  frames = RNG.normal(size=(1, AUDIO_DIM)).astype(np.float32)
  example = interleave.flatten([Segment.text([1]), Segment.image(patches, loss=False),
                                Segment.audio(frames, loss=False), Segment.text([103, 2])],
                               TOKENIZER)
  # tokens 1 BOI IMG EOI BOA AUD EOA 103 2
  np.testing.assert_array_equal(
      example.scored, [True, False, False, False, False, False, False, True, True])
  batch, _ = pack([example], batch_size=1, seq_len=10)
  assert batch.loss_mask[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0]


def text_example(marker, length):
  return interleave.flatten([Segment.text([marker] * length)], TOKENIZER)


def image_example(marker, num_patches):
  return interleave.flatten([Segment.text([marker]), Segment.image(
      np.full((num_patches, PATCH_DIM), marker, np.float32))], TOKENIZER)


def test_next_fit_in_order_and_leftovers():
  # Row 0 takes 8 + 8 tokens; 6 more do not fit in 20, so row 1 starts; its image of 3
  # patches fits in tokens but not in the 4 patches left after 2, so it waits for the next
  # batch.
  examples = [text_example(310, 8), text_example(311, 8), text_example(312, 6),
              image_example(313, 2), image_example(314, 3), text_example(315, 1)]
  batch, count = pack(examples)
  assert count == 4
  check(batch)
  assert batch.tokens[0, :16].tolist() == [310] * 8 + [311] * 8
  assert batch.segment_ids[0].tolist() == [1] * 8 + [2] * 8 + [0] * 4
  assert batch.tokens[1, :6].tolist() == [312] * 6
  assert batch.tokens[1, 6:11].tolist() == [313, BOI, IMG, IMG, EOI]
  np.testing.assert_array_equal(batch.patches[1, :2], 313)
  rest, count = pack(examples[4:])
  assert count == 2 and rest.tokens[0, 0] == 314 and rest.tokens[0, 6] == 315


def test_random_examples_stay_whole_and_in_order():
  examples = []
  for index in range(30):
    segments = [Segment.text(RNG.integers(300, 8000, RNG.integers(1, 6)))]
    if RNG.random() < 0.5:
      segments.append(Segment.image(RNG.normal(size=(RNG.integers(1, 3), PATCH_DIM))))
    if RNG.random() < 0.5:
      segments.append(Segment.audio(RNG.normal(size=(RNG.integers(1, 4), AUDIO_DIM))))
    examples.append(interleave.flatten(segments, TOKENIZER))
  batch, count = pack(examples, batch_size=6, seq_len=24)
  check(batch)
  assert count > 6
  seen = 0
  for row in range(6):
    segment_ids = batch.segment_ids[row]
    patch_rows, audio_rows = [], []
    for segment in range(1, segment_ids.max() + 1):
      where = np.flatnonzero(segment_ids == segment)
      example = examples[seen]
      np.testing.assert_array_equal(batch.tokens[row, where], example.tokens)
      np.testing.assert_array_equal(batch.modality[row, where], example.modality)
      last = where[-1]  # nothing is predicted across examples
      assert batch.loss_mask[row, last] == 0 and batch.targets[row, last] == 0
      patch_rows += list(example.patches)
      audio_rows += list(example.audio)
      seen += 1
    used = (batch.modality[row] == 1).sum(), (batch.modality[row] == 2).sum()
    assert used == (len(patch_rows), len(audio_rows))
    if patch_rows:
      np.testing.assert_array_equal(batch.patches[row, :used[0]], patch_rows)
    if audio_rows:
      np.testing.assert_array_equal(batch.audio[row, :used[1]], audio_rows)
  assert seen == count
  targets_text = np.roll(batch.modality, -1, axis=1) == 0
  assert not (batch.loss_mask.astype(bool) & ~targets_text).any()


def test_video_flattens_to_its_layout():
  frames = np.zeros((3, 8, 8, 3), np.uint8)
  flat = interleave.flatten(video_lib.video_segments(frames, 1.0, TOKENIZER), TOKENIZER)
  frame = lambda s: [IDS[f'<t={s}s>'], BOI] + [IMG] * 16 + [EOI]
  assert flat.tokens.tolist() == ([IDS['<begin_video>']] + frame(0) + frame(1) + frame(2)
                                  + [IDS['<end_video>']])
  assert flat.patches.shape == (48, 192) and flat.audio.shape == (0, 0)


def test_bad_examples_rejected():
  with pytest.raises(ValueError, match='example 1 takes 21 positions but a row has seq_len=20'):
    pack([text_example(300, 3), text_example(300, 21)])
  with pytest.raises(ValueError, match='example 0 has 5 patches but a row holds 4; raise '
                                       'data.num_patches'):
    pack([image_example(300, 5)])
  wide = interleave.flatten([Segment.audio(np.zeros((1, 7), np.float32))], TOKENIZER)
  with pytest.raises(ValueError, match='audio frames of width 7, expected 6'):
    pack([wide])
  with pytest.raises(ValueError, match='example 0 is empty'):
    pack([interleave.flatten([], TOKENIZER)])
  with pytest.raises(ValueError, match='example item 0 is a str, not a Segment'):
    interleave.flatten(['hello'], TOKENIZER)
  with pytest.raises(ValueError, match='text segment 0 holds an <image>/<audio> placeholder'):
    interleave.flatten([Segment.text([1, IMG])], TOKENIZER)
  with pytest.raises(ValueError, match='an empty image segment'):
    Segment.image(np.zeros((0, PATCH_DIM)))
  with pytest.raises(ValueError, match='needs float patches'):
    Segment('image', np.zeros((2, 3), np.int32))
