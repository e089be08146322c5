"""Steps until a model learns to copy a repeated span: when does its induction circuit form?

Trains ``Decoder`` (the config's shape, nano by default) with the package's own train step on
rows packed with ``<bos>`` span span ``<eos>`` examples: a span of ``--span-min`` to
``--span-max`` pieces drawn from the ``--pool`` most frequent ordinary pieces (0: the whole
vocabulary). The second copy is predictable only by looking back, so its loss falls from
``ln(pool)`` to near 0 once an induction circuit forms (Olsson et al. 2022). With
``--copy-loss-only`` the loss (and the printed figure) covers the second copy alone.

Prints the loss every ``--every`` steps and the first step where it falls below
``--threshold`` nats (or that it never did). What decides whether the circuit forms, and the
runs behind it: docs/retrieval.md#the-copy-circuit.

  python bench/induction.py [--pool 64 --span-min 8 --span-max 32 --batch 16 --seq-len 256
                             --steps 300 --lr 3e-3 --warmup 50 --copy-loss-only]
                            [--config configs/nano.yaml] [model.tie_embeddings=false ...]
"""

import argparse
import math
import time

import jax
import numpy as np

from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.data import repeat
from gemini_mini.modalities import interleave
from gemini_mini.modalities.segments import Segment
from gemini_mini.modalities.text import Tokenizer
from gemini_mini.train.loss import LossWeights
from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
from gemini_mini.train.step import abstract_train_state, init_train_state, make_train_step


def copy_batch(rng, pool_ids, args, tokenizer, model):
  """One packed batch of repeated spans; with ``copy_loss_only`` only the second copy after
  its first piece is in the loss (the tokens an induction head can predict)."""
  examples, total = [], 0
  while total < args.batch * args.seq_len * 1.2:
    span = rng.choice(pool_ids, int(rng.integers(args.span_min, args.span_max + 1)))
    segments = repeat.span_twice(np.array([tokenizer.bos_id]), span, tokenizer.eos_id)
    if not args.copy_loss_only:
      segments = [Segment.text(segment.data) for segment in segments]
    example = interleave.flatten(segments, tokenizer)
    examples.append(example)
    total += len(example.tokens)
  batch, _ = interleave.pack_examples(
      examples, batch_size=args.batch, seq_len=args.seq_len, num_patches=1,
      num_audio_frames=1, patch_dim=model.patch_dim, audio_dim=model.audio_dim)
  return batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('overrides', nargs='*', help='config overrides, section.field=value')
  parser.add_argument('--config', default='configs/nano.yaml')
  parser.add_argument('--pool', type=int, default=64, help='most frequent pieces; 0 = all')
  parser.add_argument('--span-min', type=int, default=8)
  parser.add_argument('--span-max', type=int, default=32)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--seq-len', type=int, default=256)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--lr', type=float, default=3e-3)
  parser.add_argument('--warmup', type=int, default=50)
  parser.add_argument('--copy-loss-only', action='store_true')
  parser.add_argument('--every', type=int, default=20)
  parser.add_argument('--threshold', type=float, default=1.0, help='nats')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  if not 2 <= args.span_min <= args.span_max or 2 * args.span_max + 2 > args.seq_len:
    parser.error(f'spans of {args.span_min}-{args.span_max} pieces must be >= 2 and fit twice '
                 f'in --seq-len {args.seq_len}')
  try:
    config = config_lib.load(args.config, ['model.attention_kernel=dense', *args.overrides])
  except config_lib.ConfigError as error:
    parser.error(str(error))

  tokenizer = Tokenizer()
  pool_ids = tokenizer.ordinary_ids[:args.pool] if args.pool else tokenizer.ordinary_ids
  optimizer = make_optimizer(learning_rate=args.lr, steps=args.steps, warmup_steps=args.warmup,
                             weight_decay=0.1, grad_clip=1.0)
  mesh = parallel.make_mesh(config_lib.MeshConfig(), jax.local_devices())
  graphdef, shardings, _ = abstract_train_state(config.model, optimizer, mesh, args.seed)
  state = init_train_state(config.model, optimizer, shardings, args.seed)
  schedule = learning_rate_schedule(args.lr, args.steps, args.warmup)
  train_step = jax.jit(make_train_step(graphdef, optimizer, schedule, LossWeights(), 1))
  print(f'pool {len(pool_ids)} pieces (uniform: {math.log(len(pool_ids)):.2f} nats), spans '
        f'{args.span_min}-{args.span_max}, batch {args.batch} x {args.seq_len}, lr {args.lr}, '
        f'warm-up {args.warmup}, loss on {"the second copy" if args.copy_loss_only else "all"}')
  rng, formed, start = np.random.default_rng(args.seed), None, time.perf_counter()
  for step in range(1, args.steps + 1):
    state, metrics = train_step(state, copy_batch(rng, pool_ids, args, tokenizer, config.model))
    loss = float(metrics['cross_entropy'])
    if formed is None and loss < args.threshold:
      formed = step
    if step % args.every == 0 or step == args.steps:
      print(f'step {step:5d}  loss {loss:.3f}  ({time.perf_counter() - start:.0f} s)', flush=True)
  print(f'loss below {args.threshold} nats first at step {formed}' if formed
        else f'loss never fell below {args.threshold} nats in {args.steps} steps')


if __name__ == '__main__':
  main()
