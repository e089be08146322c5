"""Held-out tasks: caption accuracy per source with its chance and majority baselines, WER and
its baselines, keyword accuracy and its chance on hand-made predictions, and the suite end to
end on the tiny checkpoint with the training tasks' prompts."""

import json

import numpy as np
import pytest

from gemini_mini.data import audio_haystack, image_caption, speech
from gemini_mini.data import tasks as tasks_lib
from gemini_mini.evals import common, tasks
from gemini_mini.infer.load import load
from gemini_mini.modalities import interleave
from gemini_mini.modalities.text import Tokenizer


def test_caption_scores_per_source_with_chance_and_majority():
  captions = ['cat face', 'cat face', 'moon', 'handwritten digit one', 'handwritten digit two',
              'the word "cat"']
  sources = ['emoji', 'emoji', 'emoji', 'digits', 'digits', 'words']
  predictions = ['Cat face.', 'dog', 'moon', 'handwritten digit one', 'handwritten digit one',
                 'the word cat']  # case and punctuation do not count
  eval_captions = {'emoji': ['cat face', 'moon', 'sun', 'Moon'],  # 3 distinct after normalize
                   'digits': [f'handwritten digit {d}' for d in ('one', 'two')] * 3,
                   'words': ['the word "cat"', 'the word "dog"']}
  train_captions = {'emoji': ['moon', 'cat face', 'cat face', 'moon'],  # tie: the first
                    'digits': ['handwritten digit two', 'handwritten digit one'] * 2 + [
                        'handwritten digit two'],
                    'words': ['the word "dog"']}
  scores = tasks.caption_scores(predictions, captions, sources, eval_captions, train_captions)
  by_source = scores['by_source']
  assert list(by_source) == ['emoji', 'digits', 'words']
  assert by_source['emoji'] == pytest.approx({
      'examples': 3, 'accuracy': 2 / 3, 'chance': 1 / 3, 'majority': 1 / 3,
      'majority_caption': 'moon'})
  assert by_source['digits'] == pytest.approx({
      'examples': 2, 'accuracy': 1 / 2, 'chance': 1 / 2, 'majority': 1 / 2,
      'majority_caption': 'handwritten digit two'})
  assert by_source['words'] == pytest.approx({
      'examples': 1, 'accuracy': 1.0, 'chance': 1 / 2, 'majority': 0.0,
      'majority_caption': 'the word "dog"'})
  # Overall: every source weighed by its scored items.
  assert scores['examples'] == 6 and scores['accuracy'] == pytest.approx(4 / 6)
  assert scores['chance'] == pytest.approx((3 / 3 + 2 / 2 + 1 / 2) / 6)
  assert scores['majority'] == pytest.approx((3 / 3 + 2 / 2 + 0) / 6)


def test_speech_scores_mean_and_corpus_wer():
  transcripts = ['The cat sat.', 'A big dog!', 'Hello world.']
  scores = tasks.speech_scores(['the cat sat', 'a dog', ''], transcripts)
  # Per item: 0 edits of 3 words, 1 of 3, 2 of 2.
  assert scores == pytest.approx({'examples': 3, 'wer_mean': (0 + 1 / 3 + 1) / 3,
                                  'wer_corpus': 3 / 8, 'exact_match': 1 / 3})
  with pytest.raises(ValueError):
    tasks.speech_scores(['one prediction'], transcripts)


def test_speech_baselines():
  transcripts = ['the cat sat', 'hello world']
  baselines = tasks.speech_baselines(transcripts, ['the cat sat', 'hello there world'])
  assert baselines['empty'] == {'wer_mean': 1.0, 'wer_corpus': 1.0}
  # 'the cat sat': 0 and 3/2 (edits 0 + 3); 'hello there world': 3/3 and 1/2 (edits 3 + 1).
  assert baselines['train_sentence'] == pytest.approx({
      'wer_mean': ((0 + 3 / 2) / 2 + (1 + 1 / 2) / 2) / 2, 'wer_corpus': (3 / 5 + 4 / 5) / 2})


def test_keyword_scores_exact_word_with_chance_over_the_split():
  split_words = ['apple', 'river', 'apple', 'Stone', 'stone']  # 3 distinct after normalize
  scores = tasks.keyword_scores(['Apple.', 'rivers', 'stone'], ['apple', 'river', 'stone'],
                                split_words)
  assert scores == pytest.approx({'examples': 3, 'accuracy': 2 / 3, 'chance': 1 / 3})
  with pytest.raises(ValueError):
    tasks.keyword_scores(['apple'], ['apple', 'river'], split_words)


def test_suite_scores_the_training_prompts_and_writes_items_and_plot(tiny_run_dir, tmp_path,
                                                                     monkeypatch):
  loaded = load(tiny_run_dir, ['eval.task_examples=4', 'eval.batch_size=4'])
  prompts, generate_all = [], common.generate_all

  def spy(loaded, batch, tokenizer, **kwargs):
    prompts.extend(batch)
    return generate_all(loaded, batch, tokenizer, **kwargs)

  monkeypatch.setattr(common, 'generate_all', spy)
  figures = tasks.run(loaded, tmp_path)
  record = json.loads((tmp_path / 'tasks.json').read_text())
  assert record['suite'] == 'tasks' and record['figures'] == figures
  assert (tmp_path / 'tasks_accuracy.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # The first eval records, prompted exactly as in training.
  tokenizer, data = Tokenizer(), loaded.config.data
  splits = {name: module.builder(data.dir, data.subset).as_data_source('eval')
            for name, module in (('caption', image_caption), ('speech', speech))}
  voices = speech.builder(data.dir, data.subset)
  keywords = [voices.as_data_source(split) for split in ('keywords_eval', 'keywords_train')]
  expected = ([tasks_lib.caption_prompt(splits['caption'][i]['image'], tokenizer)
               for i in range(4)]
              + [tasks_lib.speech_prompt(splits['speech'][i]['audio'], tokenizer)
                 for i in range(4)]
              + [audio_haystack.keyword_prompt(split[i]['audio'], tokenizer)
                 for split in keywords for i in range(4)])
  assert len(prompts) == len(expected) == 16
  for prompt, want in zip(prompts, expected):
    got, want = interleave.flatten(prompt, tokenizer), interleave.flatten(want, tokenizer)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.patches, want.patches)
    np.testing.assert_array_equal(got.audio, want.audio)

  items = record['items']
  assert [item['task'] for item in items] == ['caption'] * 4 + ['speech'] * 4 + ['keyword'] * 8
  assert [item['reference'] for item in items] == (
      [splits['caption'][i]['caption'].decode() for i in range(4)]
      + [splits['speech'][i]['transcript'].decode() for i in range(4)]
      + [speech.keyword_of(split[i]['transcript'].decode()) for split in keywords
         for i in range(4)])
  assert [item['split'] for item in items[8:]] == ['keywords_eval'] * 4 + ['keywords_train'] * 4
  caption, spoken = figures['caption'], figures['speech']
  assert set(caption) == {'examples', 'accuracy', 'chance', 'majority', 'by_source'}
  assert caption['examples'] == spoken['examples'] == 4
  assert caption['accuracy'] == np.mean([item['correct'] for item in items[:4]])
  assert set(caption['by_source']) == {item['source'] for item in items[:4]}
  assert set(spoken) == {'examples', 'wer_mean', 'wer_corpus', 'exact_match', 'baselines'}
  assert spoken['wer_mean'] == pytest.approx(np.mean([item['wer'] for item in items[4:8]]))
  assert spoken['baselines']['empty'] == {'wer_mean': 1.0, 'wer_corpus': 1.0}
  longest = max(len(tasks_lib.answer(item['reference'], tokenizer).data) for item in items[4:8])
  assert figures['max_new_tokens']['speech'] == longest + tasks.ANSWER_SLACK
  longest = max(len(tasks_lib.answer(item['reference'], tokenizer).data) for item in items[8:])
  assert figures['max_new_tokens']['keyword'] == longest + tasks.ANSWER_SLACK  # both splits'
  for name, chosen in (('unseen_voices', items[8:12]), ('training_voices', items[12:])):
    scores = figures['keyword'][name]
    assert scores['examples'] == 4
    assert scores['accuracy'] == np.mean([item['correct'] for item in chosen])
    assert 0 < scores['chance'] <= 1
