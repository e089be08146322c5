"""Dense against chunked attention kernel: forward+backward time and peak memory by length.

The nano attention layer (``Attention(d_model 256, 4 heads, 1 kv head, head_dim 64)``, batch 1,
one causal segment) with ``kernel='dense'`` and ``kernel='chunked'``. For each length:

* time: ``jax.jit(jax.value_and_grad(loss))``, ``loss = sum(y**2)`` w.r.t. the parameters
  (``nnx.split``) and the input; min and median over repeats;
* analysed memory: XLA's memory analysis of that compiled function, temp + argument + output;
* peak RSS of a fresh subprocess that compiles and runs one forward+backward at that length, so
  lengths do not pollute each other, and ``run`` (what running, not compiling, added to its
  RSS); growth per doubling is taken over ``run``. The peak is read from ``/proc/self/status``
  (``VmHWM``, Linux), not ``resource.getrusage().ru_maxrss``: Linux carries the parent's peak
  over into a spawned child's ``ru_maxrss``, so every child would report this process's peak.

A kernel whose analysed memory exceeds ``--memory-limit-gib`` is skipped (neither timed nor run).
The chunked kernel's target: memory grows about linearly with length (x2 per doubling), and a
32k-token forward+backward fits in 8 GiB.

  python bench/attention.py [--lengths 1024 2048 4096 8192 16384 32768] [--chunk-size 512]
                            [--memory-limit-gib 12] [--json FILE]
"""

import argparse
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx

try:
  from bench import common
except ImportError:  # run as a script: python bench/attention.py
  import common
from gemini_mini.layers.attention import Attention

NANO = {'d_model': 256, 'num_heads': 4, 'num_kv_heads': 1, 'head_dim': 64}
KERNELS = ('dense', 'chunked')
TARGET_LENGTH, TARGET_BYTES = 32768, 8 * common.GIB


def compiled_step(kernel: str, length: int, chunk_size: int):
  """``(compiled forward+backward, its arguments)`` for one length."""
  layer = Attention(**NANO, kernel=kernel, chunk_size=chunk_size, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)

  def loss(params, x_BTD, segment_ids_BT, positions_BT):
    y_BTD = nnx.merge(graphdef, params)(x_BTD, segment_ids_BT, positions_BT)
    return jnp.sum(jnp.square(y_BTD))

  args = (params, jax.random.normal(jax.random.key(0), (1, length, NANO['d_model'])),
          jnp.ones((1, length), jnp.int32), jnp.arange(length, dtype=jnp.int32)[None])
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step.lower(*args).compile(), args


def analysed_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def status_bytes(field: str) -> int:
  """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, from ``/proc`` (Linux)."""
  with open('/proc/self/status') as f:
    line = next(line for line in f if line.startswith(field + ':'))
  return int(line.split()[1]) * 1024  # kB


def child(kernel: str, length: int, chunk_size: int) -> None:
  """In a fresh process: compiles and runs one forward+backward; prints RSS figures as JSON.

  ``run_bytes`` is what running (not compiling) added to the RSS: the high-water mark is reset
  after compiling (``/proc/self/clear_refs``) and read again after the run.
  """
  jax.block_until_ready(jnp.zeros(()))  # start the runtime
  base = status_bytes('VmRSS')
  compiled, args = compiled_step(kernel, length, chunk_size)
  compile_peak = status_bytes('VmHWM')
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset VmHWM to the current RSS
  before_run = status_bytes('VmRSS')
  jax.block_until_ready(compiled(*args))
  run_peak = status_bytes('VmHWM')
  print(json.dumps({'base_rss': base, 'compile_peak_rss': compile_peak,
                    'run_bytes': run_peak - before_run, 'peak_rss': max(compile_peak, run_peak)}))


def run_child(kernel: str, length: int, chunk_size: int) -> dict:
  command = [sys.executable, __file__, '--child', kernel, '--lengths', str(length),
             '--chunk-size', str(chunk_size)]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    print(f'  {kernel} {length}: subprocess failed ({done.returncode}): {done.stderr[-500:]}')
    return {'rss_error': done.returncode}
  return json.loads(done.stdout.strip().splitlines()[-1])


def measure(kernel: str, length: int, args) -> dict:
  compiled, step_args = compiled_step(kernel, length, args.chunk_size)
  figures = {'analysed_bytes': analysed_bytes(compiled)}
  if figures['analysed_bytes'] > args.memory_limit_gib * common.GIB:
    return {**figures, 'skipped': True}
  figures |= common.time_fn(compiled, *step_args, warmup=args.warmup, repeats=args.repeats)
  del compiled, step_args
  return figures | run_child(kernel, length, args.chunk_size)


def growth_per_doubling(lengths, values):
  """``[None, g1, ...]``: memory factor per doubling of length between consecutive lengths."""
  out = [None]
  for (l0, v0), (l1, v1) in zip(zip(lengths, values), zip(lengths[1:], values[1:])):
    ok = v0 and v1 and v0 > 0 and v1 > 0
    out.append((v1 / v0) ** (1 / math.log2(l1 / l0)) if ok else None)
  return out


def report(results: list[dict]) -> dict:
  """Prints the time and memory tables and the target check; adds growth to ``results``."""
  get = lambda r, kernel, key: None if r[kernel].get('skipped') else r[kernel].get(key)
  ms = lambda s: '-' if s is None else f'{1e3 * s:.1f}'
  ratio = lambda a, b: '-' if a is None or b is None else f'{a / b:.2f}'
  times = lambda g: '-' if g is None else f'x{g:.2f}'
  lengths = [r['length'] for r in results]
  growth_analysed = growth_per_doubling(lengths, [get(r, 'chunked', 'analysed_bytes')
                                                  for r in results])
  growth_run = growth_per_doubling(lengths, [get(r, 'chunked', 'run_bytes') for r in results])
  for r, g_analysed, g_run in zip(results, growth_analysed, growth_run):
    r['chunked']['growth_per_doubling'] = {'analysed': g_analysed, 'run': g_run}

  def memory(r, kernel, key):
    if key == 'analysed_bytes' and r[kernel].get('skipped'):
      return f"skipped (would need {r[kernel]['analysed_bytes'] / common.GIB:.1f} GiB)"
    return common.format_bytes(get(r, kernel, key))

  print('\ntime per forward+backward (min over repeats, ms)')
  common.print_table(
      ['length', 'dense', 'chunked', 'chunked/dense'],
      [[r['length'], ms(get(r, 'dense', 'min_s')), ms(get(r, 'chunked', 'min_s')),
        ratio(get(r, 'chunked', 'min_s'), get(r, 'dense', 'min_s'))] for r in results])
  print('\nmemory: XLA analysis (temp + argument + output); peak RSS of a fresh process and '
        'what running (not compiling) added to it; growth per doubling of length')
  common.print_table(
      ['length', 'dense analysed', 'chunked', 'c/d', 'growth', 'dense RSS', 'chunked RSS',
       'c/d', 'dense run', 'chunked run', 'growth'],
      [[r['length'], memory(r, 'dense', 'analysed_bytes'), memory(r, 'chunked', 'analysed_bytes'),
        ratio(get(r, 'chunked', 'analysed_bytes'), get(r, 'dense', 'analysed_bytes')),
        times(g_analysed), memory(r, 'dense', 'peak_rss'), memory(r, 'chunked', 'peak_rss'),
        ratio(get(r, 'chunked', 'peak_rss'), get(r, 'dense', 'peak_rss')),
        memory(r, 'dense', 'run_bytes'), memory(r, 'chunked', 'run_bytes'), times(g_run)]
       for r, g_analysed, g_run in zip(results, growth_analysed, growth_run)])
  base = [get(r, 'chunked', 'base_rss') or 0 for r in results]
  print(f'(RSS of a fresh process once JAX has started: {common.format_bytes(max(base))}; '
        'linear growth is x2 per doubling, quadratic x4)')

  target = {}
  if TARGET_LENGTH in lengths:
    peak = get(results[lengths.index(TARGET_LENGTH)], 'chunked', 'peak_rss')
    target['fits_8gib_at_32k'] = peak is not None and peak <= TARGET_BYTES
    print(f'\ntarget: chunked {TARGET_LENGTH}-token forward+backward peak RSS '
          f'{common.format_bytes(peak)} <= 8 GiB: {target["fits_8gib_at_32k"]}')
  return target


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', type=int, nargs='+',
                      default=[1024, 2048, 4096, 8192, 16384, 32768])
  parser.add_argument('--chunk-size', type=int, default=512)
  parser.add_argument('--memory-limit-gib', type=float, default=12.0,
                      help='skip a kernel whose analysed memory exceeds this')
  parser.add_argument('--child', choices=KERNELS, help=argparse.SUPPRESS)
  args = common.add_common_flags(parser).parse_args()
  if args.child:
    return child(args.child, args.lengths[0], args.chunk_size)

  print(f'forward+backward of Attention({NANO}), batch 1, chunk {args.chunk_size}')
  print(common.describe(common.environment()))
  results = []
  for length in args.lengths:
    row = {'length': length}
    for kernel in KERNELS:
      row[kernel] = measure(kernel, length, args)
      done = row[kernel]
      print(f"  {length} {kernel}: " + ('skipped' if done.get('skipped') else
            f"{1e3 * done['min_s']:.1f} ms, peak RSS {common.format_bytes(done.get('peak_rss'))}"),
            flush=True)
    results.append(row)

  target = report(results)
  config = {key: value for key, value in vars(args).items() if key != 'child'}
  common.write_json(args.json, {'benchmark': 'attention', 'pass': 'forward+backward',
                                'config': {**config, **NANO},
                                'environment': common.environment(), 'target': target,
                                'results': results})


if __name__ == '__main__':
  main()
