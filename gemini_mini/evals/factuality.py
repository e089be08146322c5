"""Factuality suite: held-out post-training questions answered greedily and judged by the gold
judge, the measure of the Gemini report's post-training result (fewer non-factual answers,
more answers attributable to the source).

Items: the first ``eval.factuality_items`` of ``post_training``'s held-out ``eval`` split, in
order (``data.preferences.PromptStream``): half of the document, word-image and keyword-audio
questions are unanswerable (the source does not hold the answer), captions, transcripts and
sums are always answerable. Each reply is judged by ``post_training.judge``.

How a run is prompted depends on its ``train.stage``:

* ``sft``, ``rlhf``, ``dpo``: the conversation (``conversation.prompt`` of the item's user
  turn), generation stopping at ``<end_of_turn>`` (``conversation.stop_ids``); the generated
  text is the reply.
* ``pretrain``: the *pre-trained model prompted zero-shot* baseline. It has never seen a
  conversation token, so each item is asked in the format its pretraining task taught, and
  generation stops at ``<eos>``, where those answers end. The continuation completes an
  answer whose opening the format fixes; the judge reads that opening, a space, then the
  continuation (``zero_shot``):

  - ``document``: ``<bos>`` the document with its needles, then ``needles.question(key)``
    (``\\nQuestion: What is the special magic number for {key}?\\nAnswer: The special magic
    number for {key} is``), as in the haystack task; judged: ``The special magic number for
    {key} is`` continuation.
  - ``word_image``: ``tasks.image_prompt(frame, 'Word:')``, ``<bos>`` image ``Word:`` (the
    word frame task); judged: ``The word is`` continuation.
  - ``keyword_audio``: ``audio_haystack.keyword_prompt(audio)``, ``<bos>`` audio ``Secret
    word:`` (the keyword task); judged: ``The secret word is`` continuation.
  - ``caption``: ``tasks.caption_prompt(image)``, ``<bos>`` image ``Caption:``; judged: ``The
    image shows`` continuation.
  - ``transcript``: ``tasks.speech_prompt(audio)``, ``<bos>`` audio ``Transcript:``; judged:
    the continuation.
  - ``sum``: ``arithmetic.arithmetic_prompt``, ``<bos>Question: {a} + {b} = ?\\nAnswer:``;
    judged: the continuation (a chain of thought ending ``The answer is {c}.``).

  These formats have no way to say that the source lacks the answer: a pre-trained model
  never refuses, and its hallucination rate is how often it invents an answer when asked
  about something absent, which is what post-training has to bring down.
* ``reward``: skipped (a reward model's scalar head is trained, not its replies).

Figures, overall and per kind and per modality (text, image, audio) (``rates``): the counts
(``items``, ``answerable``, ``unanswerable``); on answerable items ``recall`` (judged
correct), ``over_refusal`` (says the source lacks the answer) and ``answerable_hallucination``
(claims a wrong value or word); on unanswerable items ``hallucination`` (claims a value or
word where the source has none) and ``unanswerable_correct`` (refuses and claims nothing);
``mean_score`` (the judge's score). A rate over no items is null. Writes ``factuality.json``
(``items``: each item's kind, modality, whether answerable and confusable, reference,
reply and verdict) and ``factuality_rates.png``.
"""

import itertools
import pathlib
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from gemini_mini.data import arithmetic, audio_haystack, needles, post_training, prepare
from gemini_mini.data import tasks as tasks_lib
from gemini_mini.data import video_clips
from gemini_mini.data.preferences import PromptStream
from gemini_mini.evals import common
from gemini_mini.infer.load import Loaded
from gemini_mini.modalities import conversation
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

SUITE = 'factuality'
MAX_NEW_TOKENS = post_training.MAX_REPLY_TOKENS + 10  # every reference reply, with slack
CONVERSATION_STAGES = ('sft', 'rlhf', 'dpo')
# The opening of the answer a pretraining format fixes (see the module docstring).
ZERO_SHOT_OPENINGS = {'document': 'The special magic number for {key} is',
                      'word_image': 'The word is', 'keyword_audio': 'The secret word is',
                      'caption': 'The image shows', 'transcript': '', 'sum': ''}
# What the post-training items need prepared: the task that reads them.
DATASETS = {'demonstrations': 1.0}


def rates(answerable: Sequence[bool], verdicts: Sequence[post_training.Verdict]) -> dict:
  """The figures of one group of items (see the module docstring)."""
  if len(answerable) != len(verdicts):
    raise ValueError(f'{len(answerable)} answerable flags for {len(verdicts)} verdicts; pass '
                     'one of each per item')
  asked = [v for a, v in zip(answerable, verdicts) if a]
  absent = [v for a, v in zip(answerable, verdicts) if not a]
  share = lambda flags: float(np.mean(flags)) if flags else None
  return {'items': len(verdicts), 'answerable': len(asked), 'unanswerable': len(absent),
          'recall': share([v.correct for v in asked]),
          'over_refusal': share([v.refused for v in asked]),
          'answerable_hallucination': share([v.hallucinated for v in asked]),
          'hallucination': share([v.hallucinated for v in absent]),
          'unanswerable_correct': share([v.correct for v in absent]),
          'mean_score': share([v.score for v in verdicts])}


def grouped_rates(items: Sequence[post_training.Item],
                  verdicts: Sequence[post_training.Verdict]) -> dict:
  """``{'overall', 'by_kind': {kind: ...}, 'by_modality': {modality: ...}}`` of ``rates``,
  kinds in ``post_training.KINDS`` order and modalities text, image, audio, those present."""
  def group(name_of, names) -> dict:
    return {name: rates([item.answerable for item, _ in chosen], [v for _, v in chosen])
            for name in names
            if (chosen := [(item, v) for item, v in zip(items, verdicts) if name_of(item) == name])}
  return {'overall': rates([item.answerable for item in items], verdicts),
          'by_kind': group(lambda item: item.kind, post_training.KINDS),
          'by_modality': group(lambda item: item.modality, ('text', 'image', 'audio'))}


def held_out(loaded: Loaded, count: int) -> list[tuple[list[Segment], post_training.Item]]:
  """The first ``count`` items of the ``eval`` split (all when there are fewer), with their
  conversation prompts; prepares the post-training items first when they are missing."""
  data = loaded.config.data
  prepare.ensure(data.dir, data.subset, DATASETS)
  stream = PromptStream(data.dir, 'eval', batch_size=loaded.config.eval.batch_size, seed=0,
                        subset=data.subset)
  return list(itertools.islice(itertools.chain.from_iterable(stream), count))


def _problem(question: str) -> arithmetic.Problem:
  """The sum of a ``sum`` item's question, ``What is 23 + 45?``."""
  parts = question.removeprefix('What is ').removesuffix('?').split()
  return arithmetic.Problem(tuple(int(n) for n in parts[::2]), tuple(parts[1::2]))


def zero_shot(item: post_training.Item, tokenizer: Tokenizer) -> tuple[list[Segment], str]:
  """``(prompt, opening)``: ``item`` asked in its pretraining format and the opening of the
  answer that format fixes (see the module docstring); the judged reply is
  ``judged_reply(opening, continuation)``."""
  opening = ZERO_SHOT_OPENINGS[item.kind].format(key=item.key)
  if item.kind == 'document':
    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(item.context),
                          tokenizer.encode(needles.question(item.key))])
    return [Segment.text(ids)], opening
  if item.kind == 'sum':
    return arithmetic.arithmetic_prompt(_problem(item.question), tokenizer), opening
  media = item.media
  record = post_training.open_source(item.data_dir, item.subset, media.dataset,
                                     media.split)[media.index]
  if item.kind == 'word_image':
    if media.dataset != video_clips.NAME:
      raise ValueError(f'word_image item {item.index} shows {media.dataset}; expected a frame '
                       f'of {video_clips.NAME}')
    return tasks_lib.image_prompt(record['frames'][media.frame], 'Word:', tokenizer), opening
  if item.kind == 'keyword_audio':
    return audio_haystack.keyword_prompt(record['audio'], tokenizer), opening
  if item.kind == 'caption':
    return tasks_lib.caption_prompt(record['image'], tokenizer), opening
  return tasks_lib.speech_prompt(record['audio'], tokenizer), opening


def judged_reply(opening: str, continuation: str) -> str:
  """The reply a zero-shot continuation amounts to: the opening, a space, the continuation."""
  return f'{opening} {continuation.strip()}'.strip()


def conversation_replies(loaded: Loaded, prompts: Sequence[list[Segment]],
                         tokenizer: Tokenizer) -> list[str]:
  """Greedy replies to conversation prompts, stopping at ``<end_of_turn>``."""
  return [generation.text.strip() for generation in common.generate_all(
      loaded, prompts, tokenizer, max_new_tokens=MAX_NEW_TOKENS,
      stop_ids=conversation.stop_ids(tokenizer))]


def replies(loaded: Loaded, prompted: Sequence[tuple[list[Segment], post_training.Item]],
            tokenizer: Tokenizer) -> tuple[list[str], str]:
  """``(replies, prompt_format)``: the loaded run's greedy replies, in the format its stage
  reads (see the module docstring)."""
  if loaded.config.train.stage == 'pretrain':
    asked = [zero_shot(item, tokenizer) for _, item in prompted]
    generations = common.generate_all(loaded, [prompt for prompt, _ in asked], tokenizer,
                                      max_new_tokens=MAX_NEW_TOKENS)  # stops at eos
    return ([judged_reply(opening, generation.text)
             for (_, opening), generation in zip(asked, generations)], 'pretraining zero-shot')
  return conversation_replies(loaded, [prompt for prompt, _ in prompted], tokenizer), 'conversation'


def skip_reason(stage: str) -> str | None:
  """Why a run of ``stage`` is not evaluated here, or None when it is."""
  if stage == 'pretrain' or stage in CONVERSATION_STAGES:
    return None
  return (f'train.stage={stage} (a reward model scores replies, it is not trained to '
          'write them); evaluate the sft, rlhf, dpo or pretrain run')


def plot(figures: dict, path: pathlib.Path, *, step: int) -> None:
  """Recall, hallucination and over-refusal, overall and per modality."""
  groups = {'all': figures['overall'], **figures['by_modality']}
  names = ('recall', 'hallucination', 'over_refusal')
  figure, axes = plt.subplots(figsize=(7, 4))
  x = np.arange(len(groups))
  for offset, name in zip((-0.27, 0, 0.27), names):
    values = [np.nan if scores[name] is None else scores[name] for scores in groups.values()]
    axes.bar_label(axes.bar(x + offset, values, 0.27, label=name.replace('_', '-')),
                   fmt='%.2f', fontsize=7)
  axes.set_xticks(x, [f'{name}\n({scores["answerable"]} + {scores["unanswerable"]})'
                      for name, scores in groups.items()])
  axes.set(ylim=(0, 1.05), ylabel='rate',
           title=f'Held-out factuality, {figures["prompt_format"]}, {figures["stage"]} '
                 f'(step {step})\n(answerable + unanswerable items)')
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def run(loaded: Loaded, out_dir) -> dict:
  """Answers and judges the held-out items, writes the JSON and the plot; returns the
  figures, or ``{'skipped': reason}`` for a reward run."""
  stage = loaded.config.train.stage
  reason = skip_reason(stage)
  if reason is not None:
    return {'skipped': reason}
  skipped = common.skip_for_text_only(loaded, 'conversation turns')
  if skipped:
    return skipped
  tokenizer = loaded.tokenizer
  prompted = held_out(loaded, loaded.config.eval.factuality_items)
  answers, prompt_format = replies(loaded, prompted, tokenizer)
  items = [item for _, item in prompted]
  verdicts = [post_training.judge(item, reply) for item, reply in zip(items, answers)]
  figures = {'stage': stage, 'prompt_format': prompt_format, 'max_new_tokens': MAX_NEW_TOKENS,
             **grouped_rates(items, verdicts)}
  records = [{'index': item.index, 'kind': item.kind, 'modality': item.modality,
              'answerable': item.answerable, 'confusable': item.confusable,
              'reference': item.reference, 'reply': reply, 'verdict': verdict._asdict()}
             for item, reply, verdict in zip(items, answers, verdicts)]
  common.write_result(out_dir, SUITE, loaded, figures, records)
  plot(figures, pathlib.Path(out_dir) / f'{SUITE}_rates.png', step=loaded.step)
  return figures
