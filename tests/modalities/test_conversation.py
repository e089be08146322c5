"""The conversation layout by hand, and only the reply in the loss after packing."""

import numpy as np
import pytest

from gemini_mini import batch as batch_lib
from gemini_mini.modalities import conversation, interleave
from gemini_mini.modalities import text as text_lib
from gemini_mini.modalities.segments import Segment

TOKENIZER = text_lib.Tokenizer()
BOS, USER, MODEL, EOT = (TOKENIZER.bos_id, TOKENIZER.user_id, TOKENIZER.model_id,
                         TOKENIZER.end_of_turn_id)
BOI, IMG, EOI = TOKENIZER.begin_image_id, TOKENIZER.image_id, TOKENIZER.end_image_id
BOA, AUD, EOA = TOKENIZER.begin_audio_id, TOKENIZER.audio_id, TOKENIZER.end_audio_id
PATCH_DIM, AUDIO_DIM = 4, 6
RNG = np.random.default_rng(0)


def pack(examples, seq_len, num_patches=4, num_audio_frames=4):
  batch, count = interleave.pack_examples(
      [interleave.flatten(example, TOKENIZER) for example in examples], batch_size=1,
      seq_len=seq_len, num_patches=num_patches, num_audio_frames=num_audio_frames,
      patch_dim=PATCH_DIM, audio_dim=AUDIO_DIM)
  assert count == len(examples)
  batch_lib.check_batch(batch, vocab_size=TOKENIZER.vocab_size, patch_dim=PATCH_DIM,
                        audio_dim=AUDIO_DIM)
  return batch


def ids(segments):
  return np.concatenate([segment.data for segment in segments]).tolist()


def test_the_layout_is_bos_user_turn_model_turn():
  question, answer = TOKENIZER.encode('Hi?').tolist(), TOKENIZER.encode('Hello.').tolist()
  example = conversation.conversation([conversation.user_text('Hi?', TOKENIZER)], 'Hello.',
                                      TOKENIZER)
  assert ids(example) == [BOS, USER, *question, EOT, MODEL, *answer, EOT]
  assert ids(conversation.prompt([conversation.user_text('Hi?', TOKENIZER)], TOKENIZER)) == [
      BOS, USER, *question, EOT, MODEL]
  assert conversation.reply('Hello.', TOKENIZER).data.tolist() == [*answer, EOT]
  assert conversation.stop_ids(TOKENIZER) == (EOT,)
  assert TOKENIZER.decode(ids(example)) == 'Hi?Hello.'


def test_only_the_reply_and_its_end_of_turn_are_in_the_loss_of_a_packed_row():
  q1, a1 = [int(i) for i in TOKENIZER.encode('Hi?')], [int(i) for i in TOKENIZER.encode('Yo.')]
  # The user segment is made scored (the default): prompt() keeps it out of the loss anyway.
  example = conversation.conversation([Segment.text(q1)], 'Yo.', TOKENIZER)
  batch = pack([example, example], seq_len=2 * (5 + len(q1) + len(a1)) + 3)
  one = [BOS, USER, *q1, EOT, MODEL, *a1, EOT]
  assert batch.tokens[0].tolist() == one + one + [0, 0, 0]
  # loss_mask[p] scores target p + 1: from <model> (predicting the reply's first token) to
  # the reply's last token (predicting <end_of_turn>); the conversation's last position has
  # no target in its segment.
  scored = [0] * (3 + len(q1)) + [1] * (1 + len(a1)) + [0]
  assert batch.loss_mask[0].tolist() == scored + scored + [0, 0, 0]
  assert batch.segment_ids[0].tolist() == [1] * len(one) + [2] * len(one) + [0, 0, 0]


def test_images_and_audio_in_a_user_turn_are_context_only():
  patches = RNG.normal(size=(2, PATCH_DIM)).astype(np.float32)
  frames = RNG.normal(size=(3, AUDIO_DIM)).astype(np.float32)
  question = [int(i) for i in TOKENIZER.encode('Word?')]
  answer = [int(i) for i in TOKENIZER.encode('Cat.')]
  user = [Segment.image(patches), Segment.audio(frames), conversation.user_text('Word?',
                                                                                TOKENIZER)]
  batch = pack([conversation.conversation(user, 'Cat.', TOKENIZER)], seq_len=32)
  used = 2 + 4 + 5 + len(question) + 2 + len(answer) + 1
  assert batch.tokens[0, :used].tolist() == [BOS, USER, BOI, IMG, IMG, EOI, BOA, AUD, AUD, AUD,
                                             EOA, *question, EOT, MODEL, *answer, EOT]
  assert batch.modality[0, :11].tolist() == [0, 0, 0, 1, 1, 0, 0, 2, 2, 2, 0]
  expected = np.zeros(32)
  expected[used - len(answer) - 2:used - 1] = 1  # <model> .. the reply's last token
  np.testing.assert_array_equal(batch.loss_mask[0], expected)
  np.testing.assert_array_equal(batch.patches[0, :2], patches)
  np.testing.assert_array_equal(batch.audio[0, :3], frames)


def test_an_empty_user_turn_is_refused():
  with pytest.raises(ValueError, match='at least one segment'):
    conversation.prompt([], TOKENIZER)
