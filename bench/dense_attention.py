"""The dense attention kernel against its autodiff reference: forward + backward time.

``attention_kernels.dense_attention`` (query heads of a KV head folded into one query axis,
hand-written flash-style backward) against ``dense_attention_reference`` (the textbook
softmax, differentiated by JAX), on nano's attention shape (4 query heads sharing 1 KV head,
head_dim 64), one causal document per row, for each ``--shapes`` ``BATCHxLENGTH``. Both are
jitted ``jax.grad`` of ``sum(out * cotangent)``, timed in the same run (min of ``--repeats``),
and their gradients compared.

  python bench/dense_attention.py [--shapes 8x512 2x2048] [--repeats 5] [--json FILE]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

try:
  from bench import common
except ImportError:  # run as a script: python bench/dense_attention.py
  import common
from gemini_mini.layers import attention_kernels

KV_HEADS, GROUP, HEAD_DIM = 1, 4, 64  # nano: 4 query heads, multi-query
KERNELS = {'hand-written backward': attention_kernels.dense_attention,
           'autodiff reference': attention_kernels.dense_attention_reference}


def inputs(batch: int, length: int):
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q = normal(batch, length, KV_HEADS, GROUP, HEAD_DIM)
  k, v = normal(batch, length, KV_HEADS, HEAD_DIM), normal(batch, length, KV_HEADS, HEAD_DIM)
  segment_ids = jnp.ones((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  mask = attention_kernels.attention_mask(segment_ids, segment_ids, positions, positions, 0)
  return q, k, v, mask, normal(*q.shape)


def grad_fn(kernel):
  loss = lambda q, k, v, mask, cotangent: jnp.sum(kernel(q, k, v, mask) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
  parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
  parser.add_argument('--shapes', nargs='+', default=['8x512', '2x2048'])
  args = parser.parse_args()
  rows, figures = [], {'environment': common.environment(), 'shapes': {}}
  for shape in args.shapes:
    batch, length = (int(n) for n in shape.split('x'))
    args_in = inputs(batch, length)
    grads = {name: grad_fn(kernel)(*args_in) for name, kernel in KERNELS.items()}
    error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for a, b in zip(*grads.values()))
    times = {name: common.time_fn(grad_fn(kernel), *args_in, warmup=args.warmup,
                                  repeats=args.repeats)['min_s'] for name, kernel in KERNELS.items()}
    fast, reference = times.values()
    figures['shapes'][shape] = {'seconds': times, 'speedup': reference / fast,
                                'max_relative_gradient_difference': error}
    rows.append([shape, f'{1e3 * fast:.1f}', f'{1e3 * reference:.1f}', f'{reference / fast:.2f}',
                 f'{error:.1e}'])
  common.print_table(['batch x length', 'hand-written ms', 'autodiff ms', 'speedup',
                      'grad rel. diff'], rows)
  common.write_json(args.json, figures)


if __name__ == '__main__':
  main()
