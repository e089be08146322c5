"""Quantize a trained run's weights to int4 or int8 for inference.

    python -m gemini_mini.quantize --checkpoint RUN_DIR --bits 4 --group 64 \
        --method rtn|gptq --out DIR [--calibration-rows N]

Writes DIR (``quant/checkpoint.py``), which ``infer.load.load`` and ``eval.py --checkpoint``
read like a run directory, and prints the quantized weights' bytes against float32's.
GPTQ calibrates on ``--calibration-rows`` rows of the training mixture drawn with
``train.seed + train.loop.CALIBRATION_SEED_OFFSET``: the same kind of data as training,
other rows.
"""

import argparse
import pathlib
import shutil
import sys

from gemini_mini import checkpoint as run_checkpoint
from gemini_mini import config as config_lib
from gemini_mini.checkpoint import CheckpointError
from gemini_mini.infer.load import load
from gemini_mini.quant import calibrate, checkpoint, model

INPUT_ERRORS = (config_lib.ConfigError, CheckpointError, ValueError)


def quantize(run_dir: str, bits: int, group: int, method: str, out: str, rows: int) -> str:
  """Writes ``out`` and returns the size report."""
  if pathlib.Path(out).exists():
    raise CheckpointError(f'{out} exists; pass another --out, or move it away first')
  loaded = load(run_dir, ['model.scan_layers=false', 'model.remat=false']
                if method == 'gptq' else [])
  model.check_group(loaded.decoder, group)
  hessians = None
  if method == 'gptq':
    from gemini_mini.train.loop import calibration_batches  # the data pipeline, for GPTQ alone
    hessians = calibrate.hessians(loaded.decoder, calibration_batches(loaded.config, rows))
  unreached = model.quantize(loaded.decoder, bits, group, hessians)
  _, saved = run_checkpoint.read_config(pathlib.Path(run_dir) / 'checkpoints')
  source = str(pathlib.Path(run_dir).absolute())
  stored = checkpoint.save(out, loaded.decoder, saved, {
      'bits': bits, 'group': group, 'method': method, 'source': source, 'step': loaded.step,
      **({'calibration_rows': rows} if method == 'gptq' else {})})
  if loaded.tokenizer_path:  # an imported model's own tokenizer goes with it
    shutil.copyfile(loaded.tokenizer_path, pathlib.Path(out) / pathlib.Path(
        loaded.tokenizer_path).name)
  quantized, float32 = checkpoint.sizes(stored, loaded.decoder)
  file_bytes = (pathlib.Path(out) / checkpoint.TENSORS).stat().st_size
  float_file = sum(a.nbytes for a in stored.values()) - quantized + float32
  fallback = (f'; no calibration row reached {", ".join(unreached)}: rounded to nearest'
              if unreached else '')
  return (f'quantized weights: {quantized:,} bytes, float32 {float32:,} '
          f'({quantized / float32:.3f}); whole file {file_bytes:,} bytes '
          f'({file_bytes / float_file:.3f} of float32){fallback}')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  parser.add_argument('--checkpoint', required=True, help='a train.run_dir')
  parser.add_argument('--bits', type=int, choices=(4, 8), default=4)
  parser.add_argument('--group', type=int, default=64,
                      help='weights per scale along each contraction')
  parser.add_argument('--method', choices=model.METHODS, default='rtn')
  parser.add_argument('--out', required=True, help='the directory to write (must not exist)')
  parser.add_argument('--calibration-rows', type=int, default=64,
                      help='rows of training data GPTQ calibrates on')
  args = parser.parse_args(argv)
  try:
    print(quantize(args.checkpoint, args.bits, args.group, args.method, args.out,
                   args.calibration_rows))
  except INPUT_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
