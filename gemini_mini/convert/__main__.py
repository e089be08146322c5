"""Hugging Face-format MoE checkpoints (Mixtral family) in and out.

    python -m gemini_mini.convert from-hf HF_DIR --out RUN_DIR [section.field=value ...]
    python -m gemini_mini.convert to-hf RUN_DIR --out HF_DIR [--shard-mb N]

``from-hf`` writes a run directory that ``eval.py``, ``python -m gemini_mini.generate``,
``train.py`` (``train.init_from``) and ``python -m gemini_mini.quantize`` read; overrides
set what the checkpoint does not (``mesh.expert=4`` shards the experts as they are read).
``to-hf`` writes ``config.json`` and safetensors shards that transformers' ``from_pretrained``
reads.
"""

import argparse
import sys

from gemini_mini.checkpoint import CheckpointError
from gemini_mini.config import ConfigError
from gemini_mini.convert import from_hf, to_hf
from gemini_mini.convert.hf_files import HFFormatError
from gemini_mini.convert.mixtral import NotExpressible

INPUT_ERRORS = (HFFormatError, NotExpressible, ConfigError, CheckpointError)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m gemini_mini.convert',
                                   description=__doc__.strip().splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  importing = commands.add_parser('from-hf', help='a Hugging Face directory -> a run directory')
  importing.add_argument('source', help='holds config.json and *.safetensors')
  importing.add_argument('--out', required=True, help='the run directory to write (new)')
  exporting = commands.add_parser('to-hf', help='a run directory -> a Hugging Face directory')
  exporting.add_argument('run_dir', help='a train.run_dir (or a from-hf one)')
  exporting.add_argument('--out', required=True, help='the directory to write (new)')
  exporting.add_argument('--shard-mb', type=int, default=to_hf.SHARD_BYTES >> 20,
                         help='largest safetensors shard, in MiB')
  # Overrides (section.field=value) may come anywhere after from-hf's source.
  args, overrides = parser.parse_known_args(argv)
  unknown = [a for a in overrides if '=' not in a or a.startswith('-')]
  if unknown or (overrides and args.command != 'from-hf'):
    parser.error(f'unrecognized arguments: {" ".join(unknown or overrides)}')
  try:
    if args.command == 'from-hf':
      config = from_hf.convert(args.source, args.out, overrides)
      m = config.model
      print(f'wrote {args.out}: {m.num_layers} layers, d_model {m.d_model}, {m.num_experts} '
            f'experts top-{m.experts_per_token}, vocabulary {m.vocab_size}')
    else:
      for note in to_hf.convert(args.run_dir, args.out, shard_bytes=args.shard_mb << 20):
        print(f'note: {note}')
      print(f'wrote {args.out}')
  except INPUT_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
