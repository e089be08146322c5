"""Arithmetic problems with a short chain of thought: a training task that reads no dataset.

    <bos>Question: 23 + 45 - 12 = ?
    Answer: | 23 + 45 = 68. 68 - 12 = 56. The answer is 56.<eos>

(``|`` separates prompt from answer, as in ``tasks``.) A problem adds and subtracts
``MIN_OPERANDS`` to ``MAX_OPERANDS`` numbers of at most ``MAX_OPERAND`` (1 or 2 digits), left
to right, with every partial result non-negative; the answer works it out one operation a
sentence and ends with ``The answer is {n}.``, which ``parse_answer`` reads back. Problems
are split by a hash of their text, 10% for evaluation: training draws only ``'train'``
problems, so the self-consistency eval (``evals/self_consistency.py``) asks only problems
never seen in training.
"""

import hashlib
import re
from typing import NamedTuple

import numpy as np

from gemini_mini.data import examples
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

MIN_OPERANDS = 2
MAX_OPERANDS = 3
MAX_OPERAND = 99         # operands are 0 .. 99
OPERATORS = ('+', '-')
EVAL_PER_MILLE = 100
_ANSWER = re.compile(r'The answer is (-?\d+)')


class Problem(NamedTuple):
  """``operands[0] operators[0] operands[1] ...``, evaluated left to right."""

  operands: tuple[int, ...]
  operators: tuple[str, ...]  # one fewer than operands, each '+' or '-'

  @property
  def text(self) -> str:
    """``'23 + 45 - 12'``."""
    parts = [str(self.operands[0])]
    for operator, operand in zip(self.operators, self.operands[1:]):
      parts += [operator, str(operand)]
    return ' '.join(parts)

  def partial_results(self) -> list[int]:
    """The value after each operation: ``[68, 56]`` for ``23 + 45 - 12``."""
    results, value = [], self.operands[0]
    for operator, operand in zip(self.operators, self.operands[1:]):
      value = value + operand if operator == '+' else value - operand
      results.append(value)
    return results

  @property
  def answer(self) -> int:
    return self.partial_results()[-1]


def solution(problem: Problem) -> str:
  """The chain of thought: ``'23 + 45 = 68. 68 - 12 = 56. The answer is 56.'``."""
  steps, left = [], problem.operands[0]
  for operator, operand, result in zip(problem.operators, problem.operands[1:],
                                       problem.partial_results()):
    steps.append(f'{left} {operator} {operand} = {result}.')
    left = result
  return ' '.join(steps + [f'The answer is {problem.answer}.'])


def split_of(problem: Problem) -> str:
  """``'eval'`` for 10% of problems (by a hash of their text), else ``'train'``."""
  digest = hashlib.sha256(f'arithmetic:{problem.text}'.encode()).digest()
  return 'eval' if int.from_bytes(digest[:8], 'little') % 1000 < EVAL_PER_MILLE else 'train'


def draw_problem(rng: np.random.Generator, split: str) -> Problem:
  """A problem of ``split`` (``'train'`` or ``'eval'``): drawn with ``rng`` until one has no
  negative partial result (the model needs no signs) and falls in ``split``."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split {split!r} is unknown; use 'train' or 'eval'")
  while True:
    count = int(rng.integers(MIN_OPERANDS, MAX_OPERANDS + 1))
    problem = Problem(tuple(int(n) for n in rng.integers(0, MAX_OPERAND + 1, size=count)),
                      tuple(OPERATORS[int(i)] for i in rng.integers(len(OPERATORS),
                                                                    size=count - 1)))
    if min(problem.partial_results()) >= 0 and split_of(problem) == split:
      return problem


def eval_problems(count: int, seed: int) -> list[Problem]:
  """``count`` distinct ``'eval'`` problems, the same for the same seed."""
  rng, problems = np.random.default_rng([seed, 0x417]), []
  while len(problems) < count:
    problem = draw_problem(rng, 'eval')
    if problem not in problems:
      problems.append(problem)
  return problems


def arithmetic_prompt(problem: Problem, tokenizer: Tokenizer) -> list[Segment]:
  """``<bos>Question: {problem} = ?\\nAnswer:``; the answer follows as `` {solution}``."""
  ids = tokenizer.encode(f'Question: {problem.text} = ?\nAnswer:')
  return [Segment.text(np.concatenate([[tokenizer.bos_id], ids]))]


def parse_answer(text: str) -> int | None:
  """The number after the first ``The answer is`` in ``text``, or None when there is none."""
  match = _ANSWER.search(text)
  return int(match.group(1)) if match else None


def arithmetic_example(next_record, tokenizer: Tokenizer, rng: np.random.Generator,
                       room) -> list[Segment]:
  """A ``'train'`` problem drawn with ``rng``, then its solution (``tasks.Task.make_example``).

  ``next_record`` and ``room`` go unused: the problem is made, not read, and it takes about
  60 positions.
  """
  del next_record, room
  problem = draw_problem(rng, 'train')
  return arithmetic_prompt(problem, tokenizer) + [examples.answer(solution(problem), tokenizer)]
