"""Weight formats of the teacher and the distilled student, compared in one run: float32,
bfloat16, int8 and int4 (round-to-nearest and GPTQ), docs/nano.md#4-bit-weights.

For each run (``--runs``, default the nano teacher and the nano student), the quantized
checkpoints are written first (``python -m gemini_mini.quantize``'s code: int8 RTN, int4 RTN
and int4 GPTQ, all with groups of ``--group``, GPTQ calibrated on ``--calibration-rows`` rows
of the training mixture), then each format is loaded the way ``eval.py`` loads it
(``infer.load.load``; bfloat16 is the float32 checkpoint with ``model.dtype=bfloat16``) and
measured:

- bytes: of the quantized matrices (the weights every matmul reads) and of the whole model,
  against float32; float32 and bfloat16 are counted from the parameters (4 and 2 bytes each);
- held-out NLL: mean next-token loss over ``--eval-batches`` batches of the ``eval`` split,
  the rows every run's held-out loss is logged on (``train.loop.EVAL_SEED``);
- text haystack recall: the haystack suite's text items (King James prose, never trained on)
  at ``--lengths`` x its 5 depths x ``--trials``, answered greedily, and how many answers equal
  float32's (a format can keep the recall and still change answers);
- decode tokens/s at batch 1 and 8 (``bench/decode.py``'s measure: ``--prompt`` random text
  tokens, ``--new`` new ones, best of ``--repeats``), and the ratio to float32's.

  python bench/quant.py [--runs runs/nano,runs/nano_student] [--group 64]
      [--calibration-rows 32] [--eval-batches 8] [--lengths 1024,2048] [--trials 4]
      [--prompt 512] [--new 64] [--repeats 2] [--json FILE] [--work runs/quant_bench]

About 30 minutes for both runs on a quiet 2-core machine, a third of it compiling GPTQ.
"""

import argparse
import itertools
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
  from bench import common, decode
except ImportError:  # run as a script: python bench/quant.py
  import common
  import decode
from gemini_mini import quantize as quantize_cli
from gemini_mini.evals import common as evals_common
from gemini_mini.evals import haystack
from gemini_mini.infer.load import load
from gemini_mini.modalities.text import Tokenizer
from gemini_mini.quant import checkpoint as quant_checkpoint
from gemini_mini.quant.model import quantizable
from gemini_mini.train.loop import make_data
from gemini_mini.train.loss import token_nll

# (name, bits, method) of each quantized format; None bits: the float checkpoint.
FORMATS = (('float32', None, None), ('bfloat16', None, None), ('int8', 8, 'rtn'),
           ('int4 rtn', 4, 'rtn'), ('int4 gptq', 4, 'gptq'))


def write_quantized(run: str, work: pathlib.Path, args) -> dict[str, tuple[str, float]]:
  """``{format: (directory, seconds to write it)}`` of the quantized formats of ``run``."""
  written = {}
  for name, bits, method in FORMATS:
    if bits is None:
      continue
    out = work / f'{pathlib.Path(run).name}_{name.replace(" ", "_")}'
    start = time.perf_counter()
    report = quantize_cli.quantize(run, bits, args.group, method, str(out),
                                   args.calibration_rows)
    written[name] = (str(out), time.perf_counter() - start)
    print(f'  {name}: {report} ({written[name][1]:.0f} s)', flush=True)
  return written


def model_bytes(loaded, bits: int | None, float_bytes: int) -> tuple[int, int, int]:
  """``(matrix bytes, their float32 bytes, whole model bytes)``."""
  decoder = loaded.decoder
  if bits is None:
    matrices = sum(v[...].size for v in quantizable(decoder).values())
    total = sum(x.size for x in jax.tree.leaves(nnx.state(decoder, nnx.Param)))
    return matrices * float_bytes, matrices * 4, total * float_bytes
  stored = quant_checkpoint.tensors(decoder)
  quantized, float32 = quant_checkpoint.sizes(stored, decoder)
  return quantized, float32, sum(a.nbytes for a in stored.values())


def held_out_nll(loaded, batches: int) -> float:
  """Mean next-token NLL over the first ``batches`` held-out batches, token-weighted."""
  graphdef, state = nnx.split(loaded.decoder)

  @jax.jit
  def sums(state, batch):
    logits_BTV, _ = nnx.merge(graphdef, state)(batch)
    nll_BT, _ = token_nll(logits_BTV, batch.targets)
    mask_BT = batch.loss_mask.astype(jnp.float32)
    return (nll_BT * mask_BT).sum(), mask_BT.sum()

  total = tokens = 0.0
  for batch in itertools.islice(make_data(loaded.config, 'eval'), batches):
    nll, count = sums(state, jax.tree.map(jnp.asarray, batch))
    total, tokens = total + float(nll), tokens + float(count)
  return total / tokens


def text_haystack(loaded, tokenizer, prose_ids, args) -> tuple[list[str], list[str]]:
  """``(answers, references)``: each text haystack item's first answer word and the value it
  should be, in a fixed order (the suite's items for these lengths and trials)."""
  items = []
  depths = loaded.config.eval.depths
  for length in args.lengths:
    for trial in range(args.trials):
      rng = np.random.default_rng([loaded.config.eval.seed, haystack.MODALITIES.index('text'),
                                   length, trial])
      items += haystack.text_items(prose_ids, length, depths, rng, tokenizer)
  generations = haystack.generate(loaded, items, tokenizer)
  answers = [haystack.answer_word(g.text) for g in generations]
  references = [evals_common.normalize(item.reference) for item in items]
  return answers, references


def measure(loaded, bits, float_bytes, tokenizer, prose_ids, args) -> dict:
  matrices, matrices_f32, total = model_bytes(loaded, bits, float_bytes)
  answers, references = text_haystack(loaded, tokenizer, prose_ids, args)
  speeds = {batch: decode.measure_gemini_mini(loaded.decoder, tokenizer, batch, args)
            for batch in (1, 8)}
  return {'matrix_bytes': matrices, 'matrix_float32_bytes': matrices_f32, 'model_bytes': total,
          'nll': held_out_nll(loaded, args.eval_batches),
          'recall': float(np.mean([a == r for a, r in zip(answers, references)])),
          'answers': answers,
          **{f'tokens_per_s_batch{b}': s['new_tokens_per_s'] for b, s in speeds.items()},
          **{f'decode_only_tokens_per_s_batch{b}': s.get('decode_only_tokens_per_s')
             for b, s in speeds.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', default='runs/nano,runs/nano_student')
  parser.add_argument('--group', type=int, default=64)
  parser.add_argument('--calibration-rows', type=int, default=32)
  parser.add_argument('--eval-batches', type=int, default=8)
  parser.add_argument('--lengths', default='1024,2048')
  parser.add_argument('--trials', type=int, default=4)
  parser.add_argument('--prompt', type=int, default=512)
  parser.add_argument('--new', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--work', default='runs/quant_bench',
                      help='where the quantized checkpoints are written (emptied first)')
  parser.add_argument('--json', metavar='FILE')
  args = parser.parse_args()
  args.lengths = [int(n) for n in args.lengths.split(',')]
  work = pathlib.Path(args.work)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  tokenizer = Tokenizer()
  figures = {'environment': common.environment(), 'args': vars(args), 'runs': {}}
  rows = []
  for run in args.runs.split(','):
    print(f'{run}: writing the quantized checkpoints', flush=True)
    written = write_quantized(run, work, args)
    # GPTQ's solvers are large unrolled programs; a run that kept every compiled program ran
    # LLVM out of memory on the second model (24 GiB machine).
    jax.clear_caches()
    base = load(run)
    prose_ids = evals_common.bible_ids(base.config.data.dir, base.config.data.subset, tokenizer)
    results = {}
    for name, bits, _ in FORMATS:
      print(f'{run}: {name}', flush=True)
      if bits is None:
        loaded = load(run, ['model.dtype=bfloat16'] if name == 'bfloat16' else [])
      else:
        loaded = load(written[name][0])
      results[name] = measure(loaded, bits, 2 if name == 'bfloat16' else 4, tokenizer,
                              prose_ids, args)
      if bits is not None:
        results[name]['write_s'] = written[name][1]
      jax.clear_caches()
    reference = results['float32']
    for name, result in results.items():
      result['same_answers_as_float32'] = float(np.mean(
          [a == b for a, b in zip(result['answers'], reference['answers'])]))
      rows.append([f'{pathlib.Path(run).name} {name}',
                   f'{result["matrix_bytes"] / result["matrix_float32_bytes"]:.3f}',
                   f'{result["model_bytes"] / reference["model_bytes"]:.3f}',
                   f'{result["nll"]:.4f}', f'{result["nll"] / reference["nll"] - 1:+.2%}',
                   f'{result["recall"]:.1%}', f'{result["same_answers_as_float32"]:.0%}',
                   f'{result["tokens_per_s_batch1"]:.1f}',
                   f'{result["tokens_per_s_batch1"] / reference["tokens_per_s_batch1"]:.2f}',
                   f'{result["tokens_per_s_batch8"]:.1f}',
                   f'{result["tokens_per_s_batch8"] / reference["tokens_per_s_batch8"]:.2f}'])
    figures['runs'][run] = results
  common.print_table(['format', 'matrices / f32', 'model / f32', 'held-out NLL', 'vs f32',
                      'text recall', 'same answers', 'tok/s b1', 'x f32', 'tok/s b8', 'x f32'],
                     rows)
  common.write_json(args.json, figures)


if __name__ == '__main__':
  main()
