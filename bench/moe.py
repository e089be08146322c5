"""MoE layer against a dense GatedMLP of the same active FLOPs, timed in the same run.

Variants: ``capacity`` dispatch at capacity factors 1.0 and 1.25, and ``dropless`` with each
grouped matmul (``tiled``, ``ragged_dot``; the MoE's ``grouped_matmul`` argument). The baseline is
``GatedMLP(d_model, experts_per_token * d_ff)``. Timed: ``jax.jit(jax.value_and_grad(loss))``
with ``loss = sum(y**2)`` w.r.t. the parameters (``nnx.split``) and the input; with
``--forward-only``, ``jax.jit(loss)``.

FLOPs (useful work only: capacity padding, dropped slots, tile padding, ``ragged_dot``'s masked
work and elementwise ops are not counted), with X = batch * length tokens:
  MoE forward    2 * X * D * (3 * k * F + E)   three expert matmuls per routed slot + router
  dense forward  2 * X * D * 3 * (k * F)       the same three matmuls, hidden k * F
  forward + backward = 3 * forward             backward: a dx and a dW matmul per forward one

  python bench/moe.py [--batch 1 --length 4096 --d-model 512 --d-ff 1024 --experts 8
                       --top-k 2] [--forward-only] [--json FILE]
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

try:
  from bench import common
except ImportError:  # run as a script: python bench/moe.py
  import common
from gemini_mini.layers.grouped_matmul import Implementation
from gemini_mini.layers.mlp import GatedMLP
from gemini_mini.layers.moe import MoE

# (dispatch, capacity_factor, grouped matmul implementation)
VARIANTS = (('capacity', 1.0, None), ('capacity', 1.25, None),
            ('dropless', None, 'tiled'), ('dropless', None, 'ragged_dot'))


def split_loss(module: nnx.Module):
  """``(loss(params, x_BTD), params, graphdef)`` with ``loss = sum(y**2)``."""
  graphdef, params = nnx.split(module)

  def loss(params, x_BTD):
    y = nnx.merge(graphdef, params)(x_BTD)
    y_BTD = y[0] if isinstance(y, tuple) else y  # the MoE also returns aux
    return jnp.sum(jnp.square(y_BTD))
  return loss, params, graphdef


def time_module(module, x_BTD, args) -> dict:
  loss, params, _ = split_loss(module)
  step = jax.jit(loss if args.forward_only else jax.value_and_grad(loss, argnums=(0, 1)))
  return common.time_fn(step, params, x_BTD, warmup=args.warmup, repeats=args.repeats)


def dropped_fraction(moe: MoE, x_BTD) -> float:
  graphdef, params = nnx.split(moe)
  return float(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[1]['dropped'])(params, x_BTD))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--length', type=int, default=4096, help='tokens per sequence')
  parser.add_argument('--d-model', type=int, default=512)
  parser.add_argument('--d-ff', type=int, default=1024, help='hidden width of each expert')
  parser.add_argument('--experts', type=int, default=8)
  parser.add_argument('--top-k', type=int, default=2, help='experts per token')
  parser.add_argument('--forward-only', action='store_true')
  args = common.add_common_flags(parser).parse_args()

  d, f, e, k = args.d_model, args.d_ff, args.experts, args.top_k
  tokens = args.batch * args.length
  passes = 1 if args.forward_only else 3
  dense_flops = passes * 2 * tokens * d * 3 * k * f
  moe_flops = passes * 2 * tokens * d * (3 * k * f + e)
  x_BTD = jax.random.normal(jax.random.key(0), (args.batch, args.length, d))
  what = 'forward' if args.forward_only else 'forward+backward'
  print(f'{what}: {args.batch}x{args.length} tokens, d_model {d}, d_ff {f}, {e} experts, '
        f'top-{k}; dense d_ff {k * f}')
  print(common.describe(common.environment()))

  dense = GatedMLP(d, k * f, rngs=nnx.Rngs(0))
  timing = time_module(dense, x_BTD, args)
  results = [{'name': f'dense GatedMLP (d_ff {k * f})', 'flops': dense_flops, **timing}]
  for dispatch, capacity_factor, implementation in VARIANTS:
    moe = MoE(d, f, e, k, dispatch=dispatch, capacity_factor=capacity_factor or 1.0,
              grouped_matmul=implementation and Implementation(implementation),
              rngs=nnx.Rngs(0))
    timing = time_module(moe, x_BTD, args)
    dropped = dropped_fraction(moe, x_BTD)
    if dispatch == 'capacity':
      name = f'capacity cf={capacity_factor} (C={moe.capacity(args.length)})'
    else:
      name = f'dropless {implementation}'
    results.append({'name': name, 'dispatch': dispatch, 'capacity_factor': capacity_factor,
                    'grouped_matmul': implementation, 'dropped': dropped, 'flops': moe_flops,
                    **timing})

  dense_s = results[0]['min_s']
  for r in results:
    r['vs_dense'] = r['min_s'] / dense_s
    r['gflop_per_s'] = r['flops'] / r['min_s'] / 1e9
  common.print_table(
      ['variant', 'ms/call (min)', 'median', 'x dense', 'GFLOP/s', 'dropped'],
      [[r['name'], f"{1e3 * r['min_s']:.1f}", f"{1e3 * r['median_s']:.1f}",
        f"{r['vs_dense']:.2f}", f"{r['gflop_per_s']:.1f}",
        f"{r['dropped']:.2%}" if r.get('dispatch') == 'capacity' else '-'] for r in results])
  common.write_json(args.json, {'benchmark': 'moe', 'pass': what, 'config': vars(args),
                                'environment': common.environment(), 'results': results})


if __name__ == '__main__':
  main()
