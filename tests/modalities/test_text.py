"""The shipped tokenizer: exact round trips, special tokens single ids that text never forges."""

import pathlib

import numpy as np
import pytest

from gemini_mini.modalities import text as text_lib

TOKENIZER = text_lib.Tokenizer()
SPECIAL_IDS = set(TOKENIZER.special_ids.values())
TEXTS = [
    'In the beginning God created the heaven and the earth.',
    'def f(x):\n\tif x:  # two spaces\n        return x ** 2\r\n\n\n',
    '  leading and trailing spaces  ',
    'Unicode: é, ß, 中文, emoji 😀, math ∑ x_i, NUL \x00 and bell \x07.',
    '3.14159 + 2**64 = 18446744073709551616',
    '',
]


def test_vocab_and_fixed_ids():
  assert TOKENIZER.vocab_size == text_lib.VOCAB_SIZE == 8192
  assert (TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.unk_id) == (0, 1, 2, 3)
  assert len(SPECIAL_IDS) == len(text_lib.SPECIAL_TOKENS) == 4 + 8 + 256 + 3
  assert (TOKENIZER.user_id, TOKENIZER.model_id, TOKENIZER.end_of_turn_id) == (8189, 8190, 8191)
  assert TOKENIZER.time_stamp_id(255) - TOKENIZER.time_stamp_id(0) == 255
  assert max(SPECIAL_IDS) < TOKENIZER.vocab_size


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip(text):
  ids = TOKENIZER.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert TOKENIZER.decode(ids) == text


def test_round_trip_real_documents():
  root = pathlib.Path(text_lib.__file__).parent.parent  # the package's own code and docs
  for path in sorted(root.rglob('*.py')):
    text = path.read_text().replace('\u2581', '_')  # U+2581 is SentencePiece's space marker
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text, path


def test_ordinary_ids_are_the_learned_pieces():
  ordinary = TOKENIZER.ordinary_ids
  assert ordinary.dtype == np.int32 and len(set(ordinary.tolist())) == len(ordinary)
  # The vocabulary is the special ids, the 256 byte pieces and these.
  assert len(ordinary) == TOKENIZER.vocab_size - len(SPECIAL_IDS) - 256
  assert not SPECIAL_IDS.intersection(ordinary.tolist())
  assert all(TOKENIZER.decode([i]) for i in ordinary)  # each one decodes to some text
  assert TOKENIZER.encode('\n')[0] in ordinary


def test_text_never_yields_special_ids():
  text = ' '.join(text_lib.SPECIAL_TOKENS) + '<image><t=3s></s><s>'
  ids = TOKENIZER.encode(text)
  assert not SPECIAL_IDS.intersection(ids.tolist())
  assert TOKENIZER.decode(ids) == text


def test_special_tokens_are_never_split():
  for piece, id_ in TOKENIZER.special_ids.items():
    ids = TOKENIZER.encode(f'a{piece}b {piece}', allow_special=True)
    assert ids.tolist().count(id_) == 2
    assert len(ids) == 2 * 1 + len(TOKENIZER.encode('a')) + len(TOKENIZER.encode('b '))
  ids = TOKENIZER.encode('<begin_video><t=0s><image><t=1s><image><end_video> two frames',
                         allow_special=True)
  assert ids[:6].tolist() == [TOKENIZER.begin_video_id, TOKENIZER.time_stamp_id(0),
                              TOKENIZER.image_id, TOKENIZER.time_stamp_id(1),
                              TOKENIZER.image_id, TOKENIZER.end_video_id]
  assert TOKENIZER.decode(ids) == ' two frames'  # decode drops special ids


def test_errors_name_the_fix(tmp_path):
  with pytest.raises(text_lib.TokenizerError, match='cut videos'):
    TOKENIZER.time_stamp_id(256)
  with pytest.raises(text_lib.TokenizerError, match='gemini_mini.data.train_tokenizer'):
    text_lib.Tokenizer(tmp_path / 'missing.model')


def test_another_models_tokenizer_reads_text_alone(tmp_path):
  # An imported checkpoint's tokenizer: its own control ids, none of gemini_mini's specials.
  from helpers import plain_tokenizer  # pylint: disable=import-outside-toplevel
  plain = text_lib.Tokenizer(plain_tokenizer(tmp_path / 'plain.model'))
  assert not plain.multimodal and TOKENIZER.multimodal
  assert (plain.unk_id, plain.bos_id, plain.eos_id, plain.pad_id) == (0, 1, 2, None)
  assert plain.image_id is plain.audio_id is plain.user_id is None and plain.special_ids == {}
  text = 'the magic number for night is 4821.'
  assert plain.decode(plain.encode(text)) == text
  # '<image>' is plain text there, with or without allow_special.
  np.testing.assert_array_equal(plain.encode('<image>', allow_special=True),
                                plain.encode('<image>'))
  with pytest.raises(text_lib.TokenizerError, match="has no time stamps"):
    plain.time_stamp_id(3)
