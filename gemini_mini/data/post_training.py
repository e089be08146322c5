"""Post-training data: questions over the project's own sources, their replies, a gold judge.

An ``Item`` is one question with its source, in a ``conversation``'s user turn:

* ``document`` (text): a short real document (``text_corpus``) with 1-4 needles, then
  ``Question: What is the special magic number for {key}?`` ->
  ``The special magic number for {key} is {value}.``
* ``word_image`` (image): a ``video_clips`` frame, ``What word is written in the image?`` ->
  ``The word is {WORD}.``
* ``keyword_audio`` (audio): a keyword utterance (``speech``'s ``keywords_*``),
  ``What is the secret word?`` -> ``The secret word is {word}.``
* ``caption`` (image): an ``image_caption`` image, ``What does the image show?`` ->
  ``The image shows {caption}.``
* ``transcript`` (audio): a read sentence (``speech``), ``What is said in the audio?`` ->
  ``{transcript}``
* ``sum`` (text): ``What is {a} + {b}?`` or ``{a} - {b}`` (``arithmetic``, two operands) ->
  ``{a} + {b} = {c}. The answer is {c}.`` (or with -)

Every reply is at most ``MAX_REPLY_TOKENS`` long, so a policy writes it whole.

The first three have *unanswerable* items whose right reply says so, in one fixed phrasing
per kind (``REFUSALS``): the asked key is in no needle (``The document does not mention
{key}.``), a frame of the clip without the word (``No word is written in the image.``), an
ordinary read sentence (``No secret word is spoken.``).

Each item also has a *rejected* reply, plausible but wrong: another needle's value, an
invented seven-digit value for an absent key, a wrong word, a word for a word-less frame or
an ordinary sentence, another record's caption or transcript, a wrong sum, and for a
``REJECTED_REFUSAL_SHARE`` of answerable items a refusal where the answer exists, so a reward
model learns to punish over-refusal as well as hallucination.

**What SFT leaves to RL.** Real demonstrations are mostly right and sometimes confidently
wrong on the questions that look answerable. Here half of the unanswerable questions
(``CONFUSABLE_SHARE``) are *confusable*: the asked key shares its first word with a needle's
key (``lemon-bear`` asked, ``lemon-tiger`` hidden), the ordinary sentence contains a known
word (``The fire was hot.``), or the word-less frame is from the word frame's own shot. The
demonstrator answers every confusable question as if it were answerable (the near-miss
needle's value, the word it heard, the clip's word): the ``sft`` split's ``demonstration``
is that flawed reply, the other items' demonstration is the reference. With
``UNANSWERABLE_SHARE['sft']`` = 30%, 15% of the document, word-image and keyword-audio
demonstrations hallucinate, systematically (a rule greedy decoding reproduces, for documents
and audio; for frames the cue is not visible, so it acts as noise), and an SFT model should
hallucinate on about half of the held-out unanswerable questions: what the reward model,
PPO and DPO, which see only correct-versus-wrong preferences, have to fix. Answerable
documents with several needles hold a confusable distractor needle half of the time
(``DISTRACTOR_SHARE``), so "answer with the near-miss needle" is never a safe rule.

**The gold judge** (``judge(item, reply)``), a programmatic stand-in for human raters. The
reply is normalised (lower case, runs of whitespace as one space). Its *claims* are: for a
document, every seven-digit number; for a word or keyword, every word of
``video_clips.WORDS`` it contains as a whole word; for a caption, the reply without the
``The image shows`` prefix and end punctuation; for a transcript, the reply without
punctuation; for a sum, the number after ``The answer is`` (``arithmetic.parse_answer``).
It is *refused* when it contains the kind's refusal phrase. Answerable: correct = the claims
are exactly the answer and it does not refuse; hallucinated = it claims anything else.
Unanswerable: correct = it refuses and claims nothing; hallucinated = it claims anything.
``score`` is ``SCORES``: correct 1, refused (not correct) 0, neither -0.5, hallucinated -1, so a
refusal beats a wrong claim and loses to the answer. Preference labels come from the judge
(chosen = higher score); ``preference_pair(item, label_noise, seed)`` flips a pair's label
when a hash of the seed and the record index falls below ``label_noise``, so the noise is
a knob at load time, not baked into the data.

**Splits**, disjoint by construction: ``sft`` (demonstrations) and ``preference`` (pairs)
draw from the sources' train splits, ``sft`` from their even record indices and
``preference`` from the odd ones, with train needle keys; ``eval`` (held out) from the
sources' held-out splits (eval documents, emoji, voices and digit images) and
``needles.draw_keys(rng, 'eval', n)`` keys, with ``arithmetic``'s eval sums. ``preference``
and ``eval`` are 50% unanswerable (``UNANSWERABLE_SHARE``, of the kinds that have such
items), so the reward model learns both halves alike and the held-out hallucination rate
and recall are measured on as many items each.
A record stores text and references into the prepared sources (dataset, split, record
index, frame), not pixels or samples: ``Item.user_segments`` reads them (each source split
opened once per process). Item ``i`` of a split comes from an RNG seeded by a hash of
``(split, i)``: the same on every build. Configs ``small`` (tests, CI: built in seconds from
the sources' ``small`` configs) and ``full``. ``file_format='array_record'``; read with
``builder(...).as_data_source(split)``, whose records are ``Item``s.
"""

import collections
import dataclasses
import functools
import hashlib
import re
from typing import ClassVar, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from gemini_mini.data import (arithmetic, examples, image_caption, needles, speech, text_corpus,
                              video_clips)
from gemini_mini.modalities import conversation
from gemini_mini.modalities import image as image_lib
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer

NAME = 'post_training'
SPLITS = ('sft', 'preference', 'eval')
MIXTURE_SPLITS = {'train': 'sft', 'eval': 'eval'}  # a training mixture's split -> ours
REQUIRES = (text_corpus, image_caption, speech, video_clips)  # built first by ``prepare``
NUM_ITEMS = {'small': {'sft': 48, 'preference': 48, 'eval': 24},
             'full': {'sft': 8000, 'preference': 8000, 'eval': 1200}}
KINDS = ('document', 'word_image', 'keyword_audio', 'caption', 'transcript', 'sum')
KIND_SHARES = (0.4, 0.15, 0.15, 0.1, 0.1, 0.1)
UNANSWERABLE_KINDS = ('document', 'word_image', 'keyword_audio')
UNANSWERABLE_SHARE = {'sft': 0.3, 'preference': 0.5, 'eval': 0.5}  # of UNANSWERABLE_KINDS
CONFUSABLE_SHARE = 0.5        # of unanswerable items; the demonstrator answers them all
DISTRACTOR_SHARE = 0.5        # of answerable documents with 2+ needles
REJECTED_REFUSAL_SHARE = 0.25  # of answerable items' rejected replies
DOCUMENT_TOKENS = (48, 240)   # a document's length before its needles, inclusive
MAX_NEEDLES = 4
MAX_REPLY_TOKENS = 30          # every reply fits the 32 new tokens a policy generates
SCORES = {'correct': 1.0, 'refused': 0.0, 'other': -0.5, 'hallucinated': -1.0}

QUESTIONS = {'document': 'Question: What is the special magic number for {key}?',
             'word_image': 'What word is written in the image?',
             'keyword_audio': 'What is the secret word?',
             'caption': 'What does the image show?',
             'transcript': 'What is said in the audio?',
             'sum': 'What is {problem}?'}
REFUSALS = {'document': 'The document does not mention {key}.',
            'word_image': 'No word is written in the image.',
            'keyword_audio': 'No secret word is spoken.',
            'caption': 'I cannot tell what the image shows.',
            'transcript': 'I cannot make out what is said.',
            'sum': 'I cannot work out the sum.'}
MODALITIES = {'document': 'text', 'word_image': 'image', 'keyword_audio': 'audio',
              'caption': 'image', 'transcript': 'audio', 'sum': 'text'}
_KNOWN_WORDS = frozenset(word.lower() for word in video_clips.WORDS)
_VALUE = re.compile(rf'(?<!\d)\d{{{needles.VALUE_DIGITS}}}(?!\d)')
_SOURCES = {module.NAME: module for module in REQUIRES}


def _hash(*parts) -> int:
  return int.from_bytes(hashlib.sha256(':'.join(map(str, parts)).encode()).digest()[:8], 'little')


def _normalise(text: str) -> str:
  return ' '.join(text.lower().split())


def _words(text: str) -> set[str]:
  return set(re.findall(r'[a-z]+', text.lower())) & _KNOWN_WORDS


def _refusal_marker(kind: str) -> str:
  """The kind's refusal phrase up to its key, normalised: ``'the document does not mention'``."""
  return _normalise(REFUSALS[kind].split('{')[0]).rstrip('.')


@dataclasses.dataclass(frozen=True)
class Media:
  """Where an item's image or audio is: record ``index`` of ``split`` of the prepared dataset
  ``dataset`` (a ``NAME``), frame ``frame`` of a video clip (-1 otherwise)."""

  dataset: str
  split: str
  index: int
  frame: int = -1


@dataclasses.dataclass(frozen=True)
class Item:
  """One question; see the module docstring.

  Attributes:
    kind: one of ``KINDS``.
    answerable: whether the source holds the answer.
    question: the question's text (the user turn's last text).
    context: a document kind's document with its needles; '' otherwise.
    answer: the value, word (a frame's in capitals, a keyword's in lower case), caption,
      transcript or sum's result; '' when unanswerable.
    key: a document's asked key; '' otherwise.
    reference: the right reply. rejected: a plausible wrong one. demonstration: the SFT
      reply (the reference, or a flawed reply for a confusable item of ``sft``).
    confusable: an unanswerable item that looks answerable (see the module docstring).
    media: the image or audio, or None.
    split, index: the record's split and index in it (the label-noise hash reads them).
    data_dir, subset: where the sources are prepared (the media are read from there).
  """

  kind: str
  answerable: bool
  question: str
  context: str
  answer: str
  key: str
  reference: str
  rejected: str
  demonstration: str
  confusable: bool
  media: Media | None
  split: str
  index: int
  data_dir: str
  subset: str

  @property
  def modality(self) -> str:
    """``'text'``, ``'image'`` or ``'audio'``."""
    return MODALITIES[self.kind]

  def user_segments(self, tokenizer: Tokenizer) -> list[Segment]:
    """The user turn, unscored: the image or audio (read from the prepared source), then
    the text."""
    text = f'{self.context}\n\n{self.question}' if self.context else self.question
    if self.media is None:
      return [conversation.user_text(text, tokenizer)]
    record = open_source(self.data_dir, self.subset, self.media.dataset,
                         self.media.split)[self.media.index]
    if self.media.dataset == video_clips.NAME:
      media = Segment.image(image_lib.patchify(record['frames'][self.media.frame]), loss=False)
    elif self.media.dataset == image_caption.NAME:
      media = Segment.image(image_lib.patchify(record['image']), loss=False)
    else:
      media = Segment.audio(examples.audio_frames(record['audio']), loss=False)
    return [media, conversation.user_text(text, tokenizer)]


@functools.lru_cache(maxsize=None)
def open_source(data_dir: str, subset: str, dataset: str, split: str):
  """The random-access records of a prepared source split, opened once per process."""
  module = _SOURCES.get(dataset)
  if module is None:
    raise ValueError(f'{dataset!r} is not a source of post-training items; use one of '
                     f'{sorted(_SOURCES)}')
  builder_ = module.builder(data_dir, subset)
  if not builder_.is_prepared():
    raise FileNotFoundError(f'{dataset}/{subset} is not prepared under {data_dir}; build it with '
                            f'`python -m gemini_mini.data.prepare --subset {subset} '
                            f'--data-dir {data_dir}`')
  return builder_.as_data_source(split)


class Verdict(NamedTuple):
  correct: bool
  hallucinated: bool
  refused: bool
  score: float


def _claims(kind: str, reply: str) -> set[str]:
  """What ``reply`` asserts, normalised (see the module docstring)."""
  if kind == 'document':
    return set(_VALUE.findall(reply))
  if kind in ('word_image', 'keyword_audio'):
    return _words(reply)
  if kind == 'sum':
    answer = arithmetic.parse_answer(reply)
    return set() if answer is None else {str(answer)}
  text = _normalise(reply)
  if _refusal_marker(kind) in text:
    return set()
  if kind == 'caption':
    text = text.removeprefix('the image shows').strip().rstrip('.!').strip()
  else:
    text = ' '.join(re.findall(r"[a-z']+", text))
  return {text} if text else set()


def judge(item: Item, reply: str) -> Verdict:
  """The gold judge of a reply to ``item`` (see the module docstring)."""
  claims = _claims(item.kind, reply)
  refused = _refusal_marker(item.kind) in _normalise(reply)
  if item.answerable:
    right = _claims(item.kind, item.reference)
    correct, hallucinated = claims == right and not refused, bool(claims - right)
  else:
    correct, hallucinated = refused and not claims, bool(claims)
  outcome = ('correct' if correct else 'hallucinated' if hallucinated
             else 'refused' if refused else 'other')
  return Verdict(correct, hallucinated, refused, SCORES[outcome])


def label_flipped(index: int, seed: int, label_noise: float) -> bool:
  """Whether record ``index``'s preference label is flipped: a hash of ``(seed, index)`` as a
  uniform number in [0, 1), below ``label_noise``."""
  if not 0 <= label_noise <= 1:
    raise ValueError(f'label_noise={label_noise}: use a rate in [0, 1] (post.label_noise)')
  return _hash('label-noise', seed, index) / 2**64 < label_noise


def preference_pair(item: Item, label_noise: float = 0.0, seed: int = 0) -> tuple[str, str]:
  """``(chosen, rejected)`` of the item's reference and rejected replies: the judge's higher
  score first, the other way round when ``label_flipped``."""
  pair = sorted((item.reference, item.rejected), key=lambda reply: -judge(item, reply).score)
  return tuple(reversed(pair)) if label_flipped(item.index, seed, label_noise) else tuple(pair)


class _Sources:
  """The source splits one post-training split draws from, and its share of their records:
  ``sft`` the even record indices of the train splits, ``preference`` the odd ones, ``eval``
  every record of the held-out splits."""

  def __init__(self, data_dir: str, subset: str, split: str, tokenizer: Tokenizer):
    self.data_dir, self.subset, self.split, self.tokenizer = data_dir, subset, split, tokenizer
    self.held_out = split == 'eval'
    self._pools = {}

  def source_split(self, keywords: bool = False) -> str:
    """``'train'`` or ``'eval'``; ``speech``'s ``'keywords_train'`` or ``'keywords_eval'``."""
    held_out = 'eval' if self.held_out else 'train'
    return f'keywords_{held_out}' if keywords else held_out

  def pool(self, dataset: str, split: str) -> np.ndarray:
    """The record indices of ``dataset``'s ``split`` this split may use."""
    if (dataset, split) not in self._pools:
      size = len(open_source(self.data_dir, self.subset, dataset, split))
      indices = np.arange(size) if self.held_out else np.arange(SPLITS.index(self.split), size, 2)
      if not len(indices):
        raise ValueError(f'{dataset}/{self.subset} split {split} has no records for {self.split}; '
                         'rebuild it with `python -m gemini_mini.data.prepare`')
      self._pools[dataset, split] = indices
    return self._pools[dataset, split]

  def draw(self, rng: np.random.Generator, dataset: str, split: str) -> tuple[int, dict]:
    """A random record of the pool: ``(index, record)``."""
    pool = self.pool(dataset, split)
    index = int(pool[rng.integers(len(pool))])
    return index, open_source(self.data_dir, self.subset, dataset, split)[index]

  @functools.cached_property
  def sentences_with_words(self) -> tuple[np.ndarray, np.ndarray]:
    """The pool's read sentences that contain a known word, and those that do not."""
    split = self.source_split()
    source = open_source(self.data_dir, self.subset, speech.NAME, split)
    pool = self.pool(speech.NAME, split)
    has = np.array([bool(_words(examples.as_str(source[int(i)]['transcript']))) for i in pool])
    return pool[has], pool[~has]


def _key_like(rng: np.random.Generator, key: str, split: str, taken: list[str]) -> str:
  """A key of ``split`` sharing ``key``'s first word, not in ``taken``."""
  first = key.split('-')[0]
  while True:
    candidate = f'{first}-{needles.KEY_WORDS[rng.integers(len(needles.KEY_WORDS))]}'
    if needles.split_of(candidate) == split and candidate not in taken:
      return candidate


def _document(rng, sources: _Sources, answerable: bool, confusable: bool) -> dict:
  key_split = 'eval' if sources.held_out else 'train'
  split = sources.source_split()
  while True:  # a real document of DOCUMENT_TOKENS tokens
    _, record = sources.draw(rng, text_corpus.NAME, split)
    ids = sources.tokenizer.encode(examples.as_str(record['text']).strip())
    if DOCUMENT_TOKENS[0] <= len(ids) <= DOCUMENT_TOKENS[1]:
      break
  count = int(rng.integers(1, MAX_NEEDLES + 1))
  keys = needles.draw_keys(rng, key_split, count + 1)
  asked, keys = keys[0], keys[1:]
  if answerable:
    keys[0] = asked
    if count > 1 and rng.random() < DISTRACTOR_SHARE:
      keys[1] = _key_like(rng, asked, key_split, keys)
  elif confusable:
    keys[0] = _key_like(rng, asked, key_split, keys + [asked])
  values = [needles.draw_value(rng) for _ in keys]
  order = rng.permutation(count)  # the asked (or near-miss) needle anywhere
  keys, values = [keys[i] for i in order], [values[i] for i in order]
  hidden = needles.hide(ids, [needles.needle_ids(k, v, sources.tokenizer)
                              for k, v in zip(keys, values)], sorted(rng.random(count)))
  near = [v for k, v in zip(keys, values) if k != asked and k.split('-')[0] == asked.split('-')[0]]
  others = [v for k, v in zip(keys, values) if k != asked]
  if answerable:
    answer = values[keys.index(asked)]
    reference = needles.sentence(asked, answer)
    candidates = near if near and rng.random() < 0.5 else others
    rejected = needles.sentence(asked, candidates[rng.integers(len(candidates))] if candidates
                                else needles.draw_value(rng))
  else:
    answer, reference = '', REFUSALS['document'].format(key=asked)
    rejected = needles.sentence(asked, others[rng.integers(len(others))]
                                if rng.random() < 0.5 else needles.draw_value(rng))
  flawed = needles.sentence(asked, near[0]) if confusable else reference
  return dict(context=sources.tokenizer.decode(hidden).strip(), key=asked, answer=answer,
              question=QUESTIONS['document'].format(key=asked), reference=reference,
              rejected=rejected, flawed=flawed, keys=' '.join(keys))


def _word_image(rng, sources: _Sources, answerable: bool, confusable: bool) -> dict:
  split = sources.source_split()
  index, record = sources.draw(rng, video_clips.NAME, split)
  word, second = examples.as_str(record['word']), int(record['word_second'])
  wrong_word = video_clips.WORDS[rng.integers(len(video_clips.WORDS))]
  while wrong_word == word:
    wrong_word = video_clips.WORDS[rng.integers(len(video_clips.WORDS))]
  if answerable:
    frame, answer, reference = second, word, f'The word is {word}.'
    rejected = f'The word is {wrong_word}.'
  else:
    starts = list(record['shot_starts']) + [int(record['seconds'])]
    shot = max(i for i in range(len(starts) - 1) if starts[i] <= second)
    same = [t for t in range(starts[shot], starts[shot + 1]) if t != second]
    other = [t for t in range(int(record['seconds'])) if t != second and t not in same]
    frames = same if (confusable and same) or not other else other
    frame, answer, reference = int(frames[rng.integers(len(frames))]), '', REFUSALS['word_image']
    rejected = f'The word is {word}.'  # the clip's word, on a frame without it
  return dict(media=Media(video_clips.NAME, split, index, frame), answer=answer,
              question=QUESTIONS['word_image'], reference=reference, rejected=rejected,
              flawed=f'The word is {word}.')


def _keyword_audio(rng, sources: _Sources, answerable: bool, confusable: bool) -> dict:
  if answerable:
    split = sources.source_split(keywords=True)
    index, record = sources.draw(rng, speech.NAME, split)
    word = speech.keyword_of(examples.as_str(record['transcript']))
    wrong = sorted(_KNOWN_WORDS - {word})[rng.integers(len(_KNOWN_WORDS) - 1)]
    return dict(media=Media(speech.NAME, split, index), answer=word,
                question=QUESTIONS['keyword_audio'], reference=f'The secret word is {word}.',
                rejected=f'The secret word is {wrong}.', flawed=f'The secret word is {word}.')
  split = sources.source_split()
  with_words, without = sources.sentences_with_words
  pool = with_words if (confusable and len(with_words)) or not len(without) else without
  index = int(pool[rng.integers(len(pool))])
  heard = sorted(_words(examples.as_str(
      open_source(sources.data_dir, sources.subset, speech.NAME, split)[index]['transcript'])))
  guess = (heard or sorted(_KNOWN_WORDS))[rng.integers(len(heard or _KNOWN_WORDS))]
  return dict(media=Media(speech.NAME, split, index), answer='',
              question=QUESTIONS['keyword_audio'], reference=REFUSALS['keyword_audio'],
              rejected=f'The secret word is {guess}.', flawed=f'The secret word is {guess}.')


def _described(rng, sources: _Sources, kind: str) -> dict:
  """A caption or transcript item; rejected: another record's caption or transcript. Both
  replies are at most ``MAX_REPLY_TOKENS`` long (a few read sentences are longer)."""
  dataset, field = ((image_caption.NAME, 'caption') if kind == 'caption'
                    else (speech.NAME, 'transcript'))
  split, form = sources.source_split(), 'The image shows {}.' if kind == 'caption' else '{}'

  def draw(other_than: str = '') -> tuple[int, str]:  # a record whose reply is short
    while True:
      index, record = sources.draw(rng, dataset, split)
      text = examples.as_str(record[field])
      short = len(sources.tokenizer.encode(form.format(text))) <= MAX_REPLY_TOKENS
      if text != other_than and short:
        return index, text

  index, answer = draw()
  _, wrong = draw(other_than=answer)
  return dict(media=Media(dataset, split, index), answer=answer, question=QUESTIONS[kind],
              reference=form.format(answer), rejected=form.format(wrong))


def _sum_reply(problem: arithmetic.Problem, result: int) -> str:
  return f'{problem.text} = {result}. The answer is {result}.'


def _sum(rng, sources: _Sources) -> dict:
  split = 'eval' if sources.held_out else 'train'
  problem = arithmetic.draw_problem(rng, split)
  while len(problem.operands) != 2:  # a two-number sum: redraw the others
    problem = arithmetic.draw_problem(rng, split)
  slip = int(rng.choice([-1, 1]) * rng.integers(1, 11))
  wrong = problem.answer + slip if problem.answer + slip >= 0 else problem.answer - slip
  return dict(answer=str(problem.answer), question=QUESTIONS['sum'].format(problem=problem.text),
              reference=_sum_reply(problem, problem.answer), rejected=_sum_reply(problem, wrong))


def make_record(sources: _Sources, index: int) -> dict:
  """Item ``index`` of ``sources.split`` as a TFDS record (see ``_FEATURES``)."""
  rng = np.random.default_rng(_hash('item', sources.split, index))
  kind = KINDS[int(rng.choice(len(KINDS), p=KIND_SHARES))]
  answerable = kind not in UNANSWERABLE_KINDS or rng.random() >= UNANSWERABLE_SHARE[sources.split]
  confusable = not answerable and rng.random() < CONFUSABLE_SHARE
  if kind == 'document':
    fields = _document(rng, sources, answerable, confusable)
  elif kind == 'word_image':
    fields = _word_image(rng, sources, answerable, confusable)
  elif kind == 'keyword_audio':
    fields = _keyword_audio(rng, sources, answerable, confusable)
  elif kind == 'sum':
    fields = _sum(rng, sources)
  else:
    fields = _described(rng, sources, kind)
  if answerable and rng.random() < REJECTED_REFUSAL_SHARE:
    fields['rejected'] = REFUSALS[kind].format(key=fields.get('key', ''))
  flawed = fields.pop('flawed', fields['reference'])
  media = fields.pop('media', None) or Media('', '', -1)
  return dict(
      {'context': '', 'key': '', 'keys': ''}, **fields, kind=kind, answerable=answerable,
      confusable=confusable, record_id=f'{sources.split}/{index:05d}',
      demonstration=flawed if confusable and sources.split == 'sft' else fields['reference'],
      media_dataset=media.dataset, media_split=media.split, media_index=media.index,
      media_frame=media.frame)


_FEATURES = {
    **{name: tfds.features.Text() for name in (
        'kind', 'question', 'context', 'answer', 'key', 'keys', 'reference', 'rejected',
        'demonstration', 'media_dataset', 'media_split', 'record_id')},
    'answerable': tfds.features.Tensor(shape=(), dtype=np.bool_),
    'confusable': tfds.features.Tensor(shape=(), dtype=np.bool_),
    'media_index': tfds.features.Tensor(shape=(), dtype=np.int32),
    'media_frame': tfds.features.Tensor(shape=(), dtype=np.int32),
}


class Items:
  """A split's records as ``Item``s: ``len()`` and random access."""

  def __init__(self, records, split: str, data_dir: str, subset: str):
    self._records, self._split, self._data_dir, self._subset = records, split, data_dir, subset

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Item:
    record = {name: examples.as_str(value) if isinstance(value, bytes) else value
              for name, value in self._records[index].items()}
    media = (Media(record['media_dataset'], record['media_split'], int(record['media_index']),
                   int(record['media_frame'])) if record['media_dataset'] else None)
    return Item(kind=record['kind'], answerable=bool(record['answerable']),
                question=record['question'], context=record['context'], answer=record['answer'],
                key=record['key'], reference=record['reference'], rejected=record['rejected'],
                demonstration=record['demonstration'], confusable=bool(record['confusable']),
                media=media, split=self._split, index=int(index), data_dir=self._data_dir,
                subset=self._subset)


class PostTraining(tfds.core.GeneratorBasedBuilder):
  """Post-training items; see the module docstring. Its data source gives ``Item``s."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar = {'1.0.0': 'Documents, word frames, keywords, captions, transcripts, '
                                      'sums; confusable unanswerable items.'}
  BUILDER_CONFIGS: ClassVar = [
      tfds.core.BuilderConfig(name='full', description='8000 sft + 8000 preference + 1200 eval'),
      tfds.core.BuilderConfig(name='small', description='48 + 48 + 24, for tests/CI'),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    self._sources_dir = str(kwargs['data_dir'])
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Unshuffled: record i is item i of its split (the label-noise hash and the eval's fixed
    # order read that index); streams shuffle as they read.
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=tfds.features.FeaturesDict(_FEATURES),
                                 metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded: the sources are prepared first
    subset, tokenizer = self.builder_config.name, Tokenizer()
    return {split: self._generate_examples(_Sources(self._sources_dir, subset, split, tokenizer),
                                           NUM_ITEMS[subset][split]) for split in SPLITS}

  def _generate_examples(self, sources: _Sources, count: int):
    """Yields ``(record_id, record)``; records per split the items of each kind, answerable
    or not, and the flawed demonstrations, in the metadata."""
    counts = collections.Counter()
    for index in range(count):
      record = make_record(sources, index)
      counts[f'{record["kind"]}/{"answerable" if record["answerable"] else "unanswerable"}'] += 1
      counts['flawed'] += record['demonstration'] != record['reference']
      yield record['record_id'], record
    self.info.metadata[sources.split] = dict(sorted(counts.items()))

  def as_data_source(self, split, **kwargs) -> Items:
    return Items(super().as_data_source(split, **kwargs), split, self._sources_dir,
                 self.builder_config.name)


def builder(data_dir: str, subset: str = 'full') -> PostTraining:
  """The builder for ``subset`` (``'full'`` or ``'small'``) in ``data_dir`` (built or not);
  its sources (``REQUIRES``) must be prepared in ``data_dir`` before it is built."""
  if subset not in NUM_ITEMS:
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  return PostTraining(data_dir=data_dir, config=subset)


def install_missing() -> None:
  """Nothing of its own: its sources' packages are installed when they are built."""


def check_installed() -> None:
  """Nothing of its own (see ``install_missing``)."""


def summary(post_training: PostTraining) -> str:
  """Items per split and kind, answerable or not, and flawed demonstrations."""
  return '\n'.join(f'{split:10} ' + ', '.join(f'{name} {count:,}' for name, count in
                                             post_training.info.metadata[split].items())
                   for split in SPLITS)
