"""Prepares every dataset: ``python -m gemini_mini.data.prepare [--subset small] [--data-dir DIR]``.

Builds what is missing under DIR (default ``data``): the datasets the training tasks
(``tasks.TASKS``) read: the text corpus (``text_corpus``), image-caption pairs
(``image_caption``), speech-transcript pairs (``speech``), video clips (``video_clips``) and
the post-training items over them (``post_training``), with progress bars, then prints each
one's summary (examples, tokens or seconds per split) and build time. Needs Debian packages (fonts, espeak-ng, documentation): run as root it
installs missing ones with apt-get, otherwise it exits with the ``apt-get install`` line.
``--subset small`` builds tiny samples in seconds (tests, CI). ``ensure()`` is the same for
code (``train.py`` calls it on first use, for the tasks its mixture uses).
"""

import argparse
import pathlib
import sys
import time

from gemini_mini.data import (image_caption, post_training, sources, speech, tasks, text_corpus,
                              video_clips)

SUBSETS = ('full', 'small')
# Each provides NAME, builder(data_dir, subset), install_missing(), check_installed() and
# summary(builder), and may name in REQUIRES the datasets it is built from (earlier here).
DATASETS = (text_corpus, image_caption, speech, video_clips, post_training)


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
  """Builds the datasets that the tasks with a positive weight read (all when ``weights``
  is None), and those they are built from.

  Returns:
    Dataset name (``NAME``) -> its builder.
  """
  needed = {task.dataset.NAME for task in tasks.TASKS
            if task.dataset is not None and (weights is None or weights.get(task.name, 0) > 0)}
  needed |= {required.NAME for module in DATASETS if module.NAME in needed
             for required in getattr(module, 'REQUIRES', ())}
  built = {}
  for module in DATASETS:
    if module.NAME in needed:
      start = time.time()
      built[module.NAME] = ensure_dataset(module, data_dir, subset)
      if verbose:
        print(f'{module.NAME}/{subset} in {built[module.NAME].data_dir}, ready in '
              f'{time.time() - start:.0f} s:\n{module.summary(built[module.NAME])}\n', flush=True)
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
