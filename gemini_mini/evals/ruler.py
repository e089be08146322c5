"""RULER-style synthetic long-context tasks, hidden in King James Bible prose.

Three of RULER's tasks (Hsieh et al., 2024), in the training haystack's format
(``tasks.haystack_prompt``): ``<bos>``, Bible prose from the text corpus's ``long`` split
(never trained on) with the task's lines hidden in it, each on its own line, then
``Question: ...?`` / ``Answer:``; the model's greedy continuation is scored by string match
(``common.normalize``).

=================  =====================================================  ==================
task               hidden lines                                           score
=================  =====================================================  ==================
multi-key          ``MULTI_KEYS`` needles ``The special magic number for  1 iff the
                   {key} is {value}.`` with distinct eval keys; the       generation is the
                   question asks about one (the others are distractors)   asked value
multi-value        ``MULTI_VALUES`` lines ``One of the special magic      fraction of the
                   numbers for {key} is {value}.``, one eval key; the     values named
                   question asks for all its values
variable-tracking  ``VAR ABCDE = 12345``, then ``VAR FGHIJ = ABCDE`` ...  fraction of the
                   (``VT_HOPS`` hops, in order); the question asks which  chain's variables
                   variables are assigned ``12345``                       named
=================  =====================================================  ==================

Keys are ``needles``' eval keys; variable names are 5 random capitals and the value 5
digits, as in RULER. Every task is run at each of ``eval.context_lengths`` (the prompt's
positions; more only when the hidden lines and the question alone take more) with
``eval.trials`` items; a length whose prompts leave no room for the answer within
``model.max_length`` is skipped, its scores null. Writes ``ruler.json`` (figures: each task's
mean score by length, and ``overall``, the mean of the scores that are not null; items:
every prompt's references and generation) and ``ruler.png`` (score against length).
"""

import pathlib
from typing import Callable, NamedTuple

import numpy as np
from matplotlib import pyplot as plt

from gemini_mini.data import needles
from gemini_mini.evals import common
from gemini_mini.infer.load import Loaded
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

SUITE = 'ruler'
MULTI_KEYS = 4       # needles of the multi-key task, one asked
MULTI_VALUES = 4     # values of the one key of the multi-value task
VT_HOPS = 4          # assignments after the first in the variable-tracking chain (RULER's)
VT_VALUE_DIGITS = 5
ANSWER_SLACK = 8     # generated tokens beyond the reference answer's


class Item(NamedTuple):
  """One task instance, before it is hidden in prose.

  Attributes:
    lines: the hidden lines' texts, without line breaks.
    depths: where each line goes in the prose, fractions in [0, 1] (``needles.hide``).
    question: the question's text, from its leading line break to ``Answer:``.
    references: the strings the answer should name.
  """

  lines: list[str]
  depths: list[float]
  question: str
  references: list[str]


def multi_key(rng: np.random.Generator) -> Item:
  """``MULTI_KEYS`` needles of distinct eval keys; the question asks for one value."""
  keys = needles.draw_keys(rng, 'eval', MULTI_KEYS)
  values = _distinct(rng, needles.draw_value, MULTI_KEYS)
  asked = int(rng.integers(MULTI_KEYS))
  return Item([needles.sentence(key, value) for key, value in zip(keys, values)],
              list(rng.random(MULTI_KEYS)), needles.question(keys[asked]), [values[asked]])


def multi_value(rng: np.random.Generator) -> Item:
  """``MULTI_VALUES`` distinct values of one eval key; the question asks for all."""
  [key] = needles.draw_keys(rng, 'eval', 1)
  values = _distinct(rng, needles.draw_value, MULTI_VALUES)
  return Item([f'One of the special magic numbers for {key} is {value}.' for value in values],
              list(rng.random(MULTI_VALUES)),
              f'\nQuestion: What are all the special magic numbers for {key}?\nAnswer:', values)


def variable_tracking(rng: np.random.Generator) -> Item:
  """A chain of ``VT_HOPS + 1`` variables holding one value; the question asks for all."""
  names = _distinct(rng, lambda rng: ''.join(chr(65 + i) for i in rng.integers(26, size=5)),
                    VT_HOPS + 1)
  value = str(int(rng.integers(10 ** (VT_VALUE_DIGITS - 1), 10 ** VT_VALUE_DIGITS)))
  lines = [f'VAR {names[0]} = {value}'] + [f'VAR {name} = {previous}'
                                           for previous, name in zip(names, names[1:])]
  # Sorted depths keep the chain in order: each assignment follows the one it copies.
  return Item(lines, sorted(rng.random(VT_HOPS + 1)),
              f'\nQuestion: Which variables are assigned the value {value}?\nAnswer:', names)


TASKS: dict[str, Callable[[np.random.Generator], Item]] = {
    'multi-key': multi_key, 'multi-value': multi_value, 'variable-tracking': variable_tracking}


def _distinct(rng: np.random.Generator, draw: Callable, count: int) -> list[str]:
  drawn = []
  while len(drawn) < count:
    if (value := draw(rng)) not in drawn:
      drawn.append(value)
  return drawn


def build_prompt(item: Item, prose_ids: np.ndarray, length: int,
                 tokenizer: Tokenizer) -> list[Segment]:
  """``<bos>``, the first tokens of ``prose_ids`` with ``item.lines`` hidden at
  ``item.depths``, then ``item.question``: ``length`` positions in all, or just the lines and
  question when those alone take more."""
  lines = [tokenizer.encode(f'\n{line}\n') for line in item.lines]
  question = tokenizer.encode(item.question)
  fixed = 1 + sum(map(len, lines)) + len(question)
  prose = prose_ids[:max(length - fixed, 0)]
  if len(prose) < length - fixed:
    raise ValueError(f'{len(prose_ids)} prose tokens cannot fill {length} positions; pass '
                     f'at least {length - fixed}')
  ids = [[tokenizer.bos_id], needles.hide(prose, lines, item.depths), question]
  return [Segment.text(np.concatenate(ids))]


def reference_answer(item: Item) -> str:
  """The reference answer as a prompt's continuation (no ``<eos>``): `` 4182390, 7710923``."""
  return ' ' + ', '.join(item.references)


def score(task: str, generation: str, references: list[str]) -> float:
  """multi-key: 1.0 iff ``generation`` is the value (``common.exact_match``); else the
  fraction of ``references`` that are words of ``generation`` (after ``common.normalize``)."""
  if task == 'multi-key':
    return float(common.exact_match(generation, references[0]))
  words = set(common.normalize(generation).split())
  return sum(common.normalize(reference) in words for reference in references) / len(references)


def run(loaded: Loaded, out_dir: str | pathlib.Path) -> dict:
  """Runs every task at every length, writes the JSON and the plot, returns the figures."""
  settings, max_length = loaded.config.eval, loaded.config.model.max_length
  tokenizer = loaded.tokenizer
  prose_ids = common.bible_ids(loaded.config.data.dir, loaded.config.data.subset, tokenizer)
  figures, items = {}, []
  for task_index, (task, make_item) in enumerate(TASKS.items()):
    figures[task] = {}
    for length in settings.context_lengths:
      cell, prompts = [], []
      for trial in range(settings.trials):
        rng = np.random.default_rng([settings.seed, task_index, length, trial])
        cell.append(make_item(rng))
        # A new passage per item (build_prompt names the problem if the Bible is too short).
        start = int(rng.integers(max(len(prose_ids) - length, 0) + 1))
        prompts.append(build_prompt(cell[-1], prose_ids[start:start + length], length,
                                    tokenizer))
      new_tokens = ANSWER_SLACK + max(len(tokenizer.encode(reference_answer(item)))
                                      for item in cell)
      longest = max(len(prompt[0].data) for prompt in prompts)
      if longest + new_tokens > max_length:
        print(f'ruler: {task} at {length} positions skipped (null): prompts of {longest} '
              f'positions plus {new_tokens} answer tokens exceed model.max_length={max_length}; '
              'drop that length from eval.context_lengths or use a longer model', flush=True)
        figures[task][str(length)] = None
        continue
      generations = common.generate_all(loaded, prompts, tokenizer, max_new_tokens=new_tokens)
      scores = [score(task, generation.text, item.references)
                for item, generation in zip(cell, generations)]
      figures[task][str(length)] = float(np.mean(scores))
      items += [{'task': task, 'context_length': length, 'positions': len(prompt[0].data),
                 'references': item.references, 'generation': generation.text, 'score': value}
                for item, prompt, generation, value in zip(cell, prompts, generations, scores)]
  measured = [value for task in TASKS for value in figures[task].values() if value is not None]
  figures['overall'] = float(np.mean(measured)) if measured else None
  common.write_result(out_dir, SUITE, loaded, figures, items)
  _plot(figures, settings, pathlib.Path(out_dir) / 'ruler.png')
  return figures


def _plot(figures: dict, settings, path: pathlib.Path) -> None:
  lengths = list(settings.context_lengths)
  figure, axes = plt.subplots(figsize=(6, 4))
  # Shrinking markers keep tasks with equal scores visible; a skipped length (None) is NaN,
  # a gap in the line.
  for (task, marker, size) in zip(TASKS, 'os^', (10, 7, 4)):
    scores = [figures[task][str(length)] for length in lengths]
    axes.plot(lengths, [np.nan if value is None else value for value in scores], '-',
              marker=marker, markersize=size, label=task)
  axes.set_xscale('log', base=2)
  skipped = [all(figures[task][str(length)] is None for task in TASKS) for length in lengths]
  axes.set_xticks(lengths, [f'{length}\n(skipped)' if gap else str(length)
                            for length, gap in zip(lengths, skipped)])
  axes.set_ylim(-0.05, 1.05)
  axes.set_xlabel('context length (positions)')
  axes.set_ylabel('score')
  overall = figures['overall']
  axes.set_title(f'RULER, {settings.trials} items per point; overall '
                 f'{"n/a" if overall is None else f"{overall:.2f}"}', fontsize=10)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
