"""The SentencePiece tokenizer shipped with the package, with modality and control tokens.

Ids 0..3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; then the modality tokens
(``<image>`` and ``<audio>`` placeholders, ``<begin_image>`` ... ``<end_video>``), then one
time stamp ``<t=Ns>`` per second N in 0..``MAX_TIME_STAMP``, then ``\\n``, the 256 byte
pieces and the learned pieces; the last ids are the conversation tokens ``<user>``,
``<model>`` and ``<end_of_turn>`` (``modalities.conversation``), put in place of the three
rarest learned pieces after training, so that adding them left every other id as it was
(checkpoints trained before still read the same text). Every special token is one SentencePiece *control* symbol:
a single id that encoding text never produces (the text ``'<image>'`` becomes the pieces
``<``, ``image``, ``>``) and that ``decode`` drops. Modality code inserts special tokens by
id (``tokenizer.image_id``, ``tokenizer.time_stamp_id(3)``); prompts written as text can
opt in with ``encode(text, allow_special=True)``.

Text round-trips exactly (``decode(encode(text)) == text``: identity normalisation, all
whitespace kept, byte fallback for unseen characters), except that U+2581 ``▁``,
SentencePiece's own space marker, decodes to a space.
"""

import functools
import pathlib
import re

import numpy as np
import sentencepiece as spm

DEFAULT_MODEL = pathlib.Path(__file__).parent.parent / 'assets' / 'tokenizer.model'
VOCAB_SIZE = 8192
MAX_TIME_STAMP = 255  # seconds; a video frame at 1 fps is preceded by its <t=Ns> token
CONTROL_TOKENS = ('<pad>', '<bos>', '<eos>', '<unk>')
MODALITY_TOKENS = ('<image>', '<audio>', '<begin_image>', '<end_image>', '<begin_audio>',
                   '<end_audio>', '<begin_video>', '<end_video>')
TIME_STAMP_TOKENS = tuple(f'<t={second}s>' for second in range(MAX_TIME_STAMP + 1))
TURN_TOKENS = ('<user>', '<model>', '<end_of_turn>')  # the last ids of the vocabulary
SPECIAL_TOKENS = CONTROL_TOKENS + MODALITY_TOKENS + TIME_STAMP_TOKENS + TURN_TOKENS


class TokenizerError(ValueError):
  """A missing or mismatched tokenizer model, or a bad special-token request."""


class Tokenizer:
  """SentencePiece text <-> ids, with named ids for every special token.

  Another model's SentencePiece model (an imported checkpoint's ``tokenizer.model``) loads
  too, for text alone: ``multimodal`` is False, the control ids are that model's own (None
  where it has none) and the placeholder, bracket and turn ids are None.

  Attributes:
    vocab_size: number of ids (8192 for the shipped model); every id is in [0, vocab_size).
    multimodal: True for gemini_mini's tokenizer (every special token below), False for
      another model's.
    pad_id, bos_id, eos_id, unk_id: control ids (pad is 0).
    image_id, audio_id: the placeholders at image-patch and audio-frame positions.
    begin_image_id, end_image_id, begin_audio_id, end_audio_id, begin_video_id,
    end_video_id: the brackets around an image, a clip of audio and a video.
    user_id, model_id, end_of_turn_id: a user turn opens with ``<user>``, a model turn with
      ``<model>``, and each closes with ``<end_of_turn>``.
    ordinary_ids: ``[N] int32``, the ids of learned pieces (``\n`` included; no special,
      unknown or byte-fallback id), for making random text.
  """

  def __init__(self, model_path: str | pathlib.Path = DEFAULT_MODEL):
    path = pathlib.Path(model_path)
    if not path.is_file():
      raise TokenizerError(f'no tokenizer model at {path}; train one with '
                           '`python -m gemini_mini.data.train_tokenizer`')
    self._sp = spm.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self._sp.get_piece_size()
    ids = {piece: self._sp.piece_to_id(piece) for piece in SPECIAL_TOKENS}
    own = [piece for piece in SPECIAL_TOKENS[len(CONTROL_TOKENS):]
           if self._sp.id_to_piece(ids[piece]) == piece]
    self.multimodal = bool(own)
    if not own:
      # Another model's tokenizer (an imported checkpoint's): text alone, with its own
      # control ids; no placeholder, time stamp or turn token.
      self.special_ids = {}
      self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
          id_ if id_ >= 0 else None for id_ in (self._sp.pad_id(), self._sp.bos_id(),
                                                self._sp.eos_id(), self._sp.unk_id()))
      ids = dict.fromkeys(MODALITY_TOKENS + TURN_TOKENS)
    else:
      broken = [piece for piece, id_ in ids.items() if self._sp.id_to_piece(id_) != piece or not (
          self._sp.is_unknown(id_) if piece == '<unk>' else self._sp.is_control(id_))]
      if broken:
        raise TokenizerError(f'{path} lacks the special tokens {broken[:4]}...; retrain it '
                             'with `python -m gemini_mini.data.train_tokenizer`')
      self.special_ids = ids
      self.pad_id, self.bos_id, self.eos_id, self.unk_id = (ids[p] for p in CONTROL_TOKENS)
    (self.image_id, self.audio_id, self.begin_image_id, self.end_image_id,
     self.begin_audio_id, self.end_audio_id, self.begin_video_id,
     self.end_video_id) = (ids[p] for p in MODALITY_TOKENS)
    self.user_id, self.model_id, self.end_of_turn_id = (ids[p] for p in TURN_TOKENS)
    self._special_pattern = re.compile(
        '(' + '|'.join(re.escape(p) for p in sorted(self.special_ids, key=len, reverse=True))
        + ')') if self.special_ids else None

  @functools.cached_property
  def ordinary_ids(self) -> np.ndarray:
    # Computed on first use: a scan of the whole vocabulary that most tokenizers never need.
    sp = self._sp
    return np.asarray([i for i in range(self.vocab_size)
                       if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))], np.int32)

  def time_stamp_id(self, second: int) -> int:
    """The id of ``<t={second}s>``, for 0 <= second <= MAX_TIME_STAMP."""
    if not self.multimodal:
      raise TokenizerError('this tokenizer (another model\'s) has no time stamps; video '
                           'needs gemini_mini\'s own tokenizer')
    if not 0 <= second <= MAX_TIME_STAMP:
      raise TokenizerError(f'time stamp {second}s is outside [0, {MAX_TIME_STAMP}]; '
                           f'cut videos to at most {MAX_TIME_STAMP + 1} frames at 1 fps')
    return self.special_ids[TIME_STAMP_TOKENS[second]]

  def encode(self, text: str, *, allow_special: bool = False) -> np.ndarray:
    """Text -> ids ``[L] int32``, without bos/eos.

    Args:
      text: any string.
      allow_special: if True, each occurrence of a special token's text (``'<image>'``,
        ``'<t=3s>'``) becomes that token's single id; if False (the default) such text is
        encoded as ordinary pieces and the result holds no special id.
    """
    if not allow_special or self._special_pattern is None:
      return np.asarray(self._sp.encode(text), np.int32)
    parts = self._special_pattern.split(text)  # odd indices hold the special tokens
    ids = [[self.special_ids[part]] if i % 2 else self._sp.encode(part)
           for i, part in enumerate(parts) if part]
    return np.asarray([id_ for run in ids for id_ in run], np.int32)

  def decode(self, ids) -> str:
    """Ids -> text; special ids (pad, bos, eos, placeholders, time stamps) are dropped, and
    so are ids past the tokenizer's pieces (a model's vocabulary padded beyond them)."""
    return self._sp.decode([int(id_) for id_ in np.asarray(ids).reshape(-1)
                            if id_ < self.vocab_size])
