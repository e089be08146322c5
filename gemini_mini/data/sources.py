"""Readers of the real local text sources: Debian packages and installed Python code.

Each ``Source`` yields ``(name, text)`` documents in a fixed order; ``name`` identifies the
document inside its source (a relative path, a headword, ``file/index``). Nothing is
downloaded: a source whose Debian package is missing raises ``MissingSourceError`` with the
exact ``apt-get install`` line. A file that is not UTF-8 or is empty is skipped and counted
in the caller's ``skipped`` counter (source name -> count), never silently.

Corpus (train/eval) sources: Linux and Python documentation, Perl pod, the GCIDE
dictionary, fortunes and the Python standard library (tests excluded). Long documents,
never in training: the King James Bible as one document and the Flax codebase as one.
"""

import collections
import dataclasses
import gzip
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sysconfig
from typing import Callable, Iterator

Document = tuple[str, str]  # (name inside its source, text)


class MissingSourceError(RuntimeError):
  """A source's Debian package or tool is missing; the message holds the apt-get line."""


class CorruptSourceError(RuntimeError):
  """A source file exists but cannot be read; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One real text source.

  Attributes:
    name: short id stored with every document (``'linux_docs'``).
    apt_package: the Debian package providing it; None for Python's stdlib and our
      dependencies, which are always installed.
    probe: a file whose absence means the package is not installed (None: always there).
    read: ``read(skipped)`` yields the source's documents in a fixed order and counts the
      files it skips in ``skipped[name]``.
  """

  name: str
  apt_package: str | None
  probe: str | None
  read: Callable[[collections.Counter], Iterator[Document]]


def _read_text(source: str, path: pathlib.Path, skipped: collections.Counter) -> str | None:
  try:
    text = path.read_text(encoding='utf-8')
  except UnicodeDecodeError:
    skipped[source] += 1
    return None
  if not text.strip():
    skipped[source] += 1
    return None
  return text


def _files(source: str, root: str, pattern: str, skipped: collections.Counter,
           exclude: Callable[[pathlib.PurePath], bool] = lambda path: False
           ) -> Iterator[Document]:
  base = pathlib.Path(root)
  for path in sorted(base.glob(pattern)):
    relative = path.relative_to(base)
    if path.is_file() and not exclude(relative):
      text = _read_text(source, path, skipped)
      if text is not None:
        yield str(relative), text


LINUX_DOCS = '/usr/share/doc/linux-doc-6.1/html/_sources'
PYTHON_DOCS = '/usr/share/doc/python3.11/html/_sources'
PERL_POD = '/usr/share/perl/5.36.0/pod'
GCIDE = '/usr/share/dictd/gcide.dict.dz'
GCIDE_INDEX = '/usr/share/dictd/gcide.index'
FORTUNES = '/usr/share/games/fortunes'
BIBLE = '/usr/bin/bible'
STDLIB = sysconfig.get_paths()['stdlib']
_TEST_DIRS = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages'}


def _stdlib(skipped: collections.Counter) -> Iterator[Document]:
  yield from _files('python_stdlib', STDLIB, '**/*.py', skipped,
                    exclude=lambda path: bool(_TEST_DIRS.intersection(path.parts[:-1])))


def _gcide(skipped: collections.Counter) -> Iterator[Document]:
  """One document per dictionary entry (126k); the dictd index gives their byte ranges."""
  digits = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'

  def decode(number: str) -> int:  # dictd writes offsets and lengths in base 64
    return sum(digits.index(c) * 64**i for i, c in enumerate(reversed(number)))

  try:
    data = gzip.open(GCIDE).read()
    lines = pathlib.Path(GCIDE_INDEX).read_text(encoding='utf-8').splitlines()
    entries = {}  # byte range -> first headword; several headwords share one entry
    for line in lines:
      headword, offset, length = line.split('\t')
      if not headword.startswith('00-database'):
        entries.setdefault((decode(offset), decode(length)), headword)
  except (OSError, EOFError, ValueError) as error:
    raise CorruptSourceError(
        f'{GCIDE} or its index cannot be read ({error}); reinstall it with '
        '`sudo apt-get install --reinstall dict-gcide`') from error
  for (offset, length), headword in sorted(entries.items()):
    try:
      yield f'{headword}@{offset}', data[offset:offset + length].decode('utf-8')
    except UnicodeDecodeError:
      skipped['gcide'] += 1


def _fortunes(skipped: collections.Counter) -> Iterator[Document]:
  """One document per fortune; fortune files separate them with lines holding ``%``."""
  for name, text in _files('fortunes', FORTUNES, '*', skipped,
                           exclude=lambda path: path.suffix != ''):  # not .dat, .u8
    for index, fortune in enumerate(text.split('\n%\n')):
      if fortune.strip():
        yield f'{name}/{index}', fortune.strip('\n') + '\n'


def _bible(skipped: collections.Counter) -> Iterator[Document]:  # pylint: disable=unused-argument
  """The whole King James Bible as one document (4.3 MB)."""
  try:
    result = subprocess.run([BIBLE, 'Gen1:1-Rev22:21'], stdin=subprocess.DEVNULL,
                            capture_output=True, check=True, timeout=120)
  except (OSError, subprocess.SubprocessError) as error:
    raise CorruptSourceError(
        f'`{BIBLE} Gen1:1-Rev22:21` failed ({error}); reinstall it with '
        '`sudo apt-get install --reinstall bible-kjv`') from error
  yield 'Gen1:1-Rev22:21', result.stdout.decode('utf-8')


def _codebase(package: str) -> Callable[[collections.Counter], Iterator[Document]]:
  """One document holding every ``.py`` file of an installed package, each under a header."""

  def read(skipped):
    root = pathlib.Path(importlib.util.find_spec(package).origin).parent
    parts = [f'# File: {package}/{name}\n{text}'
             for name, text in _files(package, str(root), '**/*.py', skipped)]
    yield package, '\n'.join(parts)

  return read


CORPUS_SOURCES = (
    Source('linux_docs', 'linux-doc-6.1', f'{LINUX_DOCS}/index.rst.txt',
           lambda skipped: _files('linux_docs', LINUX_DOCS, '**/*.txt', skipped)),
    Source('python_docs', 'python3.11-doc', f'{PYTHON_DOCS}/contents.rst.txt',
           lambda skipped: _files('python_docs', PYTHON_DOCS, '**/*.txt', skipped)),
    Source('perl_pod', 'perl-doc', f'{PERL_POD}/perlfunc.pod',
           lambda skipped: _files('perl_pod', PERL_POD, '*.pod', skipped)),
    Source('gcide', 'dict-gcide', GCIDE, _gcide),
    Source('fortunes', 'fortunes', f'{FORTUNES}/fortunes', _fortunes),
    Source('python_stdlib', None, os.path.join(STDLIB, 'json', 'decoder.py'), _stdlib),
)
LONG_SOURCES = (
    Source('kjv_bible', 'bible-kjv', BIBLE, _bible),
    Source('flax_codebase', None, None, _codebase('flax')),
)
APT_PACKAGES = tuple(source.apt_package for source in CORPUS_SOURCES + LONG_SOURCES
                     if source.apt_package)


def _missing() -> list[Source]:
  return [source for source in CORPUS_SOURCES + LONG_SOURCES
          if source.probe and not os.path.exists(source.probe)]


def apt_install(packages, purpose: str) -> None:
  """Installs Debian ``packages`` with apt-get when running as root (CI, containers, TPU VMs
  under sudo); otherwise does nothing and leaves the caller's ``check_installed`` to print
  the line to run."""
  if not packages or os.geteuid() != 0 or not shutil.which('apt-get'):
    return
  print(f'installing Debian packages for {purpose}: {" ".join(packages)}', flush=True)
  env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
  subprocess.run(['apt-get', 'update', '-qq'], env=env, check=False)
  subprocess.run(['apt-get', 'install', '-y', '-qq', *packages], env=env, check=False,
                 stdout=subprocess.DEVNULL)


def install_missing() -> None:
  """Installs the missing text sources' packages (see ``apt_install``)."""
  apt_install(sorted({source.apt_package for source in _missing() if source.apt_package}),
              'the text corpus')


def check_installed() -> None:
  """Raises ``MissingSourceError`` naming every missing package and the line to install them."""
  missing = _missing()
  if missing:
    names = ', '.join(f'{source.name} (no {source.probe})' for source in missing)
    packages = ' '.join(sorted({source.apt_package for source in missing if source.apt_package}))
    raise MissingSourceError(
        f'text sources missing: {names}; install them with: sudo apt-get install -y {packages}')
