"""KV-cache decoding throughput of gemini_mini against transformers ``generate``, in one run.

gemini_mini: ``infer.generate`` (greedy, batched, KV cache; prefill and one jitted while_loop)
on a random-weight decoder of the config's shape (default nano), prompts of ``--prompt``
uniformly random non-special token ids (text), ``--new`` new tokens per prompt, for each batch
size in ``--batches``. ``stop_ids=()``: no row stops early (checked: every row returns exactly
``--new`` tokens). A first call of the same shapes compiles (untimed); then the best of
``--repeats`` timed calls. The prefill alone (the same jitted function ``generate`` calls, at
the same cache length) is timed too, to give a decode-only rate.

transformers: MixtralForCausalLM.generate, same shape, prompt length, new tokens and batch
sizes, greedy, dynamic KV cache, eos disabled and ``min_new_tokens = max_new_tokens``
(``bench/peers/hf_decode_bench.py`` in the venv of ``bench/peers/setup_hf.sh``; skipped with a
message when that venv is missing). Run after gemini_mini, never at the same time.

new tokens/s = batch x new tokens / wall time of the whole generate call (prefill included);
decode-only = the same with the prefill's time taken off.

  python bench/decode.py [--prompt 512] [--new 256] [--batches 1,8] [--repeats 3]
      [--peers hf] [--hf-python PYTHON] [--config configs/nano.yaml] [model.d_model=512 ...]
      [--json FILE]

On a GPU the transformers peer runs on the GPU too (``--device cuda``).

At the nano shape on a quiet 2-core machine the default run takes about 3 minutes.
"""

import argparse
import os
import pathlib
import time

import jax
import numpy as np
from flax import nnx

try:
  from bench import common
except ImportError:  # run as a script: python bench/decode.py
  import common
from gemini_mini import config as config_lib
from gemini_mini.infer import generate as generate_lib
from gemini_mini.modalities import interleave
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer
from gemini_mini.model import Decoder

REPO = pathlib.Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / 'bench' / 'peers'
HF_VENV_PYTHON = PEERS_DIR / '.venv-hf' / 'bin' / 'python'


def random_prompts(batch: int, length: int, tokenizer, vocab_size: int, seed: int):
  """``batch`` text prompts of ``length`` ids drawn uniformly from the ordinary pieces."""
  allowed = tokenizer.ordinary_ids[tokenizer.ordinary_ids < vocab_size]
  rng = np.random.default_rng(seed)
  return [[Segment.text(rng.choice(allowed, length))] for _ in range(batch)]


def time_prefill(decoder, prompts, tokenizer, new_tokens: int, repeats: int) -> float | None:
  """Seconds of the prefill ``generate`` runs for these prompts (best of ``repeats``), through
  the same jitted function at the same cache length; None if that internal API changed."""
  try:
    config = decoder.config
    examples = [interleave.flatten(p, tokenizer) for p in prompts]
    batch, _ = generate_lib.prefill_batch(examples, patch_dim=config.patch_dim,
                                          audio_dim=config.audio_dim)
    needed = batch.tokens.shape[1] + new_tokens
    bucket = generate_lib.CACHE_BUCKET
    cache_length = min(-(-needed // bucket) * bucket, config.max_length)
    graphdef, state = generate_lib._dropless_graphdef(config), nnx.state(decoder)
    run = lambda: jax.block_until_ready(generate_lib._prefill(graphdef, state, batch, cache_length))
    run()  # compiled by the warm-up generate already; this one only warms caches
    best = float('inf')
    for _ in range(repeats):
      start = time.perf_counter()
      run()
      best = min(best, time.perf_counter() - start)
    return best
  except (AttributeError, TypeError) as error:
    print(f'  (prefill not timed: {error})')
    return None


def measure_gemini_mini(decoder, tokenizer, batch: int, args) -> dict:
  prompts = random_prompts(batch, args.prompt, tokenizer, decoder.config.vocab_size,
                           seed=args.seed + batch)
  run = lambda: generate_lib.generate(decoder, prompts, tokenizer, max_new_tokens=args.new,
                                      temperature=0.0, stop_ids=())
  start = time.perf_counter()
  run()  # compiles the prefill and the decode loop for these shapes
  compile_s = time.perf_counter() - start
  best = float('inf')
  for _ in range(args.repeats):
    start = time.perf_counter()
    generations = run()
    best = min(best, time.perf_counter() - start)
  lengths = {len(g.tokens) for g in generations}
  assert lengths == {args.new}, f'rows generated {sorted(lengths)} tokens, not {args.new}'
  prefill = time_prefill(decoder, prompts, tokenizer, args.new, args.repeats)
  result = {'generate_s': best, 'prefill_s': prefill, 'first_call_s': compile_s,
            'new_tokens': args.new, 'prompt': args.prompt,
            'new_tokens_per_s': batch * args.new / best}
  if prefill is not None:
    result['decode_only_tokens_per_s'] = batch * args.new / max(best - prefill, 1e-9)
  print(f'  gemini_mini batch {batch}: generate {best:.2f} s (prefill '
        f"{'-' if prefill is None else f'{prefill:.2f}'} s, first call {compile_s:.1f} s) "
        f"new tokens/s {result['new_tokens_per_s']:.1f} decode-only tokens/s "
        f"{result.get('decode_only_tokens_per_s', float('nan')):.1f}", flush=True)
  return result


def hf_command(python: str, m, args) -> list[str]:
  command = [python, PEERS_DIR / 'hf_decode_bench.py', '--hidden', m.d_model,
             '--heads', m.num_heads, '--kv-heads', m.num_kv_heads, '--head-dim', m.head_dim,
             '--ffn', m.d_ff, '--layers', m.num_layers, '--experts', m.num_experts,
             '--topk', m.experts_per_token, '--vocab', m.vocab_size, '--prompt', args.prompt,
             '--new', args.new, '--batches', args.batches, '--threads', os.cpu_count(),
             '--repeats', args.repeats, '--seed', args.seed, '--device', common.torch_device()]
  return [str(c) for c in command]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('overrides', nargs='*', help='config overrides, e.g. model.d_model=512')
  parser.add_argument('--config', default=str(REPO / 'configs' / 'nano.yaml'))
  parser.add_argument('--prompt', type=int, default=512, help='prompt tokens per row')
  parser.add_argument('--new', type=int, default=256, help='new tokens per row')
  parser.add_argument('--batches', default='1,8', help='batch sizes, comma separated')
  parser.add_argument('--repeats', type=int, default=3, help='timed calls per batch size (best)')
  parser.add_argument('--peers', default='hf', help="'hf', or '' for none")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--peer-timeout', type=float, default=None, help='seconds for the peer run')
  parser.add_argument('--hf-python', default=str(HF_VENV_PYTHON),
                      help='the python that has torch and transformers: a path or a command on '
                           'PATH (on a GPU the peer runs on the GPU too)')
  parser.add_argument('--json', metavar='FILE', help='also write the figures to this JSON file')
  args = parser.parse_args()
  try:
    # The peer has an output head of its own (tie_word_embeddings=False), so this side too,
    # whatever the config ties; a later override wins.
    config = config_lib.load(args.config, ['model.tie_embeddings=false', *args.overrides])
  except config_lib.ConfigError as error:
    parser.error(str(error))
  m = config.model
  batches = [int(b) for b in args.batches.split(',')]
  peers = [p.strip() for p in args.peers.split(',') if p.strip() and p.strip() != 'none']
  if set(peers) - {'hf'}:
    parser.error(f"unknown peers {sorted(set(peers) - {'hf'})}; the decode peer is 'hf'")
  if args.prompt + args.new > m.max_length:
    parser.error(f'--prompt + --new ({args.prompt + args.new}) exceeds model.max_length '
                 f'({m.max_length})')
  if peers and (not m.num_experts or m.moe_every != 1 or m.shared_expert or m.attention_window):
    print('peers skipped: transformers Mixtral has an MoE in every layer, no shared expert and '
          'no local attention window')
    peers = []

  print(f'shape: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads / '
        f'{m.num_kv_heads} kv heads, head_dim {m.head_dim}, {m.num_experts} experts top-'
        f'{m.experts_per_token}, d_ff {m.d_ff}, vocab {m.vocab_size}; gemini_mini dtype '
        f'{m.dtype}, dispatch dropless (generate decodes with it); prompt {args.prompt}, new '
        f'{args.new}, greedy, batches {batches}, best of {args.repeats}')
  print(common.describe(common.environment()))

  tokenizer = Tokenizer()
  decoder = Decoder(m, rngs=nnx.Rngs(args.seed))
  print('\n== gemini_mini (infer.generate)', flush=True)
  ours = {str(b): measure_gemini_mini(decoder, tokenizer, b, args) for b in batches}

  results = {'gemini_mini': {'system': f'gemini_mini infer.generate (jax {jax.__version__})',
                             'batches': ours}}
  if 'hf' in peers:
    python = common.peer_python(args.hf_python)
    if python:
      results['hf'] = common.run_peer_script('hf', hf_command(python, m, args), cwd=REPO,
                                             timeout=args.peer_timeout)
    else:
      print(f'\n== hf: skipped: {args.hf_python} missing, run bench/peers/setup_hf.sh')
      results['hf'] = {'skipped': f'{args.hf_python} missing, run bench/peers/setup_hf.sh'}

  print(f'\n== decoding: prompt {args.prompt} tokens, {args.new} new tokens per row, greedy; '
        'new tokens/s over the whole generate call (prefill included); best of '
        f'{args.repeats}')
  rows = []
  for b in batches:
    mine = ours[str(b)]
    for name, result in results.items():
      if 'batches' not in result:
        rows.append([name, b, 'skipped' if 'skipped' in result else 'FAILED', '-', '-', '-',
                     '-', '-'])
        continue
      r = result['batches'][str(b)]
      r['gemini_mini_over_peer'] = mine['new_tokens_per_s'] / r['new_tokens_per_s']
      decode_only = r.get('decode_only_tokens_per_s')
      mine_decode = mine.get('decode_only_tokens_per_s')
      if decode_only and mine_decode:
        r['gemini_mini_over_peer_decode_only'] = mine_decode / decode_only
      rows.append([name, b, f"{r['generate_s']:.2f}",
                   '-' if r.get('prefill_s') is None else f"{r['prefill_s']:.2f}",
                   f"{r['new_tokens_per_s']:.1f}",
                   f'{decode_only:.1f}' if decode_only else '-',
                   f"{r['gemini_mini_over_peer']:.2f}",
                   f"{r['gemini_mini_over_peer_decode_only']:.2f}"
                   if 'gemini_mini_over_peer_decode_only' in r else '-'])
  common.print_table(['system', 'batch', 'generate s', 'prefill s', 'new tok/s',
                      'decode-only tok/s', 'gemini_mini / it', '(decode-only)'], rows)
  for name, result in results.items():
    if 'batches' not in result:
      why = result.get('skipped') and f"skipped: {result['skipped']}" or \
          f"FAILED ({result.get('failed')}): " + ' / '.join(result.get('tail', [])[-3:])
      print(f'   {name}: {why}')
  common.write_json(args.json, {'benchmark': 'decode', 'config': {**vars(args), 'model': vars(m)},
                                'environment': common.environment(), 'results': results})


if __name__ == '__main__':
  main()
