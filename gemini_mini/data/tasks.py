"""The training tasks: how records of the prepared datasets become examples.

An example is a list of ``Segment``s (``modalities.segments``). Every task but ``text`` is
a *prompt* followed by an *answer*; training sees both (the loss falls on every text
position but the first copy of a ``repeat`` span, which cannot be predicted), and evaluation
(``eval.py``) gives the prompt alone and compares what the model generates with the answer,
so the two share these functions and can never drift apart:

==============  ===================  =====================================================
task            dataset              example (``|`` separates prompt from answer)
==============  ===================  =====================================================
text            text_corpus          ``<bos>`` document ``<eos>`` (cut across rows)
caption         image_caption        ``<bos>`` image ``Caption:`` | `` {caption}<eos>``
speech          speech_transcripts   ``<bos>`` audio ``Transcript:`` | `` {text}<eos>``
video           video_clips          ``<bos>`` video ``Word:`` | `` {word}<t=Ns><eos>``
haystack        text_corpus          ``<bos>`` text with needles, questions | `` {value}<eos>``
arithmetic      (generated)          ``<bos>Question: 23 + 45 - 12 = ?`` ... | `` {steps}<eos>``
audio_haystack  speech_transcripts   ``<bos>`` speech ``Secret word:`` | `` {word}<eos>``
repeat          (generated)          ``<bos>Repeat:`` {span, out of the loss} | {span}``<eos>``
word_frame      video_clips          ``<bos>`` image ``Word:`` | `` {word}<eos>``
keyword         speech_transcripts   ``<bos>`` keyword utterance ``Secret word:`` | `` {word}<eos>``
needle_list     (generated)          ``<bos>`` needles alone, questions | `` {value}<eos>``
demonstrations  post_training        ``<bos><user>`` question ``<end_of_turn><model>`` |
                                     {demonstration}``<end_of_turn>``
==============  ===================  =====================================================

A video is ``<begin_video>``, then each second's time stamp and frame, then ``<end_video>``
(``modalities.video``); it joins the frames of one or more clips, 4 seconds up to what the row
holds, and keeps exactly one frame showing a word: the answer names the word and the second
it is shown, a video needle in a haystack. A text haystack hides 1 to 10 ``needles``
(key-value sentences) in real documents and asks for each value in turn (the evaluation
asks for one); an audio haystack hides one
spoken "The secret word is {word}." among read sentences (``audio_haystack``). A
demonstration is a post-training conversation (``modalities.conversation``) whose user turn
is out of the loss: supervised fine-tuning (SFT) is the mixture with this task alone, reading
``post_training``'s ``sft`` split (its ``eval`` split for the held-out loss). A task reads as
many records as it needs and draws its choices (lengths, depths, keys) from a seeded
generator, so every example is reproducible.
"""

import dataclasses
from types import ModuleType
from typing import Callable, Sequence

import numpy as np

from gemini_mini.data import (
  arithmetic,
  audio_haystack,
  examples,
  image_caption,
  needles,
  post_training,
  repeat,
  speech,
  text_corpus,
  video_clips,
)
from gemini_mini.data.examples import (
  Example,
  NextRecord,
  Room,
  answer,
  audio_frames,
  log_uniform,
)
from gemini_mini.modalities import conversation
from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities import video as video_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

MIN_HAYSTACK = 256      # positions of the shortest text haystack
MAX_NEEDLES = 10        # needles in one text haystack
MAX_LISTED_NEEDLES = 20  # needles in one needle list
MIN_VIDEO_SECONDS = 4
MAX_VIDEO_SECONDS = 64  # twice the video haystack target: longer rows hold several videos
VIDEO_OVERHEAD = 16     # positions of a video example besides its seconds (bos, brackets, answer)


def image_prompt(image_HWC, cue: str, tokenizer: Tokenizer) -> Example:
  """``<bos>`` image ``{cue}``, for an image as ``image.patchify`` accepts."""
  return [Segment.text([tokenizer.bos_id]), Segment.image(image_lib.patchify(image_HWC)),
          examples.text(tokenizer, cue)]


def caption_prompt(image_HWC, tokenizer: Tokenizer) -> Example:
  """``<bos>`` image ``Caption:``."""
  return image_prompt(image_HWC, 'Caption:', tokenizer)


def speech_prompt(samples_N, tokenizer: Tokenizer) -> Example:
  """``<bos>`` audio ``Transcript:``, for int16 16 kHz samples ``[N]``."""
  return [Segment.text([tokenizer.bos_id]), Segment.audio(audio_frames(samples_N)),
          examples.text(tokenizer, 'Transcript:')]


def video_prompt(frames_SHWC, tokenizer: Tokenizer) -> Example:
  """``<bos>`` video ``Word:``, for frames ``[S, H, W, C]`` at one frame a second."""
  return ([Segment.text([tokenizer.bos_id])] + video_lib.video_segments(frames_SHWC, 1.0, tokenizer)
          + [examples.text(tokenizer, 'Word:')])


def text_example(next_record: NextRecord, tokenizer: Tokenizer, rng, room: Room) -> Example:
  del rng, room  # a document is cut across rows when it is longer than one
  return [examples.text(tokenizer, examples.as_str(next_record()['text']), bos=True, eos=True)]


def caption_example(next_record: NextRecord, tokenizer: Tokenizer, rng, room: Room) -> Example:
  del rng, room
  record = next_record()
  caption = examples.as_str(record['caption'])
  return caption_prompt(record['image'], tokenizer) + [answer(caption, tokenizer)]


def speech_example(next_record: NextRecord, tokenizer: Tokenizer, rng, room: Room) -> Example:
  del rng, room
  record = next_record()
  transcript = examples.as_str(record['transcript'])
  return speech_prompt(record['audio'], tokenizer) + [answer(transcript, tokenizer)]


def haystack_prompt(filler_ids: np.ndarray, keys: list[str], values: list[str],
                    depths: list[float], asked: Sequence[int], tokenizer: Tokenizer) -> Example:
  """``<bos>`` filler with the needles hidden at ``depths``, then a question about each key in
  ``asked`` in turn (``needles``), each but the last followed by its value `` {value}``; the
  last question's answer is ``answer(values[asked[-1]])``."""
  hidden = needles.hide(filler_ids, [needles.needle_ids(key, value, tokenizer)
                                     for key, value in zip(keys, values)], depths)
  ids = [[tokenizer.bos_id], hidden]
  for i, index in enumerate(asked):
    ids.append(tokenizer.encode(needles.question(keys[index])))
    if i < len(asked) - 1:
      ids.append(tokenizer.encode(' ' + values[index]))
  return [Segment.text(np.concatenate(ids))]


def filler(next_record: NextRecord, tokenizer: Tokenizer, length: int) -> np.ndarray:
  """``length`` tokens of documents read with ``next_record``, separated by blank lines."""
  parts, total = [], 0
  while total < length:
    ids = tokenizer.encode(examples.as_str(next_record()['text']) + '\n\n')
    parts.append(ids)
    total += len(ids)
  return np.concatenate(parts)[:length] if parts else np.zeros(0, np.int32)


def _needle_positions(key: str, value: str, tokenizer: Tokenizer) -> int:
  """Positions one needle takes in a haystack prompt: its line, its question and its value."""
  return (len(needles.needle_ids(key, value, tokenizer))
          + len(tokenizer.encode(needles.question(key))) + len(tokenizer.encode(' ' + value)))


def haystack_example(next_record: NextRecord, tokenizer: Tokenizer, rng: np.random.Generator,
                     room: Room) -> Example:
  """A text haystack of 256 to ``room.positions`` positions, with 1 to ``MAX_NEEDLES``
  needles (at most one per 64 positions) at arcsine depths; the questions ask about every
  needle, in a random order (one retrieval per needle to learn from, where a single question
  would give one per haystack).

  Depths follow the arcsine distribution, Beta(1/2, 1/2): a fifth of the needles in the first
  tenth of the filler and a fifth in the last, a tenth each with uniform depths. A needle
  right before its question (the eval's depth 1) or right after ``<bos>`` (depth 0) was
  rare in training and recalled worst; arcsine depths train both ends, and raised recall
  at every depth (docs/retrieval.md#haystack-lengths-and-depths).

  The length is log-uniform (``examples.log_uniform``): as many haystacks of 256-512
  positions as of 1,024-2,048. Short ones teach retrieval fastest and pack several to a row;
  haystacks filling the whole row, for longer needle-to-question distances, made recall
  worse (docs/retrieval.md#haystack-lengths-and-depths)."""
  shortest = min(MIN_HAYSTACK, room.positions)
  total = log_uniform(rng, shortest, room.positions)
  count = int(rng.integers(1, max(1, min(MAX_NEEDLES, total // 64)) + 1))
  keys = needles.draw_keys(rng, 'train', count)
  values = [needles.draw_value(rng) for _ in keys]
  asked = [int(i) for i in rng.permutation(count)]
  reply = answer(values[asked[-1]], tokenizer)
  fixed = 2 + sum(_needle_positions(key, value, tokenizer)  # 2: bos and eos
                  for key, value in zip(keys, values))
  haystack = filler(next_record, tokenizer, max(total - fixed, 0))
  return haystack_prompt(haystack, keys, values, list(rng.beta(0.5, 0.5, count)), asked,
                         tokenizer) + [reply]


def video_example(next_record: NextRecord, tokenizer: Tokenizer, rng: np.random.Generator,
                  room: Room) -> Example:
  """A video of 4 to as many seconds as the row holds (uniform, at most ``MAX_VIDEO_SECONDS``):
  the word frame of one clip at a uniform second, among frames of that and further clips
  (their own word frames left out)."""
  most = min((room.positions - VIDEO_OVERHEAD) // video_lib.POSITIONS_PER_SECOND,
             room.patches // image_lib.PATCHES_PER_IMAGE, MAX_VIDEO_SECONDS)
  seconds = int(rng.integers(min(MIN_VIDEO_SECONDS, most), most + 1)) if most > 0 else 1
  first = next_record()
  word, needle = examples.as_str(first['word']), first['frames'][int(first['word_second'])]
  frames, record = [], first
  while True:
    frames += [frame for i, frame in enumerate(record['frames'])
               if i != int(record['word_second'])]
    if len(frames) >= seconds - 1:
      break
    record = next_record()
  second = int(rng.integers(seconds))
  frames = frames[:seconds - 1]
  frames.insert(second, needle)
  return video_prompt(np.stack(frames), tokenizer) + [answer(word, tokenizer, time_stamp=second)]


def word_frame_example(next_record: NextRecord, tokenizer: Tokenizer, rng, room: Room) -> Example:
  """A clip's word frame alone, about 25 positions: the recognition step of the video task,
  dozens to a row where a video gives one (docs/retrieval.md#video-haystack)."""
  del rng, room
  record = next_record()
  frame = record['frames'][int(record['word_second'])]
  word = examples.as_str(record['word'])
  return image_prompt(frame, 'Word:', tokenizer) + [answer(word, tokenizer)]  # the video's cue


def needle_list_example(next_record: NextRecord, tokenizer: Tokenizer, rng: np.random.Generator,
                        room: Room) -> Example:
  """2 to ``MAX_LISTED_NEEDLES`` needles (as many as the row holds) with no filler between
  them, then a question about each in a random order: a text haystack reduced to its
  key-matching step. In a haystack most positions are filler and most haystacks hold 1-4
  needles, where answering with any needle's value is often right; here every answer's first
  digit needs the asked key (docs/retrieval.md#multi-needle)."""
  del next_record
  count = int(rng.integers(2, MAX_LISTED_NEEDLES + 1))
  keys = needles.draw_keys(rng, 'train', count)
  values = [needles.draw_value(rng) for _ in keys]
  sizes = [_needle_positions(key, value, tokenizer) for key, value in zip(keys, values)]
  count = max(1, min(count, int(np.searchsorted(np.cumsum(sizes) + 2, room.positions,
                                                side='right'))))
  asked = [int(i) for i in rng.permutation(count)]
  return haystack_prompt(np.zeros(0, np.int32), keys[:count], values[:count], [0.0] * count,
                         asked, tokenizer) + [answer(values[asked[-1]], tokenizer)]


def demonstration_example(next_record: NextRecord, tokenizer: Tokenizer, rng,
                          room: Room) -> Example:
  """A ``post_training`` item's conversation with its SFT demonstration as the reply."""
  del rng, room
  item = next_record()  # post_training's records are Items
  return conversation.conversation(item.user_segments(tokenizer), item.demonstration, tokenizer)


@dataclasses.dataclass(frozen=True)
class Task:
  """One entry of the mixture.

  Attributes:
    name: the task's name, its key in the config's ``data.weights``.
    dataset: the module of the prepared dataset it reads (``text_corpus``, ...; see
      ``prepare``), or None for a task that generates its examples (``arithmetic``).
    make_example: ``make_example(next_record, tokenizer, rng, room)`` -> one example, reading
      as many records as it needs with ``next_record()``, drawing its random choices from
      ``rng`` and fitting in ``room`` (except a cuttable document).
    cuttable: whether an example may be cut across rows (plain text); others are packed
      whole or, when they can never fit a row, skipped and counted.
  """

  name: str
  dataset: ModuleType | None
  make_example: Callable[[NextRecord, Tokenizer, np.random.Generator, Room], Example]
  cuttable: bool = False


# The order is part of the data stream (task i's shuffle seed): append, never reorder.
TASKS = (
    Task('text', text_corpus, text_example, cuttable=True),
    Task('caption', image_caption, caption_example),
    Task('speech', speech, speech_example),
    Task('video', video_clips, video_example),
    Task('haystack', text_corpus, haystack_example),
    Task('arithmetic', None, arithmetic.arithmetic_example),
    Task('audio_haystack', audio_haystack, audio_haystack.audio_haystack_example),
    Task('repeat', None, repeat.repeat_example),
    Task('word_frame', video_clips, word_frame_example),
    Task('keyword', audio_haystack, audio_haystack.keyword_example),
    Task('needle_list', None, needle_list_example),
    Task('demonstrations', post_training, demonstration_example),
)
TASK_NAMES = tuple(task.name for task in TASKS)
