"""Self-consistency: the vote, the routing rule, the figures' bookkeeping and the suite end to
end on the tiny checkpoint."""

import json

import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini.data import arithmetic
from gemini_mini.evals import common, self_consistency
from gemini_mini.infer.generate import Generation
from gemini_mini.infer.load import Loaded, load

vote, route = self_consistency.vote, self_consistency.route


def test_vote_counts_unanswered_samples_and_finds_no_majority_in_a_tie():
  assert vote([5, 5, 7]) == (5, pytest.approx(2 / 3))
  assert vote([5, None, None, 7, 5]) == (5, pytest.approx(2 / 5))
  assert vote([5, 7, None]) == (None, pytest.approx(1 / 3))  # a tie
  assert vote([5, 5, 7, 7, 9]) == (None, pytest.approx(2 / 5))
  assert vote([None, None]) == (None, 0.0)


def test_route_takes_the_majority_only_over_the_threshold():
  assert route(1, [5, 5, 7], threshold=0.5) == (5, True)
  assert route(1, [5, 5, 7, 7], threshold=0.4) == (1, False)    # tie: no consensus
  assert route(1, [5, 5, 7, 9], threshold=0.5) == (1, False)    # share 0.5 is not over 0.5
  assert route(1, [5, 5, 7, 9], threshold=0.49) == (5, True)
  assert route(None, [None, None, 3], threshold=0.3) == (3, True)
  assert route(2, [None, None, None], threshold=0.1) == (2, False)


def said(answer):
  return Generation(np.zeros(0, np.int32), 'no idea' if answer is None else
                    f' 1 + 1 = 2. The answer is {answer}.')


def test_figures_count_greedy_majority_and_routed_answers(monkeypatch, tmp_path):
  config = config_lib.load('configs/test.yaml', ['eval.trials=1', 'eval.samples=3',
                                                 'eval.consistency_threshold=0.5'])
  truth = [problem.answer for problem in arithmetic.eval_problems(10, config.eval.seed)]
  # Problem p's greedy answer, then its 3 samples (w: a wrong answer, r: right, None: none).
  plan = [('r', 'www')] * 3 + [('r', 'rw?')] * 2 + [('w', 'rrr')] * 3 + [('w', 'rr-')] * 2
  pick = lambda p, mark: {'r': truth[p], 'w': truth[p] + 1, '?': truth[p] + 2, '-': None}[mark]

  def fake_generate_all(loaded, prompts, tokenizer, *, max_new_tokens, **sampling):
    assert len(prompts) == 10 and max_new_tokens > 0
    column = sampling.get('seed', 0) - config.eval.seed - 1  # -1: the greedy pass
    assert (column == -1) == ('temperature' not in sampling)
    return [said(pick(p, greedy if column < 0 else samples[column]))
            for p, (greedy, samples) in enumerate(plan)]

  monkeypatch.setattr(common, 'generate_all', fake_generate_all)
  figures = self_consistency.run(Loaded(None, config, 0), tmp_path)
  # Routed: 0-2 follow a wrong consensus, 3-4 fall back to the right greedy, 5-9 take the
  # right majority.
  assert figures == {'problems': 10, 'greedy_accuracy': 0.5, 'majority_accuracy': 0.5,
                     'routed_accuracy': 0.7, 'majority_used': 0.8}
  items = json.loads((tmp_path / 'self-consistency.json').read_text())['items']
  assert items[3]['majority'] is None and items[9]['samples'][2] is None


def test_suite_end_to_end_on_the_tiny_checkpoint(tiny_run_dir, tmp_path):
  loaded = load(tiny_run_dir, ['eval.trials=1', 'eval.samples=3', 'eval.batch_size=10'])
  figures = self_consistency.run(loaded, tmp_path)
  assert figures['problems'] == 10 and 0 <= figures['majority_used'] <= 1
  assert all(0 <= figures[f'{name}_accuracy'] <= 1 for name in ('greedy', 'majority', 'routed'))
  record = json.loads((tmp_path / 'self-consistency.json').read_text())
  assert record['suite'] == 'self-consistency' and record['figures'] == figures
  assert len(record['items']) == 10 and all(len(item['samples']) == 3
                                            for item in record['items'])
  assert (tmp_path / 'self_consistency.png').stat().st_size > 0
