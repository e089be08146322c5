"""RULER: the prompts hold what each task promises, scoring by string match, and the suite
end to end on the tiny checkpoint, a length beyond ``model.max_length`` skipped."""

import json
import re

import numpy as np
import pytest

from gemini_mini.data import needles
from gemini_mini.evals import ruler
from gemini_mini.infer.load import load
from gemini_mini.modalities.text import Tokenizer


@pytest.fixture(scope='module')
def tokenizer():
  return Tokenizer()


@pytest.fixture(scope='module')
def prose_ids(tokenizer):
  return tokenizer.encode('And the earth was without form, and void. ' * 200)


def prompt_text(task, seed, prose_ids, tokenizer, length=384):
  item = ruler.TASKS[task](np.random.default_rng(seed))
  prompt = ruler.build_prompt(item, prose_ids, length, tokenizer)
  assert len(prompt) == 1 and len(prompt[0].data) == length
  assert prompt[0].data[0] == tokenizer.bos_id
  text = tokenizer.decode(prompt[0].data)
  assert text.endswith(item.question) and text.count('Question:') == 1
  return item, text


def test_multi_key_hides_distinct_eval_keys_and_asks_for_one(prose_ids, tokenizer):
  for seed in range(5):
    item, text = prompt_text('multi-key', seed, prose_ids, tokenizer)
    found = re.findall(r'\nThe special magic number for ([\w-]+) is (\d+)\.\n', text)
    assert len(found) == ruler.MULTI_KEYS == len({key for key, _ in found})
    assert {needles.split_of(key) for key, _ in found} == {'eval'}
    asked = re.search(r'magic number for ([\w-]+)\?\nAnswer: The special magic number for \1 is$',
                      text).group(1)
    assert item.references == [dict(found)[asked]]


def test_multi_value_hides_values_of_one_key_and_asks_for_all(prose_ids, tokenizer):
  item, text = prompt_text('multi-value', 0, prose_ids, tokenizer)
  found = re.findall(r'\nOne of the special magic numbers for ([\w-]+) is (\d+)\.\n', text)
  assert len(found) == ruler.MULTI_VALUES and len({key for key, _ in found}) == 1
  assert f'magic numbers for {found[0][0]}?' in item.question
  assert sorted(item.references) == sorted(value for _, value in found)
  assert len(set(item.references)) == ruler.MULTI_VALUES


def test_variable_tracking_chain_assigns_the_value_in_order(prose_ids, tokenizer):
  for seed in range(5):
    item, text = prompt_text('variable-tracking', seed, prose_ids, tokenizer)
    assignments = re.findall(r'\nVAR ([A-Z]{5}) = (\w+)\n', text)
    assert len(assignments) == ruler.VT_HOPS + 1
    # Follow the chain in reading order: every variable copies one already holding the value.
    value = re.search(r'assigned the value (\d+)\?', text).group(1)
    holding = {}
    for name, source in assignments:
      holding[name] = source if source.isdigit() else holding[source]
    assert set(holding.values()) == {value}
    assert item.references == [name for name, _ in assignments]


def test_prompts_are_reproducible_and_prose_must_suffice(prose_ids, tokenizer):
  for task in ruler.TASKS:
    assert prompt_text(task, 3, prose_ids, tokenizer) == prompt_text(task, 3, prose_ids,
                                                                     tokenizer)
  item = ruler.multi_key(np.random.default_rng(0))
  with pytest.raises(ValueError, match='prose tokens cannot fill 384 positions'):
    ruler.build_prompt(item, prose_ids[:100], 384, tokenizer)
  # Lines and question longer than the length: all of them, no prose.
  short = ruler.build_prompt(item, prose_ids, 8, tokenizer)[0].data
  # the needles, the question and the answer's restatement
  assert len(short) > 8 and tokenizer.decode(short).count('magic number') == ruler.MULTI_KEYS + 2


def test_scores_match_strings():
  assert ruler.score('multi-key', ' 1234567', ['1234567']) == 1.0
  assert ruler.score('multi-key', ' 1234567 and 7654321', ['1234567']) == 0.0
  assert ruler.score('multi-key', ' 123456', ['1234567']) == 0.0
  values = ['1111111', '2222222', '3333333', '4444444']
  assert ruler.score('multi-value', ' 2222222, 1111111, 9999999', values) == 0.5
  assert ruler.score('multi-value', ' 22222221111111', values) == 0.0  # whole numbers only
  names = ['ABCDE', 'FGHIJ', 'KLMNO', 'PQRST', 'UVWXY']
  assert ruler.score('variable-tracking', ' ABCDE, FGHIJ, KLMNO, PQRST, UVWXY', names) == 1.0
  assert ruler.score('variable-tracking', ' abcde fghij ZZZZZ', names) == pytest.approx(0.4)


def test_suite_end_to_end_on_the_tiny_checkpoint(tiny_run_dir, tmp_path, capsys):
  loaded = load(tiny_run_dir, ['eval.context_lengths=[128,256,1024]', 'eval.trials=1'])
  figures = ruler.run(loaded, tmp_path)
  assert 'variable-tracking at 1024 positions skipped (null)' in capsys.readouterr().out
  for task in ruler.TASKS:
    assert figures[task]['1024'] is None  # beyond model.max_length = 512
    assert all(0 <= figures[task][length] <= 1 for length in ('128', '256'))
  assert 0 <= figures['overall'] <= 1
  record = json.loads((tmp_path / 'ruler.json').read_text())
  assert record['suite'] == 'ruler' and record['figures'] == figures
  assert sorted((item['task'], item['context_length']) for item in record['items']) == sorted(
      (task, length) for task in ruler.TASKS for length in (128, 256))
  # Four multi-value lines and the question can take more than 128 positions by themselves.
  assert all(item['positions'] >= item['context_length'] for item in record['items'])
  assert (tmp_path / 'ruler.png').stat().st_size > 0
