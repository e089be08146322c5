"""Evaluate a trained gemini_mini checkpoint.

    python eval.py --checkpoint RUN_DIR --suite NAME --out DIR [section.field=value ...]

Suites: perplexity, haystack, multi-needle, ruler, tasks, self-consistency, factuality,
preference, or all. Each writes DIR/NAME.json (figures, config, checkpoint step) and its plots
(DIR/NAME_*.png); one that does not apply to the run's train.stage says so and writes nothing.
Overrides change the eval settings (``eval.trials=20``, ``eval.context_lengths=[1024,2048]``)
or how the model runs (``model.attention_kernel=chunked``); shapes must match the checkpoint.
"""

import argparse
import sys

from gemini_mini import config as config_lib
from gemini_mini import evals
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.data.mixture import DataError
from gemini_mini.data.sources import MissingSourceError
from gemini_mini.infer.load import load

INPUT_ERRORS = (config_lib.ConfigError, CheckpointError, DataError, MissingSourceError)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument('--checkpoint', required=True, metavar='RUN_DIR',
                      help='a train.run_dir (it holds checkpoints/)')
  parser.add_argument('--suite', required=True, choices=[*evals.SUITES, 'all'])
  parser.add_argument('--out', required=True, metavar='DIR', help='where results go')
  parser.add_argument('overrides', nargs='*', metavar='section.field=value')
  args = parser.parse_args(argv)
  try:
    loaded = load(args.checkpoint, args.overrides)
    names = list(evals.SUITES) if args.suite == 'all' else [args.suite]
    for name in names:
      figures = evals.suite(name).run(loaded, args.out)
      print(f'{name}: {figures}', flush=True)
  except INPUT_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
