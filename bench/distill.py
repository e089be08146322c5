"""What the teacher costs a distillation step, measured in one run: the ground for running it
in the step rather than caching its top-k logits offline (docs/nano.md#the-teacher-in-the-step).

On the same real mixture batch (``train.seq_len`` x ``train.batch_size`` of the config), each
waited for, ``--warmup`` untimed calls first (the first compiles):

  1. the student's train step without a teacher (``train.stage: pretrain``);
  2. the distill train step, the teacher's forward pass inside it (``train.stage: distill``);
  3. the teacher's forward pass alone (its logits), as an offline caching pass would run it;
  4. ``jax.lax.top_k`` of those logits, which a cache would store.

A cache of the top ``--top-k`` logits holds ``k * (4 + 4)`` bytes a token (float32 values,
int32 ids); for the whole run that is ``steps * batch * seq_len`` tokens. Reading it back
replaces step 3 in every step, but writing it costs the same teacher passes once, so it pays
only when more than one student (or epoch) reads the same cached tokens.

  python bench/distill.py [--config configs/nano_student.yaml] [--steps 5] [--warmup 2]
      [--top-k 64] [--json FILE] [section.field=value ...]

Needs the teacher run (``train.teacher``) and the prepared data. About 3 minutes at the
nano_student shape on a quiet 2-core machine.
"""

import argparse
import statistics
import time

import jax
from flax import nnx

try:
  from bench import common
except ImportError:  # run as a script: python bench/distill.py
  import common
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.train import loop


def time_steps(stage, state, batch, steps: int, warmup: int):
  """Median seconds of ``stage.train_step`` (which donates its state) over ``steps`` calls."""
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = stage.train_step(state, batch, *stage.teacher_args())
    jax.block_until_ready(metrics['loss'])
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times), state


def main():
  parser = common.add_common_flags(argparse.ArgumentParser(description=__doc__.split('\n')[0]))
  parser.add_argument('overrides', nargs='*', help='config overrides')
  parser.add_argument('--config', default='configs/nano_student.yaml')
  parser.add_argument('--steps', type=int, default=5, help='timed train steps per variant')
  parser.add_argument('--top-k', type=int, default=64, help='logits a cache would keep a token')
  args = parser.parse_args()
  config = config_lib.load(args.config, args.overrides)
  mesh = parallel.make_mesh(config.mesh)
  distill = loop.make_stage(config, mesh)
  scratch = loop.make_stage(config_lib.from_dict(
      {**config.to_dict(), 'train': {**config.to_dict()['train'], 'stage': 'pretrain',
                                     'teacher': ''}}), mesh)
  batch = parallel.host_local_to_global(next(loop.make_data(config, 'train')), mesh)
  teacher = distill.teacher
  with jax.set_mesh(mesh):
    scratch_s, _ = time_steps(scratch, scratch.init_state(), batch, args.steps, args.warmup)
    distill_s, _ = time_steps(distill, distill.init_state(), batch, args.steps, args.warmup)
    forward = jax.jit(lambda params, batch: nnx.merge(teacher.graphdef, params)(batch)[0])
    forward_s = common.time_fn(forward, teacher.params, batch, warmup=args.warmup,
                               repeats=args.repeats)['median_s']
    logits = forward(teacher.params, batch)
    top_k = jax.jit(lambda logits: jax.lax.top_k(logits, args.top_k))
    top_k_s = common.time_fn(top_k, logits, warmup=args.warmup, repeats=args.repeats)['median_s']
  t = config.train
  tokens_per_step = t.batch_size * t.seq_len
  figures = {
      'environment': common.environment(), 'config': args.config, 'overrides': args.overrides,
      'student_step_s': scratch_s, 'distill_step_s': distill_s, 'teacher_forward_s': forward_s,
      'top_k_s': top_k_s, 'distill_over_student': distill_s / scratch_s,
      'teacher_share_of_distill_step': forward_s / distill_s,
      'cache_bytes_per_token': args.top_k * 8,
      'cache_bytes_per_run': args.top_k * 8 * tokens_per_step * t.steps,
  }
  common.print_table(['measure', 'value'], [
      ['student step (no teacher)', f'{scratch_s:.3f} s'],
      ['distill step (teacher in the step)', f'{distill_s:.3f} s'],
      ['  ratio', f'{distill_s / scratch_s:.2f}x'],
      ['teacher forward alone', f'{forward_s:.3f} s ({forward_s / distill_s:.0%} of a distill step)'],
      [f'top-{args.top_k} of its logits', f'{top_k_s:.3f} s'],
      [f'a top-{args.top_k} cache', f'{common.format_bytes(args.top_k * 8 * tokens_per_step * t.steps)}'
       f' for {t.steps} steps']])
  common.write_json(args.json, figures)


if __name__ == '__main__':
  main()
