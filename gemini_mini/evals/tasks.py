"""Tasks suite: held-out image captioning and speech transcription, greedy, with baselines.

Each task takes the first ``eval.task_examples`` records of its dataset's ``eval`` split,
builds the prompt the training task uses (``data.tasks.caption_prompt`` /
``speech_prompt``), generates greedily until eos (``common.generate_all``; at most the
longest reference answer plus ``ANSWER_SLACK`` tokens) and scores the text:

* captions (``image_caption``: new images of the classes training saw): exact match after
  ``common.normalize``, overall and per source (emoji, digits, words), against two
  baselines per source: ``chance``, 1 / the distinct captions of that source in the whole
  eval split, and ``majority``, the accuracy on the scored items of always answering the
  source's most common training caption (the first of those tied: the splits are
  balanced, so it sits near chance). Overall baselines average the sources' by their
  scored items (a guesser who can tell the source from the image).
* speech (``speech``: unseen sentences read by unseen voices): word error rate, the mean of
  per-item WERs and the corpus WER (all edits / all reference words), and the exact-match
  rate. Baselines: ``empty``, answering nothing (WER 1 by definition), and
  ``train_sentence``, answering one fixed training transcript for every item, averaged
  over ``BASELINE_SENTENCES`` of them drawn with ``eval.seed`` (a fluent answer that ignores
  the audio; training transcripts are all distinct, so there is no most common one).
  Eval sentences are never in training, so an exact match is never chance.
* keywords (``speech``'s keyword utterances, ``The secret word is apple.``, prompted as the
  ``keyword`` task: the audio haystack's recognition step without filler): exact match of
  the word, for the ``keywords_eval`` split (known words said by unseen voices: the held-out
  figure) and for the ``keywords_train`` split (the training voices: tells a model that has
  not learnt the words from one that has learnt them and does not carry them to new
  voices), each its first ``eval.task_examples`` utterances; ``chance``, 1 / the distinct
  words of the split.

Writes ``tasks.json``: figures ``{'caption': {'examples', 'accuracy', 'chance',
'majority', 'by_source': {SOURCE: the same four and 'majority_caption'}}, 'speech':
{'examples', 'wer_mean', 'wer_corpus', 'exact_match', 'baselines': {'empty',
'train_sentence': {'wer_mean', 'wer_corpus'}}}, 'keyword': {'unseen_voices',
'training_voices': {'examples', 'accuracy', 'chance'}}, 'max_new_tokens': {'caption',
'speech', 'keyword'}}`` and ``items``, one per example (``task``, its id, ``reference``,
``prediction``, ``correct``; captions add ``source``, speech ``voice`` and ``wer``, keywords
``voice`` and ``split``); and ``tasks_accuracy.png`` (caption and keyword accuracy against
their baselines; speech WER against its baselines).
"""

import collections
import pathlib
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from gemini_mini.data import audio_haystack, image_caption, prepare, speech
from gemini_mini.data import tasks as tasks_lib
from gemini_mini.data.examples import as_str
from gemini_mini.evals import common
from gemini_mini.infer.load import Loaded

SUITE = 'tasks'
ANSWER_SLACK = 8         # generated tokens allowed beyond the longest reference answer
BASELINE_SENTENCES = 32  # training transcripts tried as a constant answer


def caption_scores(predictions: Sequence[str], captions: Sequence[str], sources: Sequence[str],
                   eval_captions: Mapping[str, Sequence[str]],
                   train_captions: Mapping[str, Sequence[str]]) -> dict:
  """Exact-match accuracy overall and per source, with the baselines of the module docstring.

  Args:
    predictions, captions, sources: one per scored item.
    eval_captions: source -> every caption of that source in the eval split (``chance``).
    train_captions: source -> every caption of that source in the training split, in split
      order (``majority``).

  Returns:
    ``{'examples', 'accuracy', 'chance', 'majority', 'by_source': {source: {'examples',
    'accuracy', 'chance', 'majority', 'majority_caption'}}}``, sources in order of first
    appearance.
  """
  by_source = {}
  for source in dict.fromkeys(sources):
    chosen = [i for i, s in enumerate(sources) if s == source]
    # most_common keeps first-seen order among ties: the first of the tied captions.
    majority = collections.Counter(train_captions[source]).most_common(1)[0][0]
    mean_match = lambda answers: float(np.mean([common.exact_match(answer, captions[i])
                                                for answer, i in zip(answers, chosen)]))
    by_source[source] = {
        'examples': len(chosen),
        'accuracy': mean_match([predictions[i] for i in chosen]),
        'chance': 1 / len({common.normalize(c) for c in eval_captions[source]}),
        'majority': mean_match([majority] * len(chosen)), 'majority_caption': majority}
  weights = {source: scores['examples'] for source, scores in by_source.items()}
  mean = lambda key: sum(weights[s] * by_source[s][key] for s in by_source) / len(captions)
  return {'examples': len(captions), 'accuracy': mean('accuracy'), 'chance': mean('chance'),
          'majority': mean('majority'), 'by_source': by_source}


def speech_scores(predictions: Sequence[str], transcripts: Sequence[str]) -> dict:
  """``{'examples', 'wer_mean', 'wer_corpus', 'exact_match'}`` of predictions against the
  transcripts (``common.word_error_rate``; the corpus WER weighs items by their words)."""
  wers = [common.word_error_rate(p, t) for p, t in zip(predictions, transcripts, strict=True)]
  words = [len(common.normalize(t).split()) for t in transcripts]
  return {'examples': len(transcripts), 'wer_mean': float(np.mean(wers)),
          'wer_corpus': float(np.dot(wers, words) / max(sum(words), 1)),
          'exact_match': float(np.mean([common.exact_match(p, t)
                                        for p, t in zip(predictions, transcripts)]))}


def speech_baselines(transcripts: Sequence[str], train_sentences: Sequence[str]) -> dict:
  """WERs (``wer_mean``, ``wer_corpus``) of answering ``''`` to every item (``empty``) and
  of answering one training sentence to every item, averaged over ``train_sentences``
  (``train_sentence``)."""
  wer = lambda scores: {key: scores[key] for key in ('wer_mean', 'wer_corpus')}
  constant = [wer(speech_scores([sentence] * len(transcripts), transcripts))
              for sentence in train_sentences]
  return {'empty': wer(speech_scores([''] * len(transcripts), transcripts)),
          'train_sentence': {key: float(np.mean([c[key] for c in constant]))
                             for key in ('wer_mean', 'wer_corpus')}}


def _generate(loaded: Loaded, prompts, answers: Sequence[str], tokenizer) -> tuple[list, int]:
  """Greedy continuations of ``prompts`` and the ``max_new_tokens`` they were allowed."""
  longest = max(len(tasks_lib.answer(text, tokenizer).data) for text in answers)  # with eos
  max_new_tokens = longest + ANSWER_SLACK
  generations = common.generate_all(loaded, prompts, tokenizer, max_new_tokens=max_new_tokens)
  return [generation.text for generation in generations], max_new_tokens


def _captions(loaded: Loaded, tokenizer) -> tuple[dict, list, int]:
  data = loaded.config.data
  built = prepare.ensure_dataset(image_caption, data.dir, data.subset)
  split = built.as_data_source('eval')
  records = [split[i] for i in range(min(loaded.config.eval.task_examples, len(split)))]
  split_captions = {}  # split -> source -> its captions, in split order
  for name, source in (('eval', split), ('train', built.as_data_source('train'))):
    split_captions[name] = collections.defaultdict(list)
    for record in source:
      split_captions[name][as_str(record['source'])].append(as_str(record['caption']))
  captions = [as_str(record['caption']) for record in records]
  sources = [as_str(record['source']) for record in records]
  predictions, max_new_tokens = _generate(
      loaded, [tasks_lib.caption_prompt(record['image'], tokenizer) for record in records],
      captions, tokenizer)
  items = [{'task': 'caption', 'example_id': as_str(record['example_id']), 'source': source,
            'reference': caption, 'prediction': prediction,
            'correct': common.exact_match(prediction, caption)}
           for record, source, caption, prediction in zip(records, sources, captions,
                                                          predictions)]
  scores = caption_scores(predictions, captions, sources, split_captions['eval'],
                          split_captions['train'])
  return scores, items, max_new_tokens


def _speech(loaded: Loaded, tokenizer) -> tuple[dict, list, int]:
  data, settings = loaded.config.data, loaded.config.eval
  built = prepare.ensure_dataset(speech, data.dir, data.subset)
  split, train = built.as_data_source('eval'), built.as_data_source('train')
  records = [split[i] for i in range(min(settings.task_examples, len(split)))]
  transcripts = [as_str(record['transcript']) for record in records]
  predictions, max_new_tokens = _generate(
      loaded, [tasks_lib.speech_prompt(record['audio'], tokenizer) for record in records],
      transcripts, tokenizer)
  chosen = np.random.default_rng(settings.seed).choice(
      len(train), min(BASELINE_SENTENCES, len(train)), replace=False)
  scores = speech_scores(predictions, transcripts)
  scores['baselines'] = speech_baselines(
      transcripts, [as_str(train[int(i)]['transcript']) for i in chosen])
  items = [{'task': 'speech', 'sentence_id': as_str(record['sentence_id']),
            'voice': as_str(record['voice']), 'reference': transcript, 'prediction': prediction,
            'correct': common.exact_match(prediction, transcript),
            'wer': common.word_error_rate(prediction, transcript)}
           for record, transcript, prediction in zip(records, transcripts, predictions)]
  return scores, items, max_new_tokens


def keyword_scores(predictions: Sequence[str], words: Sequence[str], split_words: Sequence[str]
                   ) -> dict:
  """``{'examples', 'accuracy', 'chance'}``: exact match of ``predictions`` against ``words``;
  ``chance`` is 1 / the distinct words of the whole split (``split_words``)."""
  return {'examples': len(words),
          'accuracy': float(np.mean([common.exact_match(p, w)
                                     for p, w in zip(predictions, words, strict=True)])),
          'chance': 1 / len({common.normalize(word) for word in split_words})}


def _keywords(loaded: Loaded, tokenizer) -> tuple[dict, list, int]:
  data = loaded.config.data
  built = prepare.ensure_dataset(speech, data.dir, data.subset)
  splits = {'unseen_voices': 'keywords_eval', 'training_voices': 'keywords_train'}
  split_words, records, words = {}, {}, {}  # per name: all words of the split; the scored ones
  for name, split_name in splits.items():
    split = built.as_data_source(split_name)
    split_words[name] = [speech.keyword_of(as_str(record['transcript'])) for record in split]
    count = min(loaded.config.eval.task_examples, len(split))
    records[name], words[name] = [split[i] for i in range(count)], split_words[name][:count]
  predictions, max_new_tokens = _generate(  # both splits in one pass, with one token budget
      loaded, [audio_haystack.keyword_prompt(record['audio'], tokenizer)
               for name in splits for record in records[name]],
      [word for name in splits for word in words[name]], tokenizer)
  answers = iter(predictions)
  scores, items = {}, []
  for name, split_name in splits.items():
    got = [next(answers) for _ in words[name]]
    scores[name] = keyword_scores(got, words[name], split_words[name])
    items += [{'task': 'keyword', 'split': split_name,
               'sentence_id': as_str(record['sentence_id']), 'voice': as_str(record['voice']),
               'reference': word, 'prediction': prediction,
               'correct': common.exact_match(prediction, word)}
              for record, word, prediction in zip(records[name], words[name], got)]
  return scores, items, max_new_tokens


def plot(figures: dict, path: pathlib.Path, *, step: int) -> None:
  """Caption accuracy per source (and all) and keyword accuracy per voice split, against
  chance (and majority, captions); speech WER against its baselines."""
  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=(5, 2))
  caption, keyword = figures['caption'], figures['keyword']
  groups = {**caption['by_source'], 'all': caption,
            'keywords,\nunseen voices': keyword['unseen_voices'],
            'keywords,\ntraining voices': keyword['training_voices']}
  x = np.arange(len(groups))
  for offset, key in ((-0.27, 'accuracy'), (0, 'chance'), (0.27, 'majority')):
    bars = left.bar(x + offset, [scores.get(key, np.nan) for scores in groups.values()], 0.27,
                    label=key)
    left.bar_label(bars, fmt='%.2f', fontsize=7)
  left.set_xticks(x, [f'{name}\n({scores["examples"]})' for name, scores in groups.items()])
  left.set(ylim=(0, 1.05), ylabel='exact match', title='Captions and spoken keywords (examples)')
  left.legend(fontsize=8)
  spoken = figures['speech']
  wers = {'model': spoken['wer_corpus'], 'empty': spoken['baselines']['empty']['wer_corpus'],
          'training\nsentence': spoken['baselines']['train_sentence']['wer_corpus']}
  right.bar_label(right.bar(list(wers), list(wers.values()), color=['C0', 'C1', 'C2']),
                  fmt='%.2f', fontsize=8)
  right.set(ylabel='corpus WER (lower is better)',
            title=f'Speech ({spoken["examples"]}), exact {spoken["exact_match"]:.0%}')
  figure.suptitle(f'Held-out tasks, greedy (step {step})')
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def run(loaded: Loaded, out_dir) -> dict:
  """Generates and scores the three tasks, writes the JSON and the plot; returns the figures
  (see the module docstring)."""
  skipped = common.skip_for_text_only(loaded, 'images and speech')
  if skipped:
    return skipped
  tokenizer = loaded.tokenizer
  caption, caption_items, caption_tokens = _captions(loaded, tokenizer)
  spoken, speech_items, speech_tokens = _speech(loaded, tokenizer)
  keyword, keyword_items, keyword_tokens = _keywords(loaded, tokenizer)
  figures = {'caption': caption, 'speech': spoken, 'keyword': keyword,
             'max_new_tokens': {'caption': caption_tokens, 'speech': speech_tokens,
                                'keyword': keyword_tokens}}
  common.write_result(out_dir, SUITE, loaded, figures,
                      caption_items + speech_items + keyword_items)
  plot(figures, pathlib.Path(out_dir) / f'{SUITE}_accuracy.png', step=loaded.step)
  return figures
