"""Factuality: the rates from hand-made verdicts, the zero-shot prompts of a pre-trained run
written out by hand, the suite's bookkeeping with scripted replies, and the suite end to end
on the tiny pre-trained checkpoint."""

import json

import numpy as np
import pytest

from gemini_mini import config as config_lib
from gemini_mini.data import examples, post_training
from gemini_mini.evals import common, factuality
from gemini_mini.infer.generate import Generation
from gemini_mini.infer.load import Loaded, load
from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities import interleave
from gemini_mini.modalities.text import Tokenizer

Verdict = post_training.Verdict
CORRECT, REFUSED = Verdict(True, False, False, 1.0), Verdict(False, False, True, 0.0)
WRONG, OTHER = Verdict(False, True, False, -1.0), Verdict(False, False, False, -0.5)


def item(kind: str, answerable: bool = True, **fields) -> post_training.Item:
  values = dict(question='', context='', answer='', key='', reference='', rejected='',
                demonstration='', confusable=False, media=None, split='eval', index=0,
                data_dir='', subset='small')
  return post_training.Item(kind=kind, answerable=answerable, **{**values, **fields})


def test_rates_count_recall_over_refusal_and_hallucination_by_hand():
  answerable = [True] * 4 + [False] * 4
  verdicts = [CORRECT, CORRECT, REFUSED, WRONG, WRONG, CORRECT, WRONG, OTHER]
  assert factuality.rates(answerable, verdicts) == pytest.approx({
      'items': 8, 'answerable': 4, 'unanswerable': 4, 'recall': 2 / 4, 'over_refusal': 1 / 4,
      'answerable_hallucination': 1 / 4, 'hallucination': 2 / 4, 'unanswerable_correct': 1 / 4,
      'mean_score': (1 + 1 + 0 - 1 - 1 + 1 - 1 - 0.5) / 8})
  only_answerable = factuality.rates([True, True], [CORRECT, REFUSED])
  assert only_answerable['hallucination'] is None
  assert only_answerable['unanswerable_correct'] is None
  with pytest.raises(ValueError, match='one of each per item'):
    factuality.rates([True], [CORRECT, WRONG])


def test_grouped_rates_split_by_kind_and_modality_in_a_fixed_order():
  items = [item('caption'), item('sum'), item('document', False), item('document'),
           item('word_image', False)]
  verdicts = [WRONG, CORRECT, WRONG, REFUSED, CORRECT]
  grouped = factuality.grouped_rates(items, verdicts)
  assert list(grouped['by_kind']) == ['document', 'word_image', 'caption', 'sum']
  assert list(grouped['by_modality']) == ['text', 'image']  # no audio item
  text, image = grouped['by_modality']['text'], grouped['by_modality']['image']
  assert (text['answerable'], text['unanswerable']) == (2, 1)
  assert text['recall'] == 1 / 2 and text['over_refusal'] == 1 / 2 and text['hallucination'] == 1
  assert image['recall'] == 0 and image['answerable_hallucination'] == 1
  assert image['unanswerable_correct'] == 1 and image['hallucination'] == 0
  assert grouped['by_kind']['document']['items'] == 2
  assert grouped['overall']['items'] == 5 and grouped['overall']['recall'] == 1 / 3


def test_zero_shot_prompts_are_the_pretraining_formats_written_out():
  tokenizer = Tokenizer()
  document = item('document', context='Rain fell.\nThe special magic number for lemon-bear is '
                  '1234567.', key='lemon-bear')
  prompt, opening = factuality.zero_shot(document, tokenizer)
  want = np.concatenate([[tokenizer.bos_id], tokenizer.encode(document.context), tokenizer.encode(
      '\nQuestion: What is the special magic number for lemon-bear?\nAnswer: The special magic '
      'number for lemon-bear is')])
  np.testing.assert_array_equal(interleave.flatten(prompt, tokenizer).tokens, want)
  assert opening == 'The special magic number for lemon-bear is'
  reply = factuality.judged_reply(opening, ' 1234567.')
  assert reply == 'The special magic number for lemon-bear is 1234567.'
  assert post_training.judge(item('document', answer='1234567', reference=reply), reply).correct

  prompt, opening = factuality.zero_shot(item('sum', question='What is 88 - 85?'), tokenizer)
  want = [tokenizer.bos_id, *tokenizer.encode('Question: 88 - 85 = ?\nAnswer:')]
  np.testing.assert_array_equal(interleave.flatten(prompt, tokenizer).tokens, want)
  assert factuality.judged_reply(opening, ' 88 - 85 = 3. The answer is 3.') == (
      '88 - 85 = 3. The answer is 3.')
  assert factuality.judged_reply('The word is', 'CAT') == 'The word is CAT'


def test_zero_shot_prompts_of_media_items_read_their_source(small_data_dir):
  tokenizer = Tokenizer()
  items = post_training.builder(small_data_dir, 'small').as_data_source('eval')
  seen = set()
  for index in range(len(items)):
    asked = items[index]
    if asked.media is None or asked.kind in seen:
      continue
    seen.add(asked.kind)
    record = post_training.open_source(small_data_dir, 'small', asked.media.dataset,
                                       asked.media.split)[asked.media.index]
    flat = interleave.flatten(factuality.zero_shot(asked, tokenizer)[0], tokenizer)
    cue = {'word_image': 'Word:', 'keyword_audio': 'Secret word:', 'caption': 'Caption:',
           'transcript': 'Transcript:'}[asked.kind]
    assert flat.tokens[0] == tokenizer.bos_id
    np.testing.assert_array_equal(flat.tokens[-len(tokenizer.encode(cue)):], tokenizer.encode(cue))
    if asked.kind == 'word_image':
      np.testing.assert_array_equal(
          flat.patches, image_lib.patchify(record['frames'][asked.media.frame]))
    elif asked.kind == 'caption':
      np.testing.assert_array_equal(flat.patches, image_lib.patchify(record['image']))
    else:
      np.testing.assert_array_equal(flat.audio, examples.audio_frames(record['audio']))
  assert {'word_image', 'keyword_audio'} <= seen


STAGE_OVERRIDES = {'sft': ['train.init_from=runs/elsewhere'],
                   'reward': ['train.init_from=runs/elsewhere', 'model.scalar_head=true']}


def config(small_data_dir, stage: str):
  return config_lib.load('configs/test.yaml', [
      f'data.dir={small_data_dir}', f'train.stage={stage}', *STAGE_OVERRIDES[stage],
      'eval.factuality_items=12', 'eval.batch_size=5'])


def test_suite_judges_scripted_conversation_replies(small_data_dir, tmp_path, monkeypatch):
  """Answerable items: the reference at even indices, a refusal at odd ones; unanswerable:
  the rejected reply (a value or word) at indices divisible by 3, else the refusal."""
  tokenizer, calls = Tokenizer(), []
  held_out = post_training.builder(small_data_dir, 'small').as_data_source('eval')
  asked = [held_out[i] for i in range(12)]

  def scripted(item_):
    if item_.answerable:
      return (item_.reference if item_.index % 2 == 0
              else post_training.REFUSALS[item_.kind].format(key=item_.key))
    return item_.rejected if item_.index % 3 == 0 else item_.reference

  def fake_generate_all(loaded, prompts, tokenizer_, *, max_new_tokens, **sampling):
    calls.append((len(prompts), max_new_tokens, sampling))
    for prompt in prompts:
      assert list(prompt[0].data) == [tokenizer.bos_id, tokenizer.user_id]
      assert list(prompt[-1].data) == [tokenizer.end_of_turn_id, tokenizer.model_id]
    return [Generation(np.zeros(0, np.int32), f' {scripted(item_)} ') for item_ in asked]

  monkeypatch.setattr(common, 'generate_all', fake_generate_all)
  figures = factuality.run(Loaded(None, config(small_data_dir, 'sft'), 7), tmp_path)
  assert calls == [(12, factuality.MAX_NEW_TOKENS, {'stop_ids': (tokenizer.end_of_turn_id,)})]
  answerable = [i for i in asked if i.answerable]
  unanswerable = [i for i in asked if not i.answerable]
  assert answerable and unanswerable
  overall = figures['overall']
  assert (overall['items'], overall['answerable']) == (12, len(answerable))
  assert overall['recall'] == pytest.approx(
      np.mean([i.index % 2 == 0 for i in answerable]))
  assert overall['over_refusal'] == pytest.approx(1 - overall['recall'])
  assert overall['answerable_hallucination'] == 0
  assert overall['hallucination'] == pytest.approx(
      np.mean([i.index % 3 == 0 for i in unanswerable]))
  assert overall['unanswerable_correct'] == pytest.approx(1 - overall['hallucination'])
  assert figures['prompt_format'] == 'conversation' and figures['stage'] == 'sft'
  record = json.loads((tmp_path / 'factuality.json').read_text())
  assert record['figures'] == figures and record['checkpoint_step'] == 7
  assert [(r['kind'], r['answerable'], r['reply']) for r in record['items']] == [
      (i.kind, i.answerable, scripted(i)) for i in asked]
  assert (tmp_path / 'factuality_rates.png').read_bytes()[:4] == b'\x89PNG'


def test_a_reward_run_is_skipped_with_a_reason(small_data_dir, tmp_path):
  figures = factuality.run(Loaded(None, config(small_data_dir, 'reward'), 0), tmp_path)
  assert 'train.stage=reward' in figures['skipped'] and not list(tmp_path.iterdir())


def test_pretrained_run_end_to_end_zero_shot(tiny_run_dir, tmp_path):
  loaded = load(tiny_run_dir, ['eval.factuality_items=3', 'eval.batch_size=3'])
  figures = factuality.run(loaded, tmp_path)
  assert figures['prompt_format'] == 'pretraining zero-shot' and figures['overall']['items'] == 3
  items = json.loads((tmp_path / 'factuality.json').read_text())['items']
  held_out = post_training.builder(loaded.config.data.dir, 'small').as_data_source('eval')
  for index, record in enumerate(items):
    opening = factuality.ZERO_SHOT_OPENINGS[record['kind']].format(key=held_out[index].key)
    assert record['reply'].startswith(opening)
    assert record['verdict'] == post_training.judge(held_out[index], record['reply'])._asdict()
  assert (tmp_path / 'factuality_rates.png').stat().st_size > 0
