"""TFDS builder of synthetic speech: real sentences read aloud by espeak-ng at 16 kHz.

Sentences: every distinct sentence of 3 to 15 words in the Debian fortunes (read through
``sources``), kept only if it starts with a capital, ends with ``.``, ``!`` or ``?`` and holds
nothing but ASCII letters, spaces and ``,;:'!?.-`` (no digits, quotes or ``--``
attributions), so the transcript says exactly what is spoken. Duplicates (ignoring case)
are dropped; about 14k sentences remain.

Splits, disjoint in sentences AND voices by construction:
  ``eval``: sentences whose hash (of the lower-cased text) falls in 10%, read by voices that
    training never hears: every variant of the ``en-029`` (Caribbean) accent, and the
    ``m3`` and ``f3`` variants of every accent.
  ``train``: the other sentences, read by the other voices (7 accents x 10 variants).
Each split keeps its ``num_examples`` sentences with the smallest selection hash, so the
``small`` config's sentences are a subset of ``full``'s and neither changes between builds.
Each sentence's voice, speed (140-190 words a minute) and pitch (25-75) come from an RNG
seeded by the sentence's hash: the same audio on every build, whatever the thread order.

Keyword splits, for the audio needle in a haystack (``audio_haystack``): ``keywords_train``
and ``keywords_eval`` hold ``KEYWORD_TEXT`` (``The secret word is apple.``) for every word
of ``video_clips.WORDS``, each said by ``KEYWORD_VOICES`` voices of the ``train`` (16) or
``eval`` (2) voice split, picked with the speed and pitch by an RNG seeded by the word. The
words are shared, the voices disjoint: eval hears known words said by unseen voices. Each
split keeps its ``num_examples`` utterances with the smallest selection hash (``small``'s
are the first of ``full``'s); ``keyword_of(transcript)`` gives an utterance's word.

Configs: ``small`` (32 train + 16 eval examples, 2.6 minutes of audio, plus 24 + 12
keyword utterances; 7 MB, built in about 4 s) and ``full`` (3000 + 300, 2.8 hours of audio,
plus 2,544 + 318 keyword utterances, 87 minutes; 437 MB; about 110 s on 2 cores, ~1 GB peak
memory, mostly TFDS's split writer).

Features: ``audio`` int16 PCM samples at 16 kHz, mono, shape ``[N]``; ``transcript``;
``voice`` (``'en-gb-scotland+f2'``, an espeak-ng ``-v`` argument); ``speed``, ``pitch``
(int32, espeak-ng's ``-s`` and ``-p``); ``sentence_id`` (``'<fortune file>/<fortune>/<n>'``,
a keyword utterance's ``'keyword/APPLE/en-us+m1'``; unique in its split, also the example
key). ``file_format='array_record'``: no TensorFlow needed; read
with ``builder.as_data_source(split)``; scale ``audio`` by 1/32768 for ``audio.log_mel``.

Needs the Debian packages ``espeak-ng``, ``sox`` and ``fortunes``: a missing one raises
``sources.MissingSourceError`` with the ``apt-get install`` line. A sentence whose synthesis
fails is skipped, never a crash: the info's metadata holds per split ``requested``,
``num_examples``, ``skipped`` (with ``skipped_ids``), ``audio_seconds`` and ``voices``.

Build: ``python -m gemini_mini.data.prepare [--subset small] [--data-dir DIR]`` (with the others).
"""

import collections
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from gemini_mini.data import sources, video_clips
from gemini_mini.modalities import audio as audio_lib

NAME = 'speech_transcripts'
SAMPLE_RATE = audio_lib.SAMPLE_RATE
SPLITS = ('train', 'eval')                         # sentences; also the voice splits
KEYWORD_SPLITS = ('keywords_train', 'keywords_eval')  # keyword utterances of those voices
KEYWORD_TEXT = 'The secret word is {word}.'
# Voices that say each word. With a few voices a word the model memorises the voices, not the
# word; more voices teach it to recognise unseen ones (docs/retrieval.md#audio-haystack).
KEYWORD_VOICES = {'keywords_train': 16, 'keywords_eval': 2}
NUM_EXAMPLES = {
    'small': {'train': 32, 'eval': 16, 'keywords_train': 24, 'keywords_eval': 12},
    'full': {'train': 3000, 'eval': 300, **{  # every word, by each of its voices
        split: count * len(video_clips.WORDS) for split, count in KEYWORD_VOICES.items()}}}
EVAL_PER_MILLE = 100
MIN_WORDS, MAX_WORDS = 3, 15

ACCENTS = ('en', 'en-us', 'en-gb-scotland', 'en-gb-x-gbclan', 'en-gb-x-rp', 'en-gb-x-gbcwmd',
           'en-us-nyc', 'en-029')
VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'f1', 'f2', 'f3', 'f4', 'f5')
EVAL_ACCENTS = ('en-029',)        # a whole accent training never hears
EVAL_VARIANTS = ('m3', 'f3')      # and two timbres, in every accent
SPEED_RANGE = (140, 190)          # espeak-ng -s, words a minute (default 175), inclusive
PITCH_RANGE = (25, 75)            # espeak-ng -p, 0..99 (default 50), inclusive
SOX_GAIN = '0.9'                  # keeps resampling from clipping

TOOLS = {'espeak-ng': 'espeak-ng', 'sox': 'sox'}  # command -> Debian package
_FORTUNES = next(source for source in sources.CORPUS_SOURCES if source.name == 'fortunes')
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')
_SPEAKABLE = re.compile(r"[A-Z][A-Za-z ,;:'!?.-]*[.!?]")
_KEYWORD = re.compile(re.escape(KEYWORD_TEXT).replace(re.escape('{word}'), '([a-z]+)'))

Sentence = tuple[str, str]  # (sentence_id, text)
Reading = tuple[str, int, int]  # (voice, speed, pitch): espeak-ng's -v, -s and -p


class SynthesisError(RuntimeError):
  """espeak-ng or sox failed on one sentence; the builder counts it as a skip."""


def _hash(salt: str, text: str) -> int:
  return int.from_bytes(hashlib.sha256(f'{salt}:{text}'.encode()).digest()[:8], 'little')


def _dedup_key(text: str) -> str:
  return ' '.join(text.lower().split())


def is_speakable(sentence: str) -> bool:
  """Whether ``sentence`` is kept: 3-15 words, capitalised, ended, plain ASCII letters."""
  return (MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and '--' not in sentence
          and _SPEAKABLE.fullmatch(sentence) is not None)


def sentences(skipped: collections.Counter | None = None) -> Iterator[Sentence]:
  """Every distinct speakable fortune sentence, ``(sentence_id, text)``, in a fixed order.

  ``text`` has its whitespace collapsed to single spaces; a sentence equal (ignoring case
  and spacing) to an earlier one is dropped. Unreadable fortune files are counted in
  ``skipped['fortunes']`` by the ``sources`` reader.
  """
  seen = set()
  for name, fortune in _FORTUNES.read(collections.Counter() if skipped is None else skipped):
    for index, sentence in enumerate(_SENTENCE_END.split(' '.join(fortune.split()))):
      key = _dedup_key(sentence)
      if is_speakable(sentence) and key not in seen:
        seen.add(key)
        yield f'{name}/{index}', sentence


def split_of(text: str) -> str:
  """``'eval'`` for 10% of sentences, chosen by a hash of the lower-cased text; else ``'train'``."""
  return 'eval' if _hash('split', _dedup_key(text)) % 1000 < EVAL_PER_MILLE else 'train'


def voices(split: str) -> tuple[str, ...]:
  """The espeak-ng voices (``'accent+variant'``) of ``split``; train and eval share none."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is unknown; use one of {SPLITS}')
  return tuple(f'{accent}+{variant}' for accent in ACCENTS for variant in VARIANTS
               if (accent in EVAL_ACCENTS or variant in EVAL_VARIANTS) == (split == 'eval'))


def reading_of(text: str, split: str) -> Reading:
  """``(voice, speed, pitch)`` for a sentence of ``split``, from an RNG seeded by its text."""
  rng = np.random.default_rng(_hash('voice', _dedup_key(text)))
  split_voices = voices(split)
  voice = split_voices[rng.integers(len(split_voices))]
  return (voice, int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
          int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))


def select(subset: str, skipped: collections.Counter | None = None) -> dict[str, list[Sentence]]:
  """The sentences of each split for ``subset``: the ``NUM_EXAMPLES`` with the smallest
  selection hash, in that order (so ``small``'s are the first of ``full``'s)."""
  if subset not in NUM_EXAMPLES:
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  by_split = {split: [] for split in SPLITS}
  for sentence_id, text in sentences(skipped):
    by_split[split_of(text)].append((sentence_id, text))
  return {split: sorted(found, key=lambda item: _hash('select', _dedup_key(item[1])))
          [:NUM_EXAMPLES[subset][split]] for split, found in by_split.items()}


def keywords(subset: str, split: str) -> list[tuple[Sentence, Reading]]:
  """The keyword utterances of ``split`` (one of ``KEYWORD_SPLITS``) for ``subset``:
  ``((sentence_id, text), reading)``, ``sentence_id`` ``'keyword/APPLE/en-us+m1'``, the
  ``NUM_EXAMPLES`` with the smallest selection hash, in that order."""
  if split not in KEYWORD_SPLITS or subset not in NUM_EXAMPLES:
    raise ValueError(f'split {split!r} / subset {subset!r} is unknown; use one of '
                     f"{KEYWORD_SPLITS} and 'full' or 'small'")
  pool = voices(split.removeprefix('keywords_'))
  utterances = []
  for word in video_clips.WORDS:
    rng = np.random.default_rng(_hash(split, word))
    for index in rng.choice(len(pool), KEYWORD_VOICES[split], replace=False):
      reading = (pool[index], int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
                 int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))
      text = KEYWORD_TEXT.format(word=word.lower())  # capitals could be read as letters
      utterances.append(((f'keyword/{word}/{reading[0]}', text), reading))
  utterances.sort(key=lambda utterance: _hash('select', utterance[0][0]))
  return utterances[:NUM_EXAMPLES[subset][split]]


def keyword_of(transcript: str) -> str:
  """The word of a keyword utterance: ``'The secret word is apple.'`` -> ``'apple'``."""
  match = _KEYWORD.fullmatch(transcript)
  if match is None:
    raise ValueError(f'{transcript!r} is not a keyword utterance ({KEYWORD_TEXT!r}); read '
                     f'one from a split of {KEYWORD_SPLITS}')
  return match.group(1)


def synthesize(text: str, voice: str, speed: int, pitch: int,
               timeout_s: float = 60.0) -> np.ndarray:
  """``text`` read by espeak-ng -> int16 samples ``[N]``, 16 kHz mono (resampled by sox).

  The text goes through stdin, so nothing in it is read as an option.

  Raises:
    SynthesisError: either tool fails, times out or produces no audio (message says which).
  """
  espeak = ['espeak-ng', '-v', voice, '-s', str(speed), '-p', str(pitch), '--stdout']
  sox = ['sox', '-v', SOX_GAIN, '-t', 'wav', '-', '-r', str(SAMPLE_RATE), '-c', '1', '-b', '16',
         '-e', 'signed-integer', '-L', '-t', 'raw', '-']
  wav = b''
  for command, data in ((espeak, text.encode()), (sox, None)):
    try:
      result = subprocess.run(command, input=wav if data is None else data,
                              capture_output=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
      raise SynthesisError(f'`{" ".join(command)}` failed on {text!r}: {error}') from error
    if result.returncode or not result.stdout:
      raise SynthesisError(
          f'`{" ".join(command)}` failed on {text!r} (exit {result.returncode}, '
          f'{len(result.stdout)} bytes out): {result.stderr.decode(errors="replace").strip()}')
    wav = result.stdout
  return np.frombuffer(wav[:len(wav) // 2 * 2], '<i2').astype(np.int16)


def _missing_packages() -> list[str]:
  missing = {package for tool, package in TOOLS.items() if not shutil.which(tool)}
  if not os.path.exists(_FORTUNES.probe):
    missing.add(_FORTUNES.apt_package)
  return sorted(missing)


def install_missing() -> None:
  """Installs the missing speech tools' packages (see ``sources.apt_install``)."""
  sources.apt_install(_missing_packages(), 'speech')


def check_installed() -> None:
  """Raises ``sources.MissingSourceError`` naming every missing tool or package and the
  line that installs them (``sudo apt-get install -y espeak-ng sox`` for the tools)."""
  missing = _missing_packages()
  if missing:
    raise sources.MissingSourceError(
        f'speech synthesis needs {", ".join(missing)} (not found on PATH or disk); install '
        f'them with: sudo apt-get install -y {" ".join(missing)}')


class SpeechTranscripts(tfds.core.GeneratorBasedBuilder):
  """Synthetic speech of real sentences; see the module docstring for splits and features."""

  name = NAME
  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'Fortune sentences read by espeak-ng, voice-disjoint eval.',
                   '1.1.0': 'Keyword utterances (keywords_train, keywords_eval).',
                   '1.2.0': '16 training voices per keyword (was 4).'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='full', description='3000 train + 300 eval examples, '
                              '2544 + 318 keyword utterances'),
      tfds.core.BuilderConfig(name='small', description='32 train + 16 eval, 24 + 12 keyword '
                              'utterances, for tests/CI'),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'audio': tfds.features.Tensor(shape=(None,), dtype=np.int16),
            'transcript': tfds.features.Text(),
            'voice': tfds.features.Text(),
            'speed': tfds.features.Tensor(shape=(), dtype=np.int32),
            'pitch': tfds.features.Tensor(shape=(), dtype=np.int32),
            'sentence_id': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    check_installed()
    source_skipped = collections.Counter()
    subset = self.builder_config.name
    selected = {split: [(sentence, reading_of(sentence[1], split)) for sentence in sentences]
                for split, sentences in select(subset, source_skipped).items()}
    selected.update({split: keywords(subset, split) for split in KEYWORD_SPLITS})
    self.info.metadata['sample_rate'] = SAMPLE_RATE
    self.info.metadata['unreadable_fortune_files'] = source_skipped['fortunes']
    return {split: self._generate_examples(split, utterances)
            for split, utterances in selected.items()}

  def _generate_examples(self, split: str, selected: list[tuple[Sentence, Reading]]):
    """Yields ``(sentence_id, example)`` for ``split``, each sentence read as its reading
    says; records its counts in the metadata."""
    stats = {'requested': len(selected), 'num_examples': 0, 'skipped': 0, 'skipped_ids': [],
             'audio_seconds': 0.0, 'voices': []}

    def run(index):
      (_, text), reading = selected[index]
      try:
        return synthesize(text, *reading)
      except SynthesisError as error:
        return error

    def synthesized():  # in order, at most `chunk` clips in memory at a time
      workers = os.cpu_count() or 2
      chunk = 8 * workers
      with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(selected), chunk):
          yield from pool.map(run, range(start, min(start + chunk, len(selected))))

    heard = set()
    for ((sentence_id, text), (voice, speed, pitch)), samples in zip(selected, synthesized()):
      if isinstance(samples, SynthesisError):
        print(f'skipped {sentence_id}: {samples}', file=sys.stderr, flush=True)
        stats['skipped'] += 1
        stats['skipped_ids'].append(sentence_id)
        continue
      stats['num_examples'] += 1
      stats['audio_seconds'] += len(samples) / SAMPLE_RATE
      heard.add(voice)
      yield sentence_id, {'audio': samples, 'transcript': text, 'voice': voice,
                          'speed': speed, 'pitch': pitch, 'sentence_id': sentence_id}
    stats['audio_seconds'] = round(stats['audio_seconds'], 1)
    stats['voices'] = sorted(heard)
    self.info.metadata[split] = stats


def builder(data_dir: str, subset: str = 'full') -> SpeechTranscripts:
  """The builder for ``subset`` (``'full'`` or ``'small'``) in ``data_dir`` (built or not)."""
  if subset not in NUM_EXAMPLES:
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  return SpeechTranscripts(data_dir=data_dir, config=subset)


def summary(speech: SpeechTranscripts) -> str:
  """Examples, seconds of audio, voices and skips per split, from the build's metadata."""
  lines = []
  for split in SPLITS + KEYWORD_SPLITS:
    stats = speech.info.metadata[split]
    lines.append(f'{split:14} {stats["num_examples"]:>6,} examples '
                 f'{stats["audio_seconds"]:>9,.0f} s of audio, {len(stats["voices"])} voices, '
                 f'{stats["skipped"]} skipped')
  return '\n'.join(lines)
