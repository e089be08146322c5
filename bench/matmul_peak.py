"""The machine's matmul peak, measured now: the denominator of MFU in the other benchmarks.

Three square ``size x size`` matmuls (2 * size^3 FLOPs each), every one the best of ``reps``
timed calls after a compile and a warm-up call:

  xla_float32        jnp.dot of float32 inputs, jitted (what float32 training runs on)
  xla_bfloat16       bfloat16 inputs, float32 accumulation and output
                     (``preferred_element_type=jnp.float32``; bfloat16 compute dtype)
  numpy_float32      numpy's BLAS, for reference (not used as a peak; on the CPU backend only)

``measure_peaks(size=..., reps=...)`` returns them in GFLOP/s (``peak_for_dtype`` picks the
one for a compute dtype); the CLI prints them:

  python bench/matmul_peak.py [--size 4096] [--reps 5] [--json FILE]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
  from bench import common
except ImportError:  # run as a script: python bench/matmul_peak.py
  import common

# compute dtype -> the key of measure_peaks' result that bounds it
PEAK_KEY = {'float32': 'xla_float32', 'bfloat16': 'xla_bfloat16'}


def _best_seconds(fn, reps: int) -> float:
  fn()  # compile (jit) / first touch
  fn()  # warm-up
  best = float('inf')
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def measure_peaks(size: int = 4096, reps: int = 5) -> dict:
  """GFLOP/s of a ``size``^3 matmul: ``{'xla_float32', 'xla_bfloat16', 'numpy_float32',
  'size', 'reps'}`` (each the best of ``reps`` calls; ``numpy_float32`` only where JAX runs on
  the CPU, as numpy's host BLAS says nothing about an accelerator)."""
  flops = 2.0 * size ** 3
  key_a, key_b = jax.random.split(jax.random.key(0))
  a32 = jax.random.normal(key_a, (size, size), jnp.float32)
  b32 = jax.random.normal(key_b, (size, size), jnp.float32)
  a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
  dot32 = jax.jit(jnp.dot)
  dot16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  seconds = {
      'xla_float32': _best_seconds(lambda: dot32(a32, b32).block_until_ready(), reps),
      'xla_bfloat16': _best_seconds(lambda: dot16(a16, b16).block_until_ready(), reps),
  }
  if jax.default_backend() == 'cpu':
    a_np, b_np = np.asarray(a32), np.asarray(b32)
    seconds['numpy_float32'] = _best_seconds(lambda: a_np @ b_np, reps)
  return {**{name: flops / s / 1e9 for name, s in seconds.items()}, 'size': size, 'reps': reps}


def peak_for_dtype(peaks: dict, dtype: str) -> float:
  """The GFLOP/s peak that bounds compute in ``dtype`` ('float32' or 'bfloat16')."""
  return peaks[PEAK_KEY[dtype]]


def describe_peaks(peaks: dict) -> str:
  numpy = (f", numpy float32 {peaks['numpy_float32']:.1f} GFLOP/s (reference)"
           if 'numpy_float32' in peaks else '')
  return (f"matmul peak ({peaks['size']}^2, best of {peaks['reps']}): "
          f"XLA float32 {peaks['xla_float32']:.1f} GFLOP/s, "
          f"XLA bfloat16 in / float32 acc {peaks['xla_bfloat16']:.1f} GFLOP/s{numpy}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=4096)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--json', metavar='FILE', help='also write the figures to this JSON file')
  args = parser.parse_args()
  print(common.describe(common.environment()))
  peaks = measure_peaks(args.size, args.reps)
  rows = [['XLA float32', f"{peaks['xla_float32']:.1f}"],
          ['XLA bfloat16 in, float32 acc', f"{peaks['xla_bfloat16']:.1f}"]]
  if 'numpy_float32' in peaks:
    rows.append(['numpy float32 (reference)', f"{peaks['numpy_float32']:.1f}"])
  common.print_table(['matmul', 'GFLOP/s'], rows)
  common.write_json(args.json, {'benchmark': 'matmul_peak', 'config': vars(args),
                                'environment': common.environment(), 'peaks_gflop_per_s': peaks})


if __name__ == '__main__':
  main()
