"""Train a gemini_mini model.

    python train.py [--config configs/nano.yaml] [section.field=value ...]

Writes into train.run_dir: checkpoints/, tensorboard/ and metrics.jsonl. Run it again with
the same run directory and it resumes from the latest complete checkpoint. Ctrl-C saves and
exits cleanly.
"""

import argparse
import sys

from gemini_mini import config as config_lib
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.data.mixture import DataError
from gemini_mini.data.sources import CorruptSourceError, MissingSourceError
from gemini_mini.train.loop import NonFiniteLoss, run

# Bad input of any kind: exit 2 with a last line that names the problem and the fix.
INPUT_ERRORS = (config_lib.ConfigError, CheckpointError, DataError, MissingSourceError,
                CorruptSourceError)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument('--config', default='configs/nano.yaml', help='YAML config file')
  parser.add_argument('overrides', nargs='*', metavar='section.field=value',
                      help='config overrides, e.g. train.steps=100 mesh.data=2')
  args = parser.parse_args(argv)
  try:
    run(config_lib.load(args.config, args.overrides))
  except INPUT_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  except NonFiniteLoss as error:
    print(f'error: {error}', file=sys.stderr)
    return 3
  return 0


if __name__ == '__main__':
  sys.exit(main())
