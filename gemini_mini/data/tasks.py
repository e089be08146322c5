"""The training tasks: how one record of a prepared dataset becomes one example.

An example is a list of ``Segment``s (``modalities.segments``). Every task but ``text`` is
a *prompt* followed by an *answer*; training sees both (the loss falls on every text
position), and evaluation (``eval.py``) gives the prompt alone and compares what the model
generates with the answer, so the two share these functions and can never drift apart:

========  ==========================  =========================================================
task      dataset                     example
========  ==========================  =========================================================
text      ``text_corpus``             ``<bos>`` document ``<eos>`` (a long one is cut into rows)
caption   ``image_caption``           ``<bos>`` image ``Caption:`` | `` {caption}<eos>``
speech    ``speech_transcripts``      ``<bos>`` audio ``Transcript:`` | `` {transcript}<eos>``
video     ``video_clips``             ``<bos>`` video ``Word:`` | `` {word}<t=Ns><eos>``
========  ==========================  =========================================================

(``|`` separates prompt from answer; a video is ``<begin_video>``, then each second's time
stamp and frame, then ``<end_video>``, see ``modalities.video``.) The video answer names the
word drawn in one frame and the second it is shown.
"""

import dataclasses
from typing import Callable

import numpy as np

from gemini_mini.data import image_caption, speech, text_corpus, video_clips
from gemini_mini.modalities import audio as audio_lib
from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities import video as video_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

Example = list[Segment]


def _text(tokenizer: Tokenizer, text: str, *, bos: bool = False, eos: bool = False) -> Segment:
  ids = tokenizer.encode(text)
  return Segment.text(np.concatenate([[tokenizer.bos_id]] * bos + [ids]
                                     + [[tokenizer.eos_id]] * eos))


def audio_frames(samples_N: np.ndarray) -> np.ndarray:
  """int16 16 kHz samples ``[N]`` -> stacked log-mel frames ``[A, 320]`` (40 ms each)."""
  return audio_lib.stack_frames(audio_lib.log_mel(np.asarray(samples_N, np.float32) / 32768))


def caption_prompt(image_HWC, tokenizer: Tokenizer) -> Example:
  """``<bos>`` image ``Caption:``, for an image as ``image.patchify`` accepts."""
  return [Segment.text([tokenizer.bos_id]), Segment.image(image_lib.patchify(image_HWC)),
          _text(tokenizer, 'Caption:')]


def speech_prompt(samples_N, tokenizer: Tokenizer) -> Example:
  """``<bos>`` audio ``Transcript:``, for int16 16 kHz samples ``[N]``."""
  return [Segment.text([tokenizer.bos_id]), Segment.audio(audio_frames(samples_N)),
          _text(tokenizer, 'Transcript:')]


def video_prompt(frames_SHWC, tokenizer: Tokenizer) -> Example:
  """``<bos>`` video ``Word:``, for frames ``[S, H, W, C]`` at one frame a second."""
  return ([Segment.text([tokenizer.bos_id])] + video_lib.video_segments(frames_SHWC, 1.0, tokenizer)
          + [_text(tokenizer, 'Word:')])


def answer(text: str, tokenizer: Tokenizer, *, time_stamp: int | None = None) -> Segment:
  """`` {text}`` (then ``<t=Ns>`` when ``time_stamp`` is given) and ``<eos>``."""
  ids = [tokenizer.encode(' ' + text)]
  if time_stamp is not None:
    ids.append([tokenizer.time_stamp_id(time_stamp)])
  return Segment.text(np.concatenate(ids + [[tokenizer.eos_id]]))


def _str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def text_example(record: dict, tokenizer: Tokenizer) -> Example:
  return [_text(tokenizer, _str(record['text']), bos=True, eos=True)]


def caption_example(record: dict, tokenizer: Tokenizer) -> Example:
  return caption_prompt(record['image'], tokenizer) + [answer(_str(record['caption']), tokenizer)]


def speech_example(record: dict, tokenizer: Tokenizer) -> Example:
  return speech_prompt(record['audio'], tokenizer) + [answer(_str(record['transcript']),
                                                             tokenizer)]


def video_example(record: dict, tokenizer: Tokenizer) -> Example:
  return video_prompt(record['frames'], tokenizer) + [
      answer(_str(record['word']), tokenizer, time_stamp=int(record['word_second']))]


@dataclasses.dataclass(frozen=True)
class Task:
  """One entry of the mixture.

  Attributes:
    name: the task's name; its weight is the config field ``data.{name}_weight``.
    builder: ``builder(data_dir, subset)``, the TFDS builder of its dataset.
    make_example: ``make_example(record, tokenizer)``, one record -> one example.
    cuttable: whether an example may be cut across rows (plain text); others are packed
      whole or, when they can never fit a row, skipped and counted.
  """

  name: str
  builder: Callable
  make_example: Callable[[dict, Tokenizer], Example]
  cuttable: bool = False


# The order is part of the data stream (task i's shuffle seed): append, never reorder.
TASKS = (
    Task('text', text_corpus.builder, text_example, cuttable=True),
    Task('caption', image_caption.builder, caption_example),
    Task('speech', speech.builder, speech_example),
    Task('video', video_clips.builder, video_example),
)
TASK_NAMES = tuple(task.name for task in TASKS)
