"""Arithmetic task: correct chains of thought, reproducible from the rng, disjoint splits."""

import re

import numpy as np
import pytest

from gemini_mini.data import arithmetic
from gemini_mini.modalities.text import Tokenizer

STEP = re.compile(r'(\d+) ([+-]) (\d+) = (\d+)\.')


@pytest.fixture(scope='module')
def tokenizer():
  return Tokenizer()


def no_records():
  raise AssertionError('the arithmetic task reads no dataset')


def example(seed, tokenizer):
  return arithmetic.arithmetic_example(no_records, tokenizer, np.random.default_rng(seed), None)


def test_examples_are_correct_worked_solutions(tokenizer):
  for seed in range(200):
    prompt, reply = example(seed, tokenizer)
    assert prompt.data[0] == tokenizer.bos_id and reply.data[-1] == tokenizer.eos_id
    question = re.fullmatch(r'Question: ([\d +-]+) = \?\nAnswer:', tokenizer.decode(prompt.data))
    expression, solution = question.group(1), tokenizer.decode(reply.data[:-1])
    numbers = [int(n) for n in re.findall(r'\d+', expression)]
    assert arithmetic.MIN_OPERANDS <= len(numbers) <= arithmetic.MAX_OPERANDS
    assert all(0 <= n <= arithmetic.MAX_OPERAND for n in numbers)
    assert solution.startswith(' ') and arithmetic.parse_answer(solution) == eval(expression)
    # Each step is right, starts from the previous result, and none goes negative.
    steps = STEP.findall(solution)
    assert len(steps) == len(numbers) - 1 and int(steps[0][0]) == numbers[0]
    for (left, operator, right, result), following in zip(steps, steps[1:] + [None]):
      assert eval(f'{left} {operator} {right}') == int(result) >= 0
      assert following is None or following[0] == result


def test_examples_are_determined_by_the_rng(tokenizer):
  first, again, other = example(7, tokenizer), example(7, tokenizer), example(8, tokenizer)
  assert all(np.array_equal(a.data, b.data) for a, b in zip(first, again))
  assert not all(np.array_equal(a.data, b.data) for a, b in zip(first, other))


def test_splits_are_disjoint_and_training_draws_only_train_problems(tokenizer):
  rng = np.random.default_rng(0)
  trained = {arithmetic.draw_problem(rng, 'train') for _ in range(3000)}
  held_out = arithmetic.eval_problems(300, seed=0)
  assert len(set(held_out)) == 300 and not trained & set(held_out)
  assert {arithmetic.split_of(problem) for problem in held_out} == {'eval'}
  assert {arithmetic.split_of(problem) for problem in trained} == {'train'}
  assert arithmetic.eval_problems(300, seed=0) == held_out != arithmetic.eval_problems(300, 1)
  # The training examples' problems too, read back from their tokens.
  texts = {tokenizer.decode(example(seed, tokenizer)[0].data) for seed in range(300)}
  assert not texts & {f'Question: {problem.text} = ?\nAnswer:' for problem in held_out}
  # About EVAL_PER_MILLE of all problems are held out.
  every = [arithmetic.Problem((a, b), ('+',)) for a in range(100) for b in range(100)]
  share = np.mean([arithmetic.split_of(problem) == 'eval' for problem in every])
  assert abs(share - arithmetic.EVAL_PER_MILLE / 1000) < 0.02


def test_solution_and_parse_answer():
  problem = arithmetic.Problem((23, 45, 12), ('+', '-'))
  assert problem.text == '23 + 45 - 12' and problem.answer == 56
  assert arithmetic.solution(problem) == '23 + 45 = 68. 68 - 12 = 56. The answer is 56.'
  assert arithmetic.parse_answer(' 23 + 45 = 68. The answer is 68. The answer is 3') == 68
  assert arithmetic.parse_answer('The answer is -4') == -4
  assert arithmetic.parse_answer('68 - 12 = 56.') is None
  with pytest.raises(ValueError, match="use 'train' or 'eval'"):
    arithmetic.draw_problem(np.random.default_rng(0), 'test')
