"""The audio haystack task: a spoken keyword hidden in read speech; the answer is the word.

    <bos> audio Secret word: | {word}<eos>

The audio is sentences of the speech dataset (``speech``), back to back, with one keyword
utterance (``speech.KEYWORD_TEXT``, ``The secret word is apple.``) inserted at a depth; the
answer is the word in lower case (``examples.answer``). Training (``audio_haystack_example``)
and evaluation (``evals/haystack.py``) both build the prompt with ``audio_haystack_prompt``.

Depth ``d`` in [0, 1] puts the keyword's first frame at frame ``round(d * F)`` of the ``F``
filler frames (0: before all, 1: after all), like ``needles.hide``. The filler is cut and the
keyword padded with silence to whole 40 ms frames (``FRAME_SAMPLES``), so the keyword fills
exactly its own frames of the features and starts at second ``0.04 * round(d * F)``; the
insertion may split a sentence, as a text needle may.

One stream, two kinds of record. A task reads its dataset through ``next_record()`` alone
(``mixture``): it gets no data directory to open a second source with, and synthesising the
keyword while training would make training depend on espeak-ng and its version. So
``builder`` is the speech dataset (``speech_transcripts``, which ``prepare`` builds with its
keyword splits) read through ``KeywordedSentences``: record ``i`` of split ``S`` is sentence
``i`` with keyword utterance ``i mod K`` of ``keywords_S`` added. An example takes the
keyword of its first record, that record's sentence and as many more as its length needs.
No audio is stored twice and the keywords follow the mixture's split: the held-out loss
(``eval``) hears eval voices. This module is the task's dataset module (``tasks.Task``):
``builder`` as above, and ``NAME``, ``install_missing``, ``check_installed`` and
``summary`` are the speech module's, so building it builds the speech dataset.
"""

import itertools
from typing import Iterable

import numpy as np

from gemini_mini.data import examples, speech
from gemini_mini.modalities import audio as audio_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

NAME = speech.NAME
install_missing = speech.install_missing
check_installed = speech.check_installed
summary = speech.summary

CUE = 'Secret word:'
FRAME_SAMPLES = audio_lib.HOP * audio_lib.STACK  # 640 samples: one 40 ms audio frame
MIN_FRAMES = 100   # 4 s: the shortest training haystack (when the row holds that much)
MAX_FRAMES = 1500  # 60 s: the longest, twice the audio haystack target; longer rows go to padding
PROMPT_TEXT = 3    # positions of a prompt besides its audio frames and cue: bos, brackets


def frames_of(num_samples: int) -> int:
  """Audio frames (40 ms) that ``num_samples`` samples at 16 kHz make: ``ceil(N / 640)``."""
  return -(-num_samples // FRAME_SAMPLES)


def filler(clips: Iterable[np.ndarray], num_samples: int) -> np.ndarray:
  """int16 ``[num_samples]``: the clips back to back, the last one cut (fewer samples when
  ``clips`` runs out first). Takes no clip more than it needs (each may read a record)."""
  parts, total = [], 0
  for clip in clips if num_samples > 0 else ():
    parts.append(np.asarray(clip, np.int16))
    total += len(parts[-1])
    if total >= num_samples:
      break
  return np.concatenate(parts)[:num_samples] if parts else np.zeros(0, np.int16)


def hide(filler_N: np.ndarray, keyword_K: np.ndarray, depth: float) -> tuple[np.ndarray, int]:
  """Inserts the keyword into the filler at ``depth`` (see the module docstring).

  Args:
    filler_N: int16 16 kHz samples; cut to whole frames, ``F = N // 640`` of them.
    keyword_K: int16 16 kHz samples; padded with silence to ``frames_of(K)`` frames.
    depth: in [0, 1].

  Returns:
    ``(samples_M, start)``: int16 ``[640 * (F + frames_of(K))]`` with the keyword in frames
    ``[start, start + frames_of(K))``, ``start = round(depth * F)``.

  Raises:
    ValueError: a depth outside [0, 1] or an empty keyword.
  """
  if not 0 <= depth <= 1 or not len(keyword_K):
    raise ValueError(f'depth {depth} with a keyword of {len(keyword_K)} samples: pass a depth '
                     'in [0, 1] and a keyword utterance of at least one sample')
  filler = np.asarray(filler_N, np.int16)[:len(filler_N) // FRAME_SAMPLES * FRAME_SAMPLES]
  keyword = np.zeros(frames_of(len(keyword_K)) * FRAME_SAMPLES, np.int16)
  keyword[:len(keyword_K)] = keyword_K
  start = int(round(depth * (len(filler) // FRAME_SAMPLES)))
  cut = start * FRAME_SAMPLES
  return np.concatenate([filler[:cut], keyword, filler[cut:]]), start


def audio_haystack_prompt(filler_N: np.ndarray, keyword_K: np.ndarray, depth: float,
                          tokenizer: Tokenizer) -> examples.Example:
  """``<bos>`` audio (``hide(filler_N, keyword_K, depth)``) ``Secret word:``; the answer is
  ``examples.answer(word)``, the keyword's word in lower case."""
  samples_M, _ = hide(filler_N, keyword_K, depth)
  return [Segment.text([tokenizer.bos_id]), Segment.audio(examples.audio_frames(samples_M)),
          Segment.text(tokenizer.encode(CUE))]


def audio_haystack_example(next_record: examples.NextRecord, tokenizer: Tokenizer,
                           rng: np.random.Generator, room: examples.Room) -> examples.Example:
  """A haystack of ``MIN_FRAMES`` (or the keyword's length, if longer) to ``MAX_FRAMES`` or as
  many frames as the row holds (audio frames and positions), uniform, keyword at a uniform
  depth.

  Reads ``KeywordedSentences`` records: the first gives the keyword; its sentence and the
  next records' fill the rest. When even the keyword alone does not fit the row, the
  example is the keyword alone and the mixture skips it.
  """
  first = next_record()
  keyword_K = np.asarray(first['keyword_audio'], np.int16)
  reply = examples.answer(first['keyword'], tokenizer)
  most = min(room.audio_frames, MAX_FRAMES,
             room.positions - PROMPT_TEXT - len(tokenizer.encode(CUE)) - len(reply.data))
  least = min(max(MIN_FRAMES, frames_of(len(keyword_K))), most)
  total = int(rng.integers(least, most + 1))
  filler_frames = max(total - frames_of(len(keyword_K)), 0)
  clips = itertools.chain([first['audio']], (next_record()['audio'] for _ in itertools.count()))
  filler_N = filler(clips, filler_frames * FRAME_SAMPLES)
  return audio_haystack_prompt(filler_N, keyword_K, float(rng.random()), tokenizer) + [reply]


def keyword_prompt(keyword_K: np.ndarray, tokenizer: Tokenizer) -> examples.Example:
  """``<bos>`` the keyword utterance alone ``Secret word:``: an audio haystack without filler,
  about 60 positions (the ``keyword`` task's prompt and the tasks suite's)."""
  return audio_haystack_prompt(np.zeros(0, np.int16), np.asarray(keyword_K, np.int16), 0.0,
                               tokenizer)


def keyword_example(next_record: examples.NextRecord, tokenizer: Tokenizer,
                    rng: np.random.Generator, room: examples.Room) -> examples.Example:
  """A keyword utterance alone (``keyword_prompt``) and its word: the ``keyword`` task, the
  audio haystack's recognition step (docs/retrieval.md#audio-haystack)."""
  del rng, room
  record = next_record()
  return (keyword_prompt(record['keyword_audio'], tokenizer)
          + [examples.answer(record['keyword'], tokenizer)])


class KeywordedSentences:
  """A split's sentences, each with one keyword utterance added: record ``i`` is sentence
  record ``i`` plus ``keyword_audio`` (int16 ``[K]``) and ``keyword`` (its word, lower case)
  of keyword record ``i mod len(keywords)``."""

  def __init__(self, sentences, keywords):
    self._sentences, self._keywords = sentences, keywords

  def __len__(self) -> int:
    return len(self._sentences)

  def __getitem__(self, index: int) -> dict:
    keyword = self._keywords[index % len(self._keywords)]
    transcript = keyword['transcript']
    word = speech.keyword_of(transcript.decode() if isinstance(transcript, bytes) else transcript)
    return {**self._sentences[index], 'keyword_audio': keyword['audio'], 'keyword': word}


class AudioHaystackSpeech(speech.SpeechTranscripts, skip_registration=True):
  """The speech dataset (same files, same build) whose data source is ``KeywordedSentences``."""

  name = speech.NAME  # TFDS would name a subclass after itself, and look in another folder

  def as_data_source(self, split, **kwargs) -> KeywordedSentences:
    if split not in speech.SPLITS:
      raise ValueError(f'the audio haystack reads split {speech.SPLITS}, not {split!r}; its '
                       'keyword utterances come from the matching keywords_* split')
    return KeywordedSentences(super().as_data_source(split, **kwargs),
                              super().as_data_source(f'keywords_{split}', **kwargs))


def builder(data_dir: str, subset: str = 'full') -> AudioHaystackSpeech:
  """The task's dataset for ``subset`` (``'full'`` or ``'small'``) in ``data_dir``."""
  if subset not in speech.NUM_EXAMPLES:
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  return AudioHaystackSpeech(data_dir=data_dir, config=subset)
