"""The text corpus builder: expected counts, disjoint splits, clear errors on missing input."""

import collections
import gzip

import pytest

from gemini_mini.data import prepare, sources, text_corpus


@pytest.fixture(scope='module')
def corpus(small_data_dir):
  builder = text_corpus.builder(small_data_dir, 'small')
  return {split: [{key: value.decode() for key, value in builder.as_data_source(split)[i].items()}
                  for i in range(builder.info.splits[split].num_examples)]
          for split in ('train', 'eval', 'long')}, builder.info.metadata


def test_counts_match_the_sources(corpus):
  examples, metadata = corpus
  expected = collections.Counter()
  for source in sources.CORPUS_SOURCES:
    for name, _ in source.read(collections.Counter()):
      if text_corpus.in_small_subset(source.name, name):
        expected[text_corpus.split_of(source.name, name), source.name] += 1
  got = collections.Counter((split, example['source'])
                            for split in ('train', 'eval') for example in examples[split])
  assert got == +expected
  for split in ('train', 'eval'):
    for source, counts in metadata[split].items():
      assert counts['num_documents'] == expected[split, source]
      assert counts['num_tokens'] >= counts['num_documents']
  assert all(expected['train', source.name] for source in sources.CORPUS_SOURCES)
  assert len(examples['eval']) > 10


def test_splits_are_disjoint_and_long_documents_are_never_in_training(corpus):
  examples, metadata = corpus
  keys = {split: {(e['source'], e['name']) for e in examples[split]} for split in examples}
  texts = {split: {e['text'] for e in examples[split]} for split in examples}
  assert not keys['train'] & keys['eval'] and not texts['train'] & texts['eval']
  for split in ('train', 'eval'):
    assert all(text_corpus.split_of(*key) == split for key in keys[split])
  long_sources = {source for source, _ in keys['long']}
  assert long_sources == {'kjv_bible', 'flax_codebase'}
  assert not long_sources & {source for source, _ in keys['train'] | keys['eval']}
  assert not texts['long'] & (texts['train'] | texts['eval'])
  bible = next(e['text'] for e in examples['long'] if e['source'] == 'kjv_bible')
  assert bible.count('\n') > 30_000 and 'Revelation 22' in bible
  assert metadata['long']['kjv_bible']['num_tokens'] > 1_000_000


def test_missing_package_names_the_apt_line(monkeypatch, tmp_path, capsys):
  bible = sources.LONG_SOURCES[0]
  monkeypatch.setattr(sources, 'LONG_SOURCES', (
      sources.Source(bible.name, bible.apt_package, str(tmp_path / 'no-bible'), bible.read),))
  assert prepare.main(['--subset', 'small', '--data-dir', str(tmp_path)]) == 1
  last_line = capsys.readouterr().err.strip().splitlines()[-1]
  assert 'kjv_bible' in last_line and last_line.endswith('sudo apt-get install -y bible-kjv')


def test_unreadable_files_are_counted_skips(tmp_path):
  (tmp_path / 'good.txt').write_text('fine')
  (tmp_path / 'latin1.txt').write_bytes(b'caf\xe9')
  (tmp_path / 'empty.txt').write_text('  \n')
  skipped = collections.Counter()
  assert list(sources._files('test', str(tmp_path), '*.txt', skipped)) == [('good.txt', 'fine')]
  assert skipped == {'test': 2}


def test_corrupt_dictionary_is_a_clear_error(monkeypatch, tmp_path):
  broken = tmp_path / 'gcide.dict.dz'
  broken.write_bytes(gzip.compress(b'entries')[:10])
  monkeypatch.setattr(sources, 'GCIDE', str(broken))
  with pytest.raises(sources.CorruptSourceError, match='--reinstall dict-gcide'):
    list(sources._gcide(collections.Counter()))

