"""Multi-needle: one context holds every needle once, with distinct eval keys at their
depths, each prompt asks about its own; the suite end to end on the tiny checkpoint, a
length too short for the needles and one past ``model.max_length`` skipped."""

import json
import re

import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini.data import needles
from gemini_mini.evals import haystack, multi_needle
from gemini_mini.infer.generate import Generation
from gemini_mini.infer.load import Loaded, load
from gemini_mini.modalities.text import Tokenizer

NEEDLE = re.compile(r'\nThe special magic number for ([\w-]+) is (\d+)\.\n')


@pytest.fixture(scope='module')
def tokenizer():
  return Tokenizer()


def test_contexts_share_distinct_eval_needles_and_ask_each_once(tokenizer):
  prose_ids = tokenizer.encode('In the beginning God created the heaven and the earth. ' * 300)
  for seed in range(3):
    items = multi_needle.context_items(prose_ids, 512, 6, np.random.default_rng(seed),
                                       tokenizer)
    assert len(items) == 6
    texts = [tokenizer.decode(item.prompt[0].data) for item in items]
    contexts = {text[:text.rindex('\nQuestion:')] for text in texts}
    assert len(contexts) == 1  # the prompts differ by their question alone
    found = NEEDLE.findall(contexts.pop())
    keys = [key for key, _ in found]
    assert len(set(keys)) == len(set(value for _, value in found)) == 6
    assert all(needles.split_of(key) == 'eval' for key in keys)
    assert max(len(item.prompt[0].data) for item in items) == 512
    for item, text in zip(items, texts):
      key, value = item.record['key'], item.record['value']
      assert (key, value) in found and item.reference == value
      assert text.endswith(needles.question(key))
    # Needles lie in the order of their depths.
    by_depth = sorted(items, key=lambda item: item.record['depth'])
    assert [item.record['key'] for item in by_depth] == keys


def test_a_model_that_gives_the_answers_retrieves_every_needle(small_data_dir, tmp_path,
                                                              monkeypatch):
  """Items, generations and scores stay aligned: answers as training writes them score 1."""
  monkeypatch.setattr(haystack, 'generate', lambda loaded, items, tokenizer: [
      Generation(tokens=item.answer.data, text=tokenizer.decode(item.answer.data))
      for item in items])
  config = config_lib.load('configs/test.yaml', [
      f'data.dir={small_data_dir}', 'eval.context_lengths=[256,384]', 'eval.trials=2',
      'eval.num_needles=4'])
  figures = multi_needle.run(Loaded(None, config, 0), tmp_path)
  assert figures == {'recall': 1.0, 'by_length': {'256': 1.0, '384': 1.0},
                     'other_needle': 0.0, 'other_needle_by_length': {'256': 0.0, '384': 0.0},
                     'distinct_answers': 1.0}


def test_answers_with_the_wrong_needle_count_as_other_needle(small_data_dir, tmp_path,
                                                             monkeypatch):
  """Each question of the first context answered with the next needle's value: none
  retrieved, every one another needle's, four different answers; the second context's
  questions all answered with a value in no needle: neither, and one answer for four keys."""
  def generate(loaded, items, tokenizer):
    answers = []
    for index, item in enumerate(items):
      context = items[index // 4 * 4:index // 4 * 4 + 4]
      wrong = context[(index + 1) % 4].reference if index < 4 else '1234567'
      answers.append(Generation(tokens=np.zeros(0, np.int32), text=f' {wrong}\n'))
    return answers

  monkeypatch.setattr(haystack, 'generate', generate)
  config = config_lib.load('configs/test.yaml', [
      f'data.dir={small_data_dir}', 'eval.context_lengths=[256]', 'eval.trials=2',
      'eval.num_needles=4'])
  figures = multi_needle.run(Loaded(None, config, 0), tmp_path)
  assert figures['recall'] == 0.0 and figures['other_needle'] == 0.5
  assert figures['distinct_answers'] == (4 / 4 + 1 / 4) / 2
  items = json.loads((tmp_path / 'multi-needle.json').read_text())['items']
  assert [item['other_needle'] for item in items] == [True] * 4 + [False] * 4


def test_suite_end_to_end_on_the_tiny_checkpoint(tiny_run_dir, tmp_path, capsys):
  loaded = load(tiny_run_dir, ['eval.context_lengths=[64,256,1024]', 'eval.trials=2',
                               'eval.num_needles=3'])
  figures = multi_needle.run(loaded, tmp_path)
  out = capsys.readouterr().out
  assert '64 positions skipped (null): 3 needles and a question alone' in out
  assert '1024 positions skipped (null)' in out and 'model.max_length=512' in out
  assert figures['by_length']['64'] is None and figures['by_length']['1024'] is None
  assert figures['other_needle_by_length']['64'] is None
  assert 0 <= figures['by_length']['256'] <= 1 and figures['recall'] == figures['by_length']['256']
  result = json.loads((tmp_path / 'multi-needle.json').read_text())
  assert result['figures'] == figures and result['checkpoint_step'] == 2
  assert (tmp_path / 'multi_needle.png').stat().st_size > 0
  items = result['items']
  assert len(items) == 2 * 3 and {item['trial'] for item in items} == {0, 1}
  for trial in (0, 1):
    keys = [item['key'] for item in items if item['trial'] == trial]
    assert len(set(keys)) == 3 and all(needles.split_of(key) == 'eval' for key in keys)
  for item in items:
    assert item['retrieved'] == (haystack.answer_word(item['generation']) == item['value'])
    assert not (item['retrieved'] and item['other_needle'])
