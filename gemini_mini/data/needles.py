"""Needles: key-value sentences hidden in real prose, and the question that retrieves one.

A needle is RULER's sentence ``The special magic number for {key} is {value}.`` with a key
of two words (``'lemon-tiger'``, from ``video_clips.WORDS``: 159^2 keys) and a value of
seven digits. Keys are split by a hash, 10% for evaluation: a key the eval suites ask about
was never a key in training, and its seven-digit value is new too, so recall measures
retrieval, not memory.

``hide`` lays needles into a token stream of filler (real documents) at given depths, each
on its own line; the question, on the lines after it, is ``Question: What is the special
magic number for {key}?`` / ``Answer: The special magic number for {key} is``, and the
answer `` {value}``.
"""

import hashlib

import numpy as np

from gemini_mini.data import video_clips
from gemini_mini.modalities.text import Tokenizer

KEY_WORDS = tuple(word.lower() for word in video_clips.WORDS)
EVAL_PER_MILLE = 100
VALUE_DIGITS = 7


def split_of(key: str) -> str:
  """``'eval'`` for 10% of keys (by a hash), else ``'train'``."""
  digest = hashlib.sha256(f'needle-key:{key}'.encode()).digest()
  return 'eval' if int.from_bytes(digest[:8], 'little') % 1000 < EVAL_PER_MILLE else 'train'


def draw_keys(rng: np.random.Generator, split: str, count: int) -> list[str]:
  """``count`` distinct keys of ``split`` (``'train'`` or ``'eval'``), drawn with ``rng``."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split {split!r} is unknown; use 'train' or 'eval'")
  keys = []
  while len(keys) < count:
    first, second = rng.integers(len(KEY_WORDS), size=2)
    key = f'{KEY_WORDS[first]}-{KEY_WORDS[second]}'
    if split_of(key) == split and key not in keys:
      keys.append(key)
  return keys


def draw_value(rng: np.random.Generator) -> str:
  """A value of ``VALUE_DIGITS`` digits, the first not 0."""
  return str(int(rng.integers(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS)))


def sentence(key: str, value: str) -> str:
  return f'The special magic number for {key} is {value}.'


def question(key: str) -> str:
  """The question's text; the answer that follows is `` {value}``. As in RULER, the answer
  opens by restating the needle up to its value, so the value follows the same tokens in
  the needle and in the answer (what an induction head copies from)."""
  return (f'\nQuestion: What is the special magic number for {key}?\nAnswer: '
          f'The special magic number for {key} is')


def hide(filler_ids: np.ndarray, needles: list[np.ndarray], depths: list[float]) -> np.ndarray:
  """Inserts each needle's ids into ``filler_ids`` at ``depth`` (0 = first, 1 = last).

  Args:
    filler_ids: ``[L] int32``, the haystack.
    needles: token arrays, each already holding its line breaks.
    depths: one fraction in [0, 1] per needle: needle i goes before filler token
      ``round(depths[i] * L)``; needles at the same place keep their order.

  Returns:
    ``[L + sum(len(needles))] int32``.
  """
  if len(needles) != len(depths) or any(not 0 <= depth <= 1 for depth in depths):
    raise ValueError(f'{len(needles)} needles need as many depths in [0, 1], got {depths}')
  cuts = [int(round(depth * len(filler_ids))) for depth in depths]
  order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
  parts, start = [], 0
  for i in order:
    parts += [filler_ids[start:cuts[i]], needles[i]]
    start = cuts[i]
  parts.append(filler_ids[start:])
  return np.concatenate(parts).astype(np.int32)


def needle_ids(key: str, value: str, tokenizer: Tokenizer) -> np.ndarray:
  """The needle sentence on its own line: ids of ``'\\n' + sentence + '\\n'``."""
  return tokenizer.encode(f'\n{sentence(key, value)}\n')
