"""TFDS builder of the text corpus: documentation, a dictionary, fortunes and code.

Splits (disjoint by construction):
  ``train``, ``eval``: every document of ``sources.CORPUS_SOURCES``, assigned by a hash of
    its source and name (2% eval), so a document never changes split between builds.
  ``long``: whole long documents for long-context evaluation (the King James Bible, the
    Flax codebase), from sources that are in no other split: never in training.

Configs: ``full`` (about 100 MB of text) and ``small`` (the documents of a fixed 2% hash
sample, same rules, plus the same ``long`` split; builds in seconds for tests and CI).

Features: ``text`` (the document), ``source`` (``'linux_docs'``, ...), ``name`` (the
document's id inside its source). ``file_format='array_record'``: no TensorFlow needed;
read with ``builder.as_data_source(split)``. The info's metadata holds per split and source
``num_documents``, ``num_tokens`` (shipped tokenizer, without bos/eos) and ``skipped``
(unreadable or empty files met while reading that source, whatever the config).
"""

import collections
import hashlib

import tensorflow_datasets as tfds

from gemini_mini.data import sources
from gemini_mini.modalities import text as text_lib

NAME = 'text_corpus'
EVAL_PER_MILLE = 20
SMALL_PER_MILLE = 20


def _per_mille(salt: str, source: str, name: str) -> int:
  digest = hashlib.sha256(f'{salt}:{source}/{name}'.encode()).digest()
  return int.from_bytes(digest[:8], 'little') % 1000


def split_of(source: str, name: str) -> str:
  """``'eval'`` for 2% of documents chosen by hash, else ``'train'``; stable across builds."""
  return 'eval' if _per_mille('split', source, name) < EVAL_PER_MILLE else 'train'


def in_small_subset(source: str, name: str) -> bool:
  """Whether a corpus document belongs to the ``small`` config (an independent 2% hash)."""
  return _per_mille('small', source, name) < SMALL_PER_MILLE


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """The text corpus; see the module docstring for splits, configs and features."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Linux/Python docs, Perl pod, GCIDE, fortunes, stdlib; long docs.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='full', description='every document'),
      tfds.core.BuilderConfig(name='small', description='a fixed 2% hash sample, for tests/CI'),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'source': tfds.features.Text(),
            'name': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    sources.check_installed()
    self._tokenizer = text_lib.Tokenizer()
    return {split: self._generate_examples(split) for split in ('train', 'eval', 'long')}

  def _generate_examples(self, split: str):
    """Yields ``(key, example)`` for one split and records its counts in the metadata."""
    small = self.builder_config.name == 'small'
    skipped = collections.Counter()
    stats = {}
    for source in sources.LONG_SOURCES if split == 'long' else sources.CORPUS_SOURCES:
      counts = stats[source.name] = {'num_documents': 0, 'num_tokens': 0}
      for name, text in source.read(skipped):
        if split != 'long' and (split_of(source.name, name) != split
                                or (small and not in_small_subset(source.name, name))):
          continue
        counts['num_documents'] += 1
        counts['num_tokens'] += len(self._tokenizer.encode(text))
        yield f'{source.name}/{name}', {'text': text, 'source': source.name, 'name': name}
      counts['skipped'] = skipped[source.name]
    self.info.metadata[split] = stats


def builder(data_dir: str, subset: str = 'full') -> TextCorpus:
  """The builder for ``subset`` (``'full'`` or ``'small'``) in ``data_dir`` (built or not)."""
  if subset not in ('full', 'small'):
    raise ValueError(f"subset {subset!r} is unknown; use 'full' or 'small'")
  return TextCorpus(data_dir=data_dir, config=subset)


install_missing = sources.install_missing
check_installed = sources.check_installed


def summary(corpus: TextCorpus) -> str:
  """A table of documents and tokens per split and source, from the build's metadata."""
  lines = [f'{"split":6} {"source":14} {"documents":>10} {"tokens":>12} {"skipped":>8}']
  for split in ('train', 'eval', 'long'):
    stats = corpus.info.metadata[split]
    for source, counts in stats.items():
      lines.append(f'{split:6} {source:14} {counts["num_documents"]:>10,} '
                   f'{counts["num_tokens"]:>12,} {counts["skipped"]:>8,}')
    documents = sum(counts['num_documents'] for counts in stats.values())
    tokens = sum(counts['num_tokens'] for counts in stats.values())
    lines.append(f'{split:6} {"all":14} {documents:>10,} {tokens:>12,}')
  lines.append('(tokens counted with the shipped tokenizer, without bos/eos)')
  return '\n'.join(lines)
