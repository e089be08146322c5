"""What every training task builds its examples from: the row's room, the record reader,
text and answer segments, and audio features. Task modules (``tasks``, ``arithmetic``,
``audio_haystack``) import this; ``tasks`` imports them, so nothing here imports a task.
"""

from typing import Callable, NamedTuple

import numpy as np

from gemini_mini.modalities import audio as audio_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

Example = list[Segment]
NextRecord = Callable[[], dict]  # the next record of the task's dataset, for this row


class Room(NamedTuple):
  """What one row holds: positions (``train.seq_len``), image patches and audio frames."""

  positions: int
  patches: int
  audio_frames: int


def log_uniform(rng: np.random.Generator, least: int, most: int) -> int:
  """An integer in ``[least, most]`` (``1 <= least <= most``), log-uniform: as likely in
  ``[n, 2n)`` as in ``[2n, 4n)``. Haystack lengths are drawn this way: short haystacks teach
  retrieval fastest and pack several to a row, and the long ones still cover the row
  (docs/retrieval.md#haystack-lengths-and-depths)."""
  return min(int(np.exp(rng.uniform(np.log(least), np.log(most + 1)))), most)


def as_str(value) -> str:
  """A TFDS text feature (bytes) or any value as ``str``."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def text(tokenizer: Tokenizer, string: str, *, bos: bool = False, eos: bool = False) -> Segment:
  """``string`` as a text segment, with ``<bos>`` before and ``<eos>`` after when asked."""
  ids = tokenizer.encode(string)
  return Segment.text(np.concatenate([[tokenizer.bos_id]] * bos + [ids]
                                     + [[tokenizer.eos_id]] * eos))


def answer(string: str, tokenizer: Tokenizer, *, time_stamp: int | None = None) -> Segment:
  """`` {string}`` (then ``<t=Ns>`` when ``time_stamp`` is given) and ``<eos>``: how every
  task's answer follows its prompt."""
  ids = [tokenizer.encode(' ' + string)]
  if time_stamp is not None:
    ids.append([tokenizer.time_stamp_id(time_stamp)])
  return Segment.text(np.concatenate(ids + [[tokenizer.eos_id]]))


def audio_frames(samples_N: np.ndarray) -> np.ndarray:
  """int16 16 kHz samples ``[N]`` -> stacked log-mel frames ``[A, 320]`` (40 ms each)."""
  return audio_lib.stack_frames(audio_lib.log_mel(np.asarray(samples_N, np.float32) / 32768))
