"""Prepares every dataset: ``python -m gemini_mini.data.prepare [--subset small] [--data-dir DIR]``.

Builds what is missing under DIR (default ``data``) with progress bars: the text corpus
(then prints documents and tokens per split and source) and the speech-transcript pairs
(``speech.py``; examples, seconds of audio and voices per split). Needs the Debian packages in
``sources.APT_PACKAGES``: run as root it installs missing ones with apt-get, otherwise it
exits with the ``apt-get install`` line.
``--subset small`` builds a 2% sample in seconds (tests, CI). ``ensure()`` is the same
for code (``train.py`` calls it on first use).
"""

import argparse
import pathlib
import sys
import time

from gemini_mini.data import sources, speech, text_corpus

SUBSETS = ('full', 'small')


def ensure(data_dir: str, subset: str = 'full') -> text_corpus.TextCorpus:
  """Builds the text corpus ``subset`` under ``data_dir`` unless it is there; returns it.

  Raises:
    sources.MissingSourceError: a Debian package is missing (the message has the apt line).
  """
  root = pathlib.Path(data_dir)
  root.mkdir(parents=True, exist_ok=True)
  ignore = root / '.gitignore'  # prepared data never belongs in git
  if not ignore.exists():
    ignore.write_text('*\n')
  builder = text_corpus.builder(data_dir, subset)
  if not builder.is_prepared():
    sources.install_missing()
    sources.check_installed()
    builder.download_and_prepare()
  return builder


def summary(builder: text_corpus.TextCorpus) -> str:
  """A table of documents and tokens per split and source, from the build's metadata."""
  lines = [f'{"split":6} {"source":14} {"documents":>10} {"tokens":>12} {"skipped":>8}']
  for split in ('train', 'eval', 'long'):
    stats = builder.info.metadata[split]
    for source, counts in stats.items():
      lines.append(f'{split:6} {source:14} {counts["num_documents"]:>10,} '
                   f'{counts["num_tokens"]:>12,} {counts["skipped"]:>8,}')
    documents = sum(counts['num_documents'] for counts in stats.values())
    tokens = sum(counts['num_tokens'] for counts in stats.values())
    lines.append(f'{split:6} {"all":14} {documents:>10,} {tokens:>12,}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--subset', choices=SUBSETS, default='full')
  parser.add_argument('--data-dir', default='data', help='where datasets go (data.dir)')
  args = parser.parse_args(argv)
  try:
    start = time.time()
    builder = ensure(args.data_dir, args.subset)
    print(summary(builder))
    print(f'text_corpus/{args.subset} ready in {builder.data_dir} ({time.time() - start:.0f} s); '
          'tokens counted with the shipped tokenizer, without bos/eos')
    start = time.time()
    speech_builder = speech.ensure(args.data_dir, args.subset)
    print(speech.summary(speech_builder))
    print(f'{speech.NAME}/{args.subset} ready in {speech_builder.data_dir} '
          f'({time.time() - start:.0f} s)')
  except (sources.MissingSourceError, sources.CorruptSourceError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
