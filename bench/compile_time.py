"""Compile time of the train step against depth, with and without ``model.scan_layers``.

For each depth and mode the real train step (``train.step.make_train_step`` + ``jit_steps``:
loss, gradients, clipping, AdamW, shardings, donation) is traced and lowered
(``jax.jit(...).lower``) and compiled (``.compile()``) from the abstract train state
(``abstract_train_state``, shapes only: no parameter is allocated) and an abstract batch.
Unscanned, the program holds every block; scanned, one group of ``moe_every`` blocks inside an
``nnx.scan``, so its size should not grow with depth.

Width defaults to the preset's (pro: d_model 1024, 16 experts, seq_len 4096); ``--small``
uses the nano width (d_model 256, 8 experts, seq_len 512), which compiles in seconds on CPU.
Compile times depend on the backend and on what else runs on the machine: read them as
indicative, and compare modes measured in the same run.

  python bench/compile_time.py [--preset pro] [--depths 2 4 8 16 32] [--small]
                               [--modes unscanned scanned] [--remat] [--json FILE]
"""

import argparse
import dataclasses
import gc
import time

import jax
import jax.numpy as jnp

try:
  from bench import common
except ImportError:  # run as a script: python bench/compile_time.py
  import common
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.batch import Batch
from gemini_mini.train.loss import LossWeights
from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
from gemini_mini.train.step import abstract_train_state, jit_steps, make_eval_step, make_train_step

MODES = {'unscanned': False, 'scanned': True}
SMALL_MODEL = dict(vocab_size=8192, d_model=256, num_heads=4, head_dim=64, d_ff=512,
                   num_experts=8, attention_chunk=256)
SMALL_DATA = dict(seq_len=512, num_patches=64, num_audio_frames=64)


def model_config(args, depth: int, scan: bool) -> config_lib.ModelConfig:
  config = config_lib.load(f'configs/{args.preset}.yaml').model
  overrides = dict(SMALL_MODEL) if args.small else {}
  return dataclasses.replace(config, **overrides, num_layers=depth, scan_layers=scan,
                             remat=args.remat or config.remat)


def abstract_batch(args, m: config_lib.ModelConfig, mesh) -> Batch:
  config = config_lib.load(f'configs/{args.preset}.yaml')
  seq_len = SMALL_DATA['seq_len'] if args.small else config.train.seq_len
  patches = SMALL_DATA['num_patches'] if args.small else config.data.num_patches
  audio = SMALL_DATA['num_audio_frames'] if args.small else config.data.num_audio_frames
  b, sharding = args.batch, parallel.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return Batch(tokens=spec((b, seq_len), jnp.int32), modality=spec((b, seq_len), jnp.int8),
               segment_ids=spec((b, seq_len), jnp.int32),
               positions=spec((b, seq_len), jnp.int32), targets=spec((b, seq_len), jnp.int32),
               loss_mask=spec((b, seq_len), jnp.float32),
               patches=spec((b, patches, m.patch_dim), jnp.float32),
               audio=spec((b, audio, m.audio_dim), jnp.float32))


def measure(args, depth: int, scan: bool) -> dict:
  """Seconds to build the abstract state, to trace + lower, and to compile the train step."""
  m = model_config(args, depth, scan)
  mesh = parallel.make_mesh(config_lib.MeshConfig(data=1), jax.devices()[:1])
  optimizer = make_optimizer(learning_rate=1e-3, steps=1000, warmup_steps=10, weight_decay=0.1,
                             grad_clip=1.0)
  start = time.perf_counter()
  graphdef, shardings, abstract = abstract_train_state(m, optimizer, mesh, seed=0)
  setup_s = time.perf_counter() - start
  weights = LossWeights()
  train_step, _ = jit_steps(
      make_train_step(graphdef, optimizer, learning_rate_schedule(1e-3, 1000, 10), weights,
                      args.grad_accum),
      make_eval_step(graphdef, weights), shardings, mesh)
  batch = abstract_batch(args, m, mesh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    lowered = train_step.lower(abstract, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
  hlo_kib = len(compiled.as_text()) / 1024
  params = sum(x.size for x in jax.tree.leaves(abstract.params))
  del lowered, compiled
  gc.collect()
  return {'depth': depth, 'scan_layers': scan, 'params': int(params), 'setup_s': setup_s,
          'lower_s': lower_s, 'compile_s': compile_s, 'total_s': lower_s + compile_s,
          'hlo_kib': hlo_kib}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='pro', help='configs/<preset>.yaml (default pro)')
  parser.add_argument('--depths', type=int, nargs='+', default=[2, 4, 8, 16, 32])
  parser.add_argument('--modes', nargs='+', choices=list(MODES), default=list(MODES))
  parser.add_argument('--small', action='store_true',
                      help='nano width and seq_len 512 instead of the preset\'s')
  parser.add_argument('--batch', type=int, default=1, help='rows of the abstract batch')
  parser.add_argument('--grad-accum', type=int, default=1, help='micro-batches per step')
  parser.add_argument('--remat', action='store_true', help='model.remat=true')
  parser.add_argument('--json', metavar='FILE', help='also write the figures to this JSON file')
  args = parser.parse_args(argv)

  rows = []
  for depth in args.depths:
    for mode in args.modes:
      result = measure(args, depth, MODES[mode])
      rows.append({'mode': mode, **result})
      print(f'depth {depth:>3} {mode:<9}: lower {result["lower_s"]:6.1f} s, compile '
            f'{result["compile_s"]:6.1f} s, HLO {result["hlo_kib"]:,.0f} KiB', flush=True)

  by = {(r['depth'], r['mode']): r for r in rows}
  first = args.depths[0]
  headers = ['depth']
  for mode in args.modes:
    headers += [f'{mode} lower s', f'{mode} compile s', f'{mode} x{first}']
  if len(args.modes) == 2:
    headers += ['unscanned / scanned']
  table = []
  for depth in args.depths:
    row = [depth]
    for mode in args.modes:
      r = by[depth, mode]
      row += [f'{r["lower_s"]:.1f}', f'{r["compile_s"]:.1f}',
              f'{r["total_s"] / by[first, mode]["total_s"]:.2f}']
    if len(args.modes) == 2:
      row.append(f'{by[depth, "unscanned"]["total_s"] / by[depth, "scanned"]["total_s"]:.2f}')
    table.append(row)
  print()
  print(f'train step compile time, preset {args.preset}{" (--small width)" if args.small else ""}, '
        f'batch {args.batch}, {common.describe(common.environment())}')
  print(f'(x{first}: lower + compile relative to depth {first}; last column: lower + compile)')
  common.print_table(headers, table)
  common.write_json(args.json, {'environment': common.environment(), 'preset': args.preset,
                                'small': args.small, 'batch': args.batch,
                                'grad_accum': args.grad_accum, 'remat': args.remat,
                                'rows': rows})


if __name__ == '__main__':
  main()
