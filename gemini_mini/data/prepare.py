"""Prepares every dataset: ``python -m gemini_mini.data.prepare [--subset small] [--data-dir DIR]``.

Builds what is missing under DIR (default ``data``), one dataset per training task
(``tasks.TASKS``): the text corpus (``text_corpus``), image-caption pairs
(``image_caption``), speech-transcript pairs (``speech``) and video clips (``video_clips``),
with progress bars, then prints each one's summary (examples, tokens or seconds per split)
and build time. Needs Debian packages (fonts, espeak-ng, documentation): run as root it
installs missing ones with apt-get, otherwise it exits with the ``apt-get install`` line.
``--subset small`` builds tiny samples in seconds (tests, CI). ``ensure()`` is the same for
code (``train.py`` calls it on first use, for the tasks its mixture uses).
"""

import argparse
import pathlib
import sys
import time

from gemini_mini.data import image_caption, sources, speech, text_corpus, video_clips

SUBSETS = ('full', 'small')
# Task name -> its dataset module, which provides builder(data_dir, subset),
# install_missing(), check_installed() and summary(builder).
DATASETS = {'text': text_corpus, 'caption': image_caption, 'speech': speech,
            'video': video_clips}


def ensure_dataset(module, data_dir: str, subset: str = 'full'):
  """Builds ``module``'s dataset ``subset`` under ``data_dir`` unless it is there; returns
  its builder.

  Raises:
    sources.MissingSourceError: a Debian package is missing (the message has the apt line).
  """
  root = pathlib.Path(data_dir)
  root.mkdir(parents=True, exist_ok=True)
  ignore = root / '.gitignore'  # prepared data never belongs in git
  if not ignore.exists():
    ignore.write_text('*\n')
  builder = module.builder(data_dir, subset)
  if not builder.is_prepared():
    module.install_missing()
    module.check_installed()
    builder.download_and_prepare()
  return builder


def ensure(data_dir: str, subset: str = 'full', weights: dict[str, float] | None = None,
           *, verbose: bool = False) -> dict:
  """Builds the datasets of the tasks with a positive weight (all when ``weights`` is None).

  Returns:
    Task name -> its dataset's builder.
  """
  built = {}
  for task, module in DATASETS.items():
    if weights is None or weights.get(task, 0) > 0:
      start = time.time()
      built[task] = ensure_dataset(module, data_dir, subset)
      if verbose:
        print(f'{module.NAME}/{subset} ({task} task), {built[task].data_dir}, ready in '
              f'{time.time() - start:.0f} s:\n{module.summary(built[task])}\n', flush=True)
  return built


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--subset', choices=SUBSETS, default='full')
  parser.add_argument('--data-dir', default='data', help='where datasets go (data.dir)')
  args = parser.parse_args(argv)
  try:
    ensure(args.data_dir, args.subset, verbose=True)
  except (sources.MissingSourceError, sources.CorruptSourceError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
