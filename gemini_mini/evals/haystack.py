"""Needle in a haystack over haystack length x needle depth, in text, video and audio.

As in the Gemini 1.5 report's haystack figures: per modality, a grid of lengths (x) and
depths (y; 0 = the needle opens the haystack, 1 = it closes it), ``eval.trials`` items per
cell, each with one needle, answered greedily; a heatmap of the recall per cell.

========  ================================  =================================  ==============
modality  haystack, one per length x trial  needle, one per item               correct iff
========  ================================  =================================  ==============
text      King James Bible prose (never     ``The special magic number for     the first
          trained on) from a random         {key} is {value}.``, a fresh eval  generated word
          offset: ``eval.context_lengths``  key (``needles``), before prose    is the value
          positions in all                  token ``round(d * L)``
video     ``eval.video_seconds`` frames at  the word frame (``render_word_     the first word
          1 fps of the eval clips' shots    frame``) of a random word over     is the word;
          (unseen emoji), their own word    second ``round(d * (S - 1))``      the time stamp
          frames left out                                                      is scored apart
audio     ``eval.audio_seconds`` of eval    ``The secret word is {word}.`` by  the first word
          sentences read by unseen voices   an unseen voice, at frame          is the word
          (``speech``), back to back        ``round(d * F)`` of F filler ones
========  ================================  =================================  ==============

Prompts are the training tasks' (``tasks.haystack_prompt``, ``tasks.video_prompt``,
``audio_haystack.audio_haystack_prompt``), so formats never drift. A length counts the whole
prompt, needle included (text: positions; video and audio: seconds), and the items of one
length and trial share their haystack: neighbouring cells differ by the depth alone.

A length whose prompts plus answer exceed ``model.max_length`` (or, text, whose needle and
question alone exceed it; video, past the last time stamp) is skipped with a printed note,
its cells null. Lengths past what a training row holds (``train.seq_len`` positions,
``data.num_patches``, ``data.num_audio_frames``) are evaluated, since extrapolating is what
a long-context eval measures, and flagged: ``*`` on the heatmap, ``within_training_row``.

Beside the greedy answer, each item's answer is also read teacher-forced
(``common.answer_hits``): for each of its pieces, whether the most likely next piece given the
prompt and the answer's pieces before it is that piece. Recall needs every piece of the first
word right; these hits show which pieces a model has learnt (text: the space piece, then the
value's digits one by one) when recall is still low.

Writes ``haystack.json``: figures ``{modality: {'recall' (over every scored item), 'cells':
{length: {depth: recall} or null}, 'within_training_row': {length: bool or null},
'answer_piece_accuracy' (teacher-forced hits over every answer piece, ``<eos>`` included),
'answer_piece_accuracy_by_index' ([piece i's hit rate over the items whose answer has one])}}``,
video's also with ``time_stamp_accuracy`` and ``time_stamp_cells`` (whether the generated
``<t=Ns>`` names the word's second); items: every prompt's needle, generation, score and
``answer_hits``. Plots ``haystack_text.png``, ``haystack_video.png`` and
``haystack_audio.png``.
"""

import itertools
import pathlib
from typing import Callable, NamedTuple, Sequence

import numpy as np
from matplotlib import pyplot as plt

from gemini_mini.data import audio_haystack, needles, prepare, speech, tasks, video_clips
from gemini_mini.data.examples import as_str
from gemini_mini.evals import common
from gemini_mini.infer.generate import Generation
from gemini_mini.infer.load import Loaded
from gemini_mini.modalities import interleave
from gemini_mini.modalities import video as video_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

SUITE = 'haystack'
MODALITIES = ('text', 'video', 'audio')
UNITS = {'text': 'positions', 'video': 'seconds', 'audio': 'seconds'}
ANSWER_SLACK = 4  # generated tokens beyond the reference answer's (its <eos> included)
SECONDS_PER_FRAME = audio_haystack.FRAME_SAMPLES / speech.SAMPLE_RATE  # 0.04


class Item(NamedTuple):
  """One prompt and what should come of it.

  Attributes:
    prompt: the segments given to the model.
    answer: the reference answer as training writes it (``tasks.answer``), ``<eos>`` included.
    reference: what the first generated word must be (the value or the word).
    record: its JSON fields: ``depth`` and the needle's (key and value; word, second and
      emoji; word, voice and start).
  """

  prompt: list[Segment]
  answer: Segment
  reference: str
  record: dict


def answer_word(text: str) -> str:
  """The first word of a generation after ``common.normalize`` (``''`` if none): what is
  compared with the needle's value or word, so a missing ``<eos>`` or trailing text is
  forgiven but not a wrong or partial answer."""
  words = common.normalize(text).split()
  return words[0] if words else ''


def time_stamp_of(tokens, tokenizer: Tokenizer) -> int | None:
  """The second of the first ``<t=Ns>`` id among generated ``tokens``, or None."""
  seconds = {tokenizer.time_stamp_id(second): second for second in range(video_lib.MAX_SECONDS)}
  for token in np.asarray(tokens).reshape(-1):
    if int(token) in seconds:
      return seconds[int(token)]
  return None


def text_items(prose_ids: np.ndarray, length: int, depths: Sequence[float],
               rng: np.random.Generator, tokenizer: Tokenizer) -> list[Item]:
  """One item per depth, each ``length`` positions of one passage of ``prose_ids`` (from a
  random offset) with a needle of a fresh eval key, or more when needle and question
  alone take more; ``record['needle_position']`` is where the needle starts."""
  start = int(rng.integers(max(len(prose_ids) - length, 0) + 1))
  items = []
  for depth in depths:
    key, value = needles.draw_keys(rng, 'eval', 1)[0], needles.draw_value(rng)
    fixed = (1 + len(needles.needle_ids(key, value, tokenizer))
             + len(tokenizer.encode(needles.question(key))))
    prose = prose_ids[start:start + max(length - fixed, 0)]
    items.append(Item(tasks.haystack_prompt(prose, [key], [value], [depth], [0], tokenizer),
                      tasks.answer(value, tokenizer), value,
                      {'depth': depth, 'key': key, 'value': value,
                       'needle_position': 1 + int(round(depth * len(prose)))}))
  return items


def _cycle(rng: np.random.Generator, count: int):
  """Indices ``0 .. count - 1`` in random order, again in a new order, forever."""
  return itertools.chain.from_iterable(rng.permutation(count) for _ in itertools.count())


def video_items(clips: Sequence[dict], seconds: int, depths: Sequence[float],
                rng: np.random.Generator, tokenizer: Tokenizer) -> list[Item]:
  """One item per depth: ``seconds`` frames of ``clips`` (eval clip records) in random order
  without their word frames, then a random word drawn over second ``round(d * (S - 1))``."""
  frames, emoji = [], ''
  for index in _cycle(rng, len(clips)):
    if len(frames) >= seconds:
      break
    clip = clips[index]
    frames += [frame for i, frame in enumerate(clip['frames']) if i != int(clip['word_second'])]
    emoji += as_str(clip['emoji'])
  items = []
  for depth in depths:
    word = video_clips.WORDS[rng.integers(len(video_clips.WORDS))]
    second = int(round(depth * (seconds - 1)))
    shown = np.stack(frames[:seconds])
    shown[second] = video_clips.render_word_frame(word, shown[second])
    items.append(Item(tasks.video_prompt(shown, tokenizer),
                      tasks.answer(word, tokenizer, time_stamp=second), word,
                      {'depth': depth, 'word': word, 'second': second, 'emoji': emoji}))
  return items


def audio_items(sentences: Sequence[np.ndarray], keywords: Sequence[tuple[str, np.ndarray, str]],
                seconds: int, depths: Sequence[float], rng: np.random.Generator,
                tokenizer: Tokenizer) -> list[Item]:
  """One item per depth: ``seconds`` of ``sentences`` (int16 clips) in random order, in which
  a random keyword utterance (``(word, samples, voice)``) takes the place of filler at
  the depth; when the keyword alone is longer, the item is the keyword alone."""
  frames = int(round(seconds / SECONDS_PER_FRAME))
  haystack_N = audio_haystack.filler((sentences[i] for i in _cycle(rng, len(sentences))),
                                     frames * audio_haystack.FRAME_SAMPLES)
  items = []
  for depth in depths:
    word, keyword_K, voice = keywords[rng.integers(len(keywords))]
    keyword_frames = audio_haystack.frames_of(len(keyword_K))
    filler_N = haystack_N[:max(frames - keyword_frames, 0) * audio_haystack.FRAME_SAMPLES]
    samples_M, start = audio_haystack.hide(filler_N, keyword_K, depth)
    items.append(Item(audio_haystack.audio_haystack_prompt(filler_N, keyword_K, depth, tokenizer),
                      tasks.answer(word, tokenizer), word,
                      {'depth': depth, 'word': word, 'voice': voice,
                       'keyword_start_s': round(start * SECONDS_PER_FRAME, 2),
                       'seconds': round(len(samples_M) / speech.SAMPLE_RATE, 2)}))
  return items


def max_new_tokens(items: Sequence[Item]) -> int:
  return max(len(item.answer.data) for item in items) + ANSWER_SLACK


def generate(loaded: Loaded, items: Sequence[Item], tokenizer: Tokenizer) -> list[Generation]:
  """Greedy continuations of the items' prompts, up to their answer and ``ANSWER_SLACK``."""
  return common.generate_all(loaded, [item.prompt for item in items], tokenizer,
                             max_new_tokens=max_new_tokens(items))


def fits(loaded: Loaded, items: Sequence[Item], tokenizer: Tokenizer) -> tuple[int, bool]:
  """``(positions, within_training_row)``: the most positions an item takes, answer and
  slack included (which must not exceed ``model.max_length``), and whether every item
  would fit one training row (``train.seq_len``, ``data.num_patches``,
  ``data.num_audio_frames``)."""
  config = loaded.config
  flats = [interleave.flatten(item.prompt, tokenizer) for item in items]
  positions = max(len(flat.tokens) for flat in flats) + max_new_tokens(items)
  within = (positions - ANSWER_SLACK <= config.train.seq_len
            and all(len(flat.patches) <= config.data.num_patches
                    and len(flat.audio) <= config.data.num_audio_frames for flat in flats))
  return positions, within


class Haystacks(NamedTuple):
  """What the haystacks are made of: the prepared data's held-out parts.

  Attributes:
    prose_ids: the King James Bible as ids ``[N] int32`` (``common.bible_ids``).
    clips: the video clips' ``eval`` records (unseen emoji).
    sentences: the speech ``eval`` split's audio, int16 ``[N]`` each (unseen voices).
    keywords: ``(word, samples, voice)`` of each ``keywords_eval`` utterance.
  """

  prose_ids: np.ndarray
  clips: list[dict]
  sentences: list[np.ndarray]
  keywords: list[tuple[str, np.ndarray, str]]


def load_haystacks(data_dir: str, subset: str, tokenizer: Tokenizer) -> Haystacks:
  """Reads ``Haystacks`` from ``data_dir``, building the datasets that are missing."""
  clips = prepare.ensure_dataset(video_clips, data_dir, subset).as_data_source('eval')
  voices = prepare.ensure_dataset(speech, data_dir, subset)
  return Haystacks(
      common.bible_ids(data_dir, subset, tokenizer), [clips[i] for i in range(len(clips))],
      [record['audio'] for record in voices.as_data_source('eval')],
      [(speech.keyword_of(as_str(record['transcript'])), record['audio'], as_str(record['voice']))
       for record in voices.as_data_source('keywords_eval')])


def _makers(loaded: Loaded, tokenizer: Tokenizer) -> dict[str, tuple[Sequence[int], Callable]]:
  """Modality -> (its lengths, ``make(length, rng)`` -> the items of one trial)."""
  settings, data = loaded.config.eval, loaded.config.data
  stacks, depths = load_haystacks(data.dir, data.subset, tokenizer), settings.depths
  return {
      'text': (settings.context_lengths, lambda length, rng: text_items(
          stacks.prose_ids, length, depths, rng, tokenizer)),
      'video': (settings.video_seconds, lambda seconds, rng: video_items(
          stacks.clips, seconds, depths, rng, tokenizer)),
      'audio': (settings.audio_seconds, lambda seconds, rng: audio_items(
          stacks.sentences, stacks.keywords, seconds, depths, rng, tokenizer))}


def _skip_reason(loaded: Loaded, modality: str, length: int, items: Sequence[Item],
                 positions: int) -> str:
  """Why a length cannot be measured, or ``''``."""
  max_length = loaded.config.model.max_length
  if positions > max_length:
    return (f'prompts and answers take {positions} positions, more than model.max_length='
            f'{max_length}')
  if modality == 'text' and positions - max_new_tokens(items) > length:
    return f'the needle and question alone take more than {length} positions'
  return ''


def _score(modality: str, item: Item, generation: Generation, tokenizer: Tokenizer) -> dict:
  """The item's JSON record: its needle, the generation and whether it is right."""
  record = {**item.record, 'generation': generation.text,
            'correct': answer_word(generation.text) == common.normalize(item.reference)}
  if modality == 'video':
    record['time_stamp'] = time_stamp_of(generation.tokens, tokenizer)
    record['time_stamp_correct'] = record['time_stamp'] == item.record['second']
  return record


def _measure(loaded: Loaded, modality: str, length: int, make: Callable,
             tokenizer: Tokenizer) -> tuple[bool | None, list[dict]]:
  """``(within_training_row, records)`` of one length's items; ``(None, [])`` if skipped."""
  settings = loaded.config.eval
  if modality == 'video' and length > video_lib.MAX_SECONDS:
    reason = f'time stamps stop at {video_lib.MAX_SECONDS - 1} s'
  else:
    items = [item for trial in range(settings.trials) for item in make(
        length, np.random.default_rng([settings.seed, MODALITIES.index(modality), length, trial]))]
    positions, within = fits(loaded, items, tokenizer)
    reason = _skip_reason(loaded, modality, length, items, positions)
  if reason:
    print(f'haystack: {modality} at {length} {UNITS[modality]} skipped (null): {reason}',
          flush=True)
    return None, []
  generations = generate(loaded, items, tokenizer)
  hits = common.answer_hits(loaded, [(item.prompt, item.answer) for item in items], tokenizer)
  return within, [{'modality': modality, 'length': length,
                   'trial': index // len(settings.depths),
                   **_score(modality, item, generation, tokenizer),
                   'answer_hits': [bool(hit) for hit in item_hits]}
                  for index, (item, generation, item_hits)
                  in enumerate(zip(items, generations, hits))]


def _mean(values) -> float | None:
  values = list(values)
  return float(np.mean(values)) if values else None


def piece_accuracy(hits: Sequence[Sequence[bool]]) -> dict:
  """``answer_piece_accuracy`` (over every piece of every answer) and
  ``answer_piece_accuracy_by_index`` (entry i over the answers with a piece i); None and []
  without answers."""
  longest = max((len(item_hits) for item_hits in hits), default=0)
  return {'answer_piece_accuracy': _mean(hit for item_hits in hits for hit in item_hits),
          'answer_piece_accuracy_by_index': [
              _mean(item_hits[i] for item_hits in hits if len(item_hits) > i)
              for i in range(longest)]}


def run(loaded: Loaded, out_dir: str | pathlib.Path) -> dict:
  """Runs every modality at every length and depth, writes the JSON and the heatmaps,
  returns the figures (see the module docstring)."""
  depths = loaded.config.eval.depths
  tokenizer = loaded.tokenizer
  figures, records = {}, []
  makers = _makers(loaded, tokenizer)
  if not tokenizer.multimodal:  # another model's tokenizer: text alone
    figures = {modality: common.skip_for_text_only(loaded, f'{modality} placeholders')
               for modality in makers if modality != 'text'}
    makers = {'text': makers['text']}
  for modality, (lengths, make) in makers.items():
    scores = ['correct', 'time_stamp_correct'] if modality == 'video' else ['correct']
    cells = {score: {} for score in scores}
    within_training_row, scored = {}, []
    for length in lengths:
      within, new = _measure(loaded, modality, length, make, tokenizer)
      within_training_row[str(length)] = within
      for score in scores:  # {depth: mean score}, or None for a skipped length
        cells[score][str(length)] = None if within is None else {
            str(depth): _mean(r[score] for r in new if r['depth'] == depth) for depth in depths}
      scored += new
    figures[modality] = {'recall': _mean(r['correct'] for r in scored),
                         'cells': cells['correct'],
                         'within_training_row': within_training_row,
                         **piece_accuracy([r['answer_hits'] for r in scored])}
    if modality == 'video':
      figures[modality]['time_stamp_accuracy'] = _mean(r['time_stamp_correct'] for r in scored)
      figures[modality]['time_stamp_cells'] = cells['time_stamp_correct']
    records += scored
  common.write_result(out_dir, SUITE, loaded, figures, records)
  for modality, summary in figures.items():
    if 'skipped' in summary:
      continue
    _plot(modality, summary, loaded.config.eval,
          pathlib.Path(out_dir) / f'{SUITE}_{modality}.png', loaded.step)
  return figures


def _plot(modality: str, summary: dict, settings, path: pathlib.Path, step: int) -> None:
  """The Gemini 1.5 report's heatmap: length on x, depth on y (top: 0%), recall as colour
  from red (missed) to green (found); skipped lengths grey, ``*`` marks lengths longer
  than a training row."""
  lengths, depths = list(summary['cells']), settings.depths
  recall_DL = np.array([[np.nan if summary['cells'][length] is None
                         else summary['cells'][length][str(depth)] for length in lengths]
                        for depth in depths], np.float64)
  colours = plt.get_cmap('RdYlGn').with_extremes(bad='lightgrey')
  figure, axes = plt.subplots(figsize=(max(6.0, 2.5 + 0.8 * len(lengths)),
                                       1.8 + 0.45 * len(depths)))
  image = axes.imshow(np.ma.masked_invalid(recall_DL), cmap=colours, vmin=0, vmax=1,
                      aspect='auto')
  for (row, column), value in np.ndenumerate(recall_DL):
    axes.text(column, row, 'n/a' if np.isnan(value) else f'{value:.2f}', ha='center',
              va='center', fontsize=8)
  beyond = [summary['within_training_row'][length] is False for length in lengths]
  axes.set_xticks(range(len(lengths)), [length + '*' * flag for length, flag in
                                        zip(lengths, beyond)])
  axes.set_yticks(range(len(depths)), [f'{depth:.0%}' for depth in depths])
  axes.set_xlabel(f'haystack length ({UNITS[modality]})'
                  + ('\n* longer than a training row' if any(beyond) else ''))
  axes.set_ylabel('needle depth')
  scores = [f'recall {_percent(summary["recall"])}',
            f'teacher-forced answer pieces {_percent(summary["answer_piece_accuracy"])}']
  if 'time_stamp_accuracy' in summary:
    scores.append(f'time stamp {_percent(summary["time_stamp_accuracy"])}')
  axes.set_title(f'{modality} needle in a haystack, step {step}\n{", ".join(scores)}; '
                 f'{settings.trials} items per cell', fontsize=10)
  figure.colorbar(image, ax=axes, label='recall')
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def _percent(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:.0%}'
