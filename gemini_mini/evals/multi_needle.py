"""Multi-needle retrieval: many needles in one text context, each asked about in turn.

As in the Gemini 1.5 report's multiple-needle test: at each of ``eval.context_lengths``,
``eval.trials`` contexts of King James Bible prose (never trained on, from random offsets)
each hide ``eval.num_needles`` needles ``The special magic number for {key} is {value}.``
with distinct eval keys (``needles``) at uniform random depths. Every needle gets its own
prompt: the same context, then the question about its key (``tasks.haystack_prompt``, the
training format). A needle is retrieved iff the first word of the greedy answer is its
value (``haystack.answer_word``). A context length counts the prompt's positions with the
longest of its questions; a length that cannot hold the needles and a question, or whose
prompts plus answer exceed ``model.max_length``, is skipped with a printed note (null).

Writes ``multi-needle.json``: figures ``{'recall' (over all scored needles), 'by_length':
{length: fraction retrieved or null}, 'other_needle', 'other_needle_by_length',
'distinct_answers'}``, where ``other_needle`` is the fraction of questions answered with the
value of *another* needle of the context: a model that retrieves a needle without matching
its key scores there, not in recall; ``distinct_answers`` is, averaged over contexts, the
number of different answers its questions got over the number of questions: 1 when every
key gets its own answer, ``1 / eval.num_needles`` when the model gives one answer whatever
the key; items: one per question (key, value, depth, the generation, whether it was
retrieved, whether it gave another needle's value). Plots ``multi_needle.png``: recall
against length, the mean and each context's fraction, and the other-needle answers' mean.
"""

import pathlib
from typing import Sequence

import numpy as np
from matplotlib import pyplot as plt

from gemini_mini.data import needles, tasks
from gemini_mini.evals import common, haystack
from gemini_mini.infer.load import Loaded
from gemini_mini.modalities.text import Tokenizer

SUITE = 'multi-needle'


def context_items(prose_ids: np.ndarray, length: int, count: int, rng: np.random.Generator,
                  tokenizer: Tokenizer) -> list[haystack.Item]:
  """One item per needle of one context: ``count`` needles with distinct eval keys and
  values at uniform depths in a passage of ``prose_ids`` (from a random offset), each item
  asking about one; ``length`` positions with the longest question (more when the needles
  and question alone take more)."""
  keys = needles.draw_keys(rng, 'eval', count)
  values = []
  while len(values) < count:
    if (value := needles.draw_value(rng)) not in values:
      values.append(value)
  depths = [float(depth) for depth in rng.random(count)]
  fixed = (1 + sum(len(needles.needle_ids(key, value, tokenizer)) for key, value in
                   zip(keys, values))
           + max(len(tokenizer.encode(needles.question(key))) for key in keys))
  start = int(rng.integers(max(len(prose_ids) - length, 0) + 1))
  prose = prose_ids[start:start + max(length - fixed, 0)]
  return [haystack.Item(tasks.haystack_prompt(prose, keys, values, depths, [asked], tokenizer),
                        tasks.answer(values[asked], tokenizer), values[asked],
                        {'key': keys[asked], 'value': values[asked], 'depth': depths[asked]})
          for asked in range(count)]


def _skip_reason(loaded: Loaded, length: int, items: Sequence[haystack.Item],
                 positions: int) -> str:
  """Why a length cannot be measured, or ``''``."""
  max_length = loaded.config.model.max_length
  if positions - haystack.max_new_tokens(items) > length:
    return (f'{loaded.config.eval.num_needles} needles and a question alone take more than '
            f'{length} positions; lower eval.num_needles')
  if positions > max_length:
    return (f'prompts and answers take {positions} positions, more than model.max_length='
            f'{max_length}')
  return ''


def run(loaded: Loaded, out_dir: str | pathlib.Path) -> dict:
  """Asks about every needle of every context, writes the JSON and the plot, returns the
  figures (see the module docstring)."""
  settings = loaded.config.eval
  tokenizer = loaded.tokenizer
  prose_ids = common.bible_ids(loaded.config.data.dir, loaded.config.data.subset, tokenizer)
  by_length, other_by_length, records = {}, {}, []
  for length in settings.context_lengths:
    items = [item for trial in range(settings.trials) for item in context_items(
        prose_ids, length, settings.num_needles,
        np.random.default_rng([settings.seed, length, trial]), tokenizer)]
    positions, _ = haystack.fits(loaded, items, tokenizer)
    reason = _skip_reason(loaded, length, items, positions)
    if reason:
      print(f'multi-needle: {length} positions skipped (null): {reason}', flush=True)
      by_length[str(length)] = other_by_length[str(length)] = None
      continue
    generations = haystack.generate(loaded, items, tokenizer)
    scored = []
    for index, (item, generation) in enumerate(zip(items, generations)):
      trial, word = index // settings.num_needles, haystack.answer_word(generation.text)
      context = items[trial * settings.num_needles:(trial + 1) * settings.num_needles]
      scored.append({'length': length, 'trial': trial, **item.record,
                     'generation': generation.text, 'retrieved': word == item.reference,
                     'other_needle': word != item.reference and word in {
                         other.reference for other in context}})
    by_length[str(length)] = float(np.mean([record['retrieved'] for record in scored]))
    other_by_length[str(length)] = float(np.mean([record['other_needle'] for record in scored]))
    records += scored
  mean = lambda field: float(np.mean([r[field] for r in records])) if records else None
  figures = {'recall': mean('retrieved'), 'by_length': by_length,
             'other_needle': mean('other_needle'), 'other_needle_by_length': other_by_length,
             'distinct_answers': _distinct_answers(records)}
  common.write_result(out_dir, SUITE, loaded, figures, records)
  _plot(figures, records, settings, pathlib.Path(out_dir) / 'multi_needle.png', loaded.step)
  return figures


def _distinct_answers(records: list[dict]) -> float | None:
  """Mean over contexts of (different answer words) / (questions); None with no records."""
  contexts = {}
  for record in records:
    contexts.setdefault((record['length'], record['trial']), []).append(
        haystack.answer_word(record['generation']))
  shares = [len(set(words)) / len(words) for words in contexts.values()]
  return float(np.mean(shares)) if shares else None


def _plot(figures: dict, records: list[dict], settings, path: pathlib.Path, step: int) -> None:
  lengths = list(settings.context_lengths)
  figure, axes = plt.subplots(figsize=(6, 4))
  for length in lengths:  # each context's fraction retrieved, as a faint dot
    for trial in range(settings.trials):
      found = [r['retrieved'] for r in records if r['length'] == length and r['trial'] == trial]
      if found:
        axes.plot(length, np.mean(found), 'o', color='tab:blue', alpha=0.25)
  recalls = [figures['by_length'][str(length)] for length in lengths]
  # A skipped length (None) is NaN: a gap in the line, labelled.
  axes.plot(lengths, [np.nan if recall is None else recall for recall in recalls], 'o-',
            color='tab:blue', label='mean over contexts')
  others = [figures['other_needle_by_length'][str(length)] for length in lengths]
  axes.plot(lengths, [np.nan if other is None else other for other in others], 's--',
            color='tab:orange', label="answered another needle's value")
  for length, recall in zip(lengths, recalls):
    if recall is None:
      axes.text(length, 0.5, 'skipped', ha='center', color='grey', rotation=90)
  axes.set_xscale('log', base=2)
  axes.set_xticks(lengths, [str(length) for length in lengths])
  axes.set_ylim(-0.05, 1.05)
  axes.set_xlabel('context length (positions)')
  axes.set_ylabel(f'fraction of {settings.num_needles} needles retrieved')
  recall = figures['recall']
  axes.set_title(f'Multi-needle retrieval, step {step}: {settings.trials} contexts per length; '
                 f'overall {"n/a" if recall is None else f"{recall:.2f}"}', fontsize=10)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
