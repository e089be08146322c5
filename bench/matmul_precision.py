"""One weight matmul's forward + backward at the model's shapes, by precision, in one run.

``y_XO = x_XI @ w_IO`` and its two gradients (``dx = dy @ w.T``, ``dw = x.T @ dy``), as a
training step runs them, timed for three precisions:

  float32   float32 inputs and results (the nano preset)
  bfloat16  bfloat16 inputs and results: what ``model.dtype=bfloat16`` ran before
            ``layers.matmul.weight_einsum``, and still runs on GPU and TPU
  mixed     bfloat16 inputs, float32 accumulation (``preferred_element_type``), results cast
            to bfloat16; the backward's two matmuls likewise (a ``custom_vjp``): what
            ``weight_einsum`` runs on CPU in bfloat16

It asks whether a CPU with bfloat16 matrix units (AMX) trains faster when the matmuls
ask for float32 results, as XLA:CPU's fast bfloat16 kernels need.

A second table times one matmul alone, bfloat16 in / float32 out against float32, in each
operand layout (``MK,KN``: the forward; ``MK,NK``: an input gradient ``dy w^T``;
``KM,KN``: a weight gradient ``x^T dy``), since XLA:CPU picks its kernel by layout. Shapes (``X`` = 8 x 512 tokens of the shared shape): the output layer,
the expert MLP's up and down projections over all tokens, and one 128-row grouped-matmul
tile.

  python bench/matmul_precision.py [--json FILE] [--warmup 2] [--repeats 5]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

try:
  from bench import common
except ImportError:  # run as a script: python bench/matmul_precision.py
  import common

SHAPES = {  # name: (X, I, O)
    'output layer 4096x256x8192': (4096, 256, 8192),
    'expert up 4096x256x512': (4096, 256, 512),
    'expert down 4096x512x256': (4096, 512, 256),
    'one tile 128x256x512': (128, 256, 512),
}


def _mixed_dot(x_XI, w_IO):
  return jnp.einsum('XI,IO->XO', x_XI, w_IO, preferred_element_type=jnp.float32).astype(x_XI.dtype)


@jax.custom_vjp
def mixed_matmul(x_XI, w_IO):
  """bfloat16 in, float32 accumulation, bfloat16 out; the backward's matmuls the same way."""
  return _mixed_dot(x_XI, w_IO)


def _mixed_fwd(x_XI, w_IO):
  return _mixed_dot(x_XI, w_IO), (x_XI, w_IO)


def _mixed_bwd(residuals, dy_XO):
  x_XI, w_IO = residuals
  dy_XO = dy_XO.astype(x_XI.dtype)
  dx_XI = jnp.einsum('XO,IO->XI', dy_XO, w_IO, preferred_element_type=jnp.float32)
  dw_IO = jnp.einsum('XI,XO->IO', x_XI, dy_XO, preferred_element_type=jnp.float32)
  return dx_XI.astype(x_XI.dtype), dw_IO.astype(w_IO.dtype)


mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)

PRECISIONS = {
    'float32': (jnp.float32, lambda x, w: x @ w),
    'bfloat16': (jnp.bfloat16, lambda x, w: x @ w),
    'mixed': (jnp.bfloat16, mixed_matmul),
}


def forward_backward(matmul, dtype):
  """``sum(y * dy)`` and its gradients w.r.t. x and w: the forward matmul (its value is
  returned, so XLA cannot drop it) and the two backward ones."""
  def loss(x_XI, w_IO, dy_XO):
    return jnp.sum(matmul(x_XI.astype(dtype), w_IO.astype(dtype)).astype(jnp.float32) * dy_XO)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


LAYOUTS = {'MK,KN': ('MK,KN->MN', 'MK', 'KN'), 'MK,NK': ('MK,NK->MN', 'MK', 'NK'),
           'KM,KN': ('KM,KN->MN', 'KM', 'KN')}
LAYOUT_SHAPES = {  # name: (M, K, N)
    'logits 4096x256x8192': (4096, 256, 8192),
    'logits input grad 4096x8192x256': (4096, 8192, 256),
    'expert up 4096x256x512': (4096, 256, 512),
    'expert up weight grad 256x4096x512': (256, 4096, 512),
}


def layout_table(args, rng) -> dict:
  """GFLOP/s of one matmul by operand layout: float32, and bfloat16 in / float32 out."""
  rows, figures = [], {}
  for name, (M, K, N) in LAYOUT_SHAPES.items():
    size = dict(M=M, K=K, N=N)
    cells = {}
    for layout, (spec, a_axes, b_axes) in LAYOUTS.items():
      for dtype in (jnp.float32, jnp.bfloat16):
        a, b = (jnp.asarray(rng.normal(size=[size[i] for i in axes]), dtype)
                for axes in (a_axes, b_axes))
        matmul = jax.jit(lambda a, b, spec=spec: jnp.einsum(
            spec, a, b, preferred_element_type=jnp.float32))
        seconds = common.time_fn(matmul, a, b, warmup=args.warmup, repeats=args.repeats)['min_s']
        cells[f'{layout} {jnp.dtype(dtype).name}'] = 2 * M * K * N / seconds / 1e9
    figures[name] = cells
    rows.append([name] + [f'{gflops:.0f}' for gflops in cells.values()])
  print('\none matmul by operand layout: GFLOP/s, best of', args.repeats,
        '(bfloat16 = bfloat16 in, float32 out)')
  common.print_table(['shape (M x K x N)', *next(iter(figures.values()))], rows)
  return figures


def main():
  parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
  args = parser.parse_args()
  print(common.describe(common.environment()))
  rng = np.random.default_rng(0)
  rows, figures = [], {'environment': common.environment(), 'shapes': {}}
  for name, (X, I, O) in SHAPES.items():
    x, w, dy = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                for shape in ((X, I), (I, O), (X, O)))
    flops = 3 * 2 * X * I * O
    timed = {precision: common.time_fn(forward_backward(matmul, dtype), x, w, dy,
                                       warmup=args.warmup, repeats=args.repeats)['min_s']
             for precision, (dtype, matmul) in PRECISIONS.items()}
    figures['shapes'][name] = {p: {'ms': 1e3 * s, 'gflops': flops / s / 1e9} for p, s in timed.items()}
    rows.append([name] + [f'{1e3 * timed[p]:.2f} ({flops / timed[p] / 1e9:.0f})' for p in PRECISIONS]
                + [f'{timed["float32"] / timed[p]:.2f}' for p in ('bfloat16', 'mixed')])
  print('\nforward + backward of one matmul: ms (GFLOP/s), best of', args.repeats)
  common.print_table(['shape', *PRECISIONS, 'bfloat16 speedup', 'mixed speedup'], rows)
  figures['layouts'] = layout_table(args, rng)
  common.write_json(args.json, figures)


if __name__ == '__main__':
  main()
