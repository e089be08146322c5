"""Self-consistency: uncertainty-routed chain of thought on held-out arithmetic problems.

The model answers ``eval.trials * PROBLEMS_PER_TRIAL`` ``'eval'`` problems of
``data/arithmetic`` (never drawn in training) once greedily and ``eval.samples`` times at
``eval.temperature`` (sample i with seed ``eval.seed + 1 + i``). As in the Gemini report's
uncertainty-routed chain of thought, the routed answer is the samples' majority when its
share of the samples exceeds ``eval.consistency_threshold`` (the model agrees with itself),
else the greedy answer. A generation's answer is what follows ``The answer is``
(``arithmetic.parse_answer``); one without it answers nothing.

Figures: ``problems``, ``greedy_accuracy``, ``majority_accuracy`` (the majority alone; a
tie or no parsed sample is wrong), ``routed_accuracy`` and ``majority_used`` (the fraction
of problems routed to the majority). Writes ``self-consistency.json`` (items: each
problem's answers) and ``self_consistency.png`` (the three accuracies as bars).
"""

import collections
import pathlib
from typing import Sequence

from matplotlib import pyplot as plt

from gemini_mini.data import arithmetic
from gemini_mini.evals import common
from gemini_mini.infer.load import Loaded

SUITE = 'self-consistency'
PROBLEMS_PER_TRIAL = 10
ANSWER_SLACK = 8  # generated tokens beyond the longest reference solution's


def vote(answers: Sequence[int | None]) -> tuple[int | None, float]:
  """``(majority, share)``: the most common answer and its share of all ``answers``
  (unanswered ones, None, count in the share but never win). ``majority`` is None when no
  answer was given or two answers tie for most: then there is no consensus."""
  counts = collections.Counter(answer for answer in answers if answer is not None)
  ranked = counts.most_common(2)
  if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
    return None, ranked[0][1] / len(answers) if ranked else 0.0
  return ranked[0][0], ranked[0][1] / len(answers)


def route(greedy: int | None, answers: Sequence[int | None],
          threshold: float) -> tuple[int | None, bool]:
  """``(answer, used_majority)``: the samples' majority when its share exceeds
  ``threshold``, else ``greedy``."""
  majority, share = vote(answers)
  if majority is not None and share > threshold:
    return majority, True
  return greedy, False


def run(loaded: Loaded, out_dir: str | pathlib.Path) -> dict:
  """Answers the problems, writes the JSON and the plot and returns the figures."""
  settings, tokenizer = loaded.config.eval, loaded.tokenizer
  problems = arithmetic.eval_problems(settings.trials * PROBLEMS_PER_TRIAL, settings.seed)
  prompts = [arithmetic.arithmetic_prompt(problem, tokenizer) for problem in problems]
  # A wrong chain has the right one's form, so about its length; the slack covers bigger
  # numbers and the stop token.
  max_new_tokens = ANSWER_SLACK + max(len(tokenizer.encode(' ' + arithmetic.solution(problem)))
                                      for problem in problems)

  def answers(**sampling) -> list[int | None]:
    generations = common.generate_all(loaded, prompts, tokenizer, max_new_tokens=max_new_tokens,
                                      **sampling)
    return [arithmetic.parse_answer(generation.text) for generation in generations]

  greedy = answers()
  samples = list(zip(*(answers(temperature=settings.temperature, seed=settings.seed + 1 + i)
                       for i in range(settings.samples))))
  items, correct = [], collections.Counter()
  for problem, first, sampled in zip(problems, greedy, samples):
    majority, share = vote(sampled)
    routed, used = route(first, sampled, settings.consistency_threshold)
    correct.update(greedy=first == problem.answer, majority=majority == problem.answer,
                   routed=routed == problem.answer, used=used)
    items.append({'problem': problem.text, 'answer': problem.answer, 'greedy': first,
                  'samples': list(sampled), 'majority': majority, 'share': share,
                  'routed': routed, 'used_majority': used})
  count = len(problems)
  figures = {'problems': count, **{f'{name}_accuracy': correct[name] / count
                                   for name in ('greedy', 'majority', 'routed')},
             'majority_used': correct['used'] / count}
  common.write_result(out_dir, SUITE, loaded, figures, items)
  _plot(figures, settings, pathlib.Path(out_dir) / 'self_consistency.png')
  return figures


def _plot(figures: dict, settings, path: pathlib.Path) -> None:
  names = ('greedy', 'majority', 'routed')
  accuracies = [figures[f'{name}_accuracy'] for name in names]
  figure, axes = plt.subplots(figsize=(5, 4))
  bars = axes.bar(['greedy', f'majority of {settings.samples}',
                   f'routed (tau={settings.consistency_threshold:g})'], accuracies,
                  color=['tab:gray', 'tab:blue', 'tab:green'])
  axes.bar_label(bars, fmt='%.2f')
  axes.set_ylim(0, 1.05)
  axes.set_ylabel('accuracy')
  axes.set_title(f'{figures["problems"]} held-out arithmetic problems, T={settings.temperature:g}'
                 f'\nmajority used on {figures["majority_used"]:.0%}', fontsize=10)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
