"""Training throughput of gemini_mini against MaxText and transformers, measured in one run.

One run, strictly one system at a time (never concurrently):

  1. the machine's matmul peak (``bench/matmul_peak.py``): XLA float32 and XLA bfloat16 inputs
     with float32 accumulation, 4096^2, the denominators of every MFU below (measured first and
     again last; the best of the two is used);
  2. gemini_mini: the real jitted train step (``train/step.py``: ``abstract_train_state``,
     ``init_train_state``, ``make_train_step``, ``jit_steps``; AdamW with clipping, the loss with
     the load-balance (0.01) and router z (0.001) losses on) on the config's shape, fed
     synthetic batches of uniformly random token ids (text only, one document per row, a new
     batch every step); ``--warmup`` untimed steps (the first compiles), then ``--steps`` timed
     ones, each waited for;
  3. the peers, each in its own venv through a subprocess (``bench/peers/``), on the same shape,
     the same kind of batches and the same step counts: MaxText 0.2.5 (``run_maxtext.sh``; one
     run per ``--maxtext-dtype`` x ``--maxtext-moe``) and transformers MixtralForCausalLM with
     torch AdamW (``hf_train_bench.py``). A peer whose venv is missing is skipped with a message
     naming its setup script.

Tokens/s is the median over the timed steps (each system's own timer around its step). MFU =
tokens/s x FLOPs per token / the matmul peak of the system's compute dtype, with one FLOP count
for every system: gemini_mini's PaLM count (``metrics.train_flops_per_token``), valid for a peer
only when its own parameter counts (printed by its script) give the same matmul parameters per
token; the table of counts is printed and a mismatch is flagged.

  python bench/train_throughput.py [--steps 20] [--warmup 3] [--peers maxtext,hf]
      [--config configs/nano.yaml] [model.d_model=512 ...] [--dtype float32|bfloat16]
      [--maxtext-dtype same,bfloat16] [--maxtext-moe dense] [--hf-python PYTHON] [--json FILE]

On a GPU the transformers peer runs on the GPU too (``--device cuda``), and the numpy peak is
not measured.

At the nano shape on a quiet 2-core machine the default run takes about 8 minutes (peak ~15 s,
gemini_mini ~1 min, MaxText ~2.5 min per variant, transformers ~1 min).
"""

import argparse
import os
import pathlib
import statistics
import time

import jax
import numpy as np
from flax import nnx

try:
  from bench import common, matmul_peak
except ImportError:  # run as a script: python bench/train_throughput.py
  import common
  import matmul_peak
from gemini_mini import config as config_lib
from gemini_mini import parallel
from gemini_mini.batch import Batch, Modality
from gemini_mini.model import Decoder
from gemini_mini.param_count import count_params
from gemini_mini.train import metrics as metrics_lib
from gemini_mini.train.loss import LossWeights
from gemini_mini.train.optimizer import learning_rate_schedule, make_optimizer
from gemini_mini.train.step import (
  abstract_train_state,
  init_train_state,
  jit_steps,
  make_eval_step,
  make_train_step,
)

# The peers' shared shape (shared/peers/README.md): batch 8 x 512 whatever nano trains with,
# and an output head of its own as the peers have (nano ties it); later overrides win.
SHARED_SHAPE = ['train.batch_size=8', 'train.seq_len=512', 'data.num_patches=64',
                'data.num_audio_frames=64', 'model.attention_kernel=dense',
                'model.tie_embeddings=false']
REPO = pathlib.Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / 'bench' / 'peers'
PEER_SETUP = {'maxtext': 'bench/peers/setup_maxtext.sh', 'hf': 'bench/peers/setup_hf.sh'}
PEER_VENV = {'maxtext': PEERS_DIR / '.venv-maxtext', 'hf': PEERS_DIR / '.venv-hf'}


def synthetic_batches(count: int, batch_size: int, seq_len: int, model,
                      seed: int = 0) -> list[Batch]:
  """``count`` text-only batches of uniformly random ids: one document per row, targets the
  next ids, every position in the loss; one (zero) patch and audio frame per row, unused."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    ids = rng.integers(0, model.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    shape = (batch_size, seq_len)
    batches.append(Batch(
        tokens=ids[:, :-1], modality=np.full(shape, Modality.TEXT, np.int8),
        segment_ids=np.ones(shape, np.int32),
        positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
        targets=ids[:, 1:], loss_mask=np.ones(shape, np.float32),
        patches=np.zeros((batch_size, 1, model.patch_dim), np.float32),
        audio=np.zeros((batch_size, 1, model.audio_dim), np.float32)))
  return batches


def measure_gemini_mini(config: config_lib.Config, steps: int, warmup: int) -> dict:
  """The real train step, as ``train/loop.py`` builds and runs it."""
  t, m = config.train, config.model
  mesh = parallel.make_mesh(config.mesh)
  optimizer = make_optimizer(learning_rate=t.learning_rate, steps=t.steps,
                             warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                             grad_clip=t.grad_clip)
  schedule = learning_rate_schedule(t.learning_rate, t.steps, t.warmup_steps)
  weights = LossWeights(t.load_balance_weight, t.router_z_weight, t.logit_z_weight)
  graphdef, shardings, _ = abstract_train_state(m, optimizer, mesh, t.seed)
  state = init_train_state(m, optimizer, shardings, t.seed)
  train_step, _ = jit_steps(make_train_step(graphdef, optimizer, schedule, weights,
                                            t.grad_accum_steps),
                            make_eval_step(graphdef, weights), shardings, mesh)
  warmup = max(warmup, 1)  # the first step compiles
  batches = synthetic_batches(warmup + steps, t.batch_size, t.seq_len, m, seed=t.seed)
  times, losses, dropped, balance = [], [], [], []
  for i, host_batch in enumerate(batches):
    start = time.perf_counter()
    batch = parallel.host_local_to_global(host_batch, mesh)
    with jax.set_mesh(mesh):
      state, step_metrics = train_step(state, batch)
    jax.block_until_ready((state, step_metrics))
    seconds = time.perf_counter() - start
    losses.append(float(step_metrics['loss']))
    dropped_L = np.asarray(step_metrics['dropped_L'])
    dropped.append(float(dropped_L.mean()) if dropped_L.size else 0.0)
    balance.append(float(step_metrics['load_balance']))
    tag = 'compile' if i == 0 else 'warmup' if i < warmup else 'timed'
    print(f'  gemini_mini step {i:3d} {tag:7s} loss {losses[-1]:.4f} time {1e3 * seconds:8.1f} ms '
          f'tok/s {t.batch_size * t.seq_len / seconds:8.1f}', flush=True)
    if i == 0:
      compile_s = seconds
    elif i >= warmup:
      times.append(seconds)
  tokens = t.batch_size * t.seq_len
  median = statistics.median(times)
  return {'system': f'gemini_mini (jax {jax.__version__}, flax nnx)',
          'tokens_per_s': tokens / median, 'mean_tokens_per_s': tokens * len(times) / sum(times),
          'median_step_s': median, 'min_step_s': min(times), 'steps': len(times),
          'warmup': warmup, 'first_step_s': compile_s, 'dtype': m.dtype,
          'moe_dispatch': m.moe_dispatch,
          'capacity_factor': m.capacity_factor if m.moe_dispatch == 'capacity' else None,
          'dropped_fraction': float(np.mean(dropped)),
          'load_balance': float(np.mean(balance)), 'loss_first': losses[0],
          'loss_last': losses[-1], 'aux_losses': {'load_balance': t.load_balance_weight,
                                                  'router_z': t.router_z_weight}}


def gemini_mini_counts(model) -> dict:
  """Parameter counts as the peers print them: without the image/audio encoders (the peers
  have none), which are returned apart as ``params_encoders``."""
  counts = count_params(model)
  decoder = nnx.eval_shape(lambda: Decoder(model, rngs=nnx.Rngs(0)))
  size = lambda module: sum(int(np.prod(x.shape)) for x in
                            jax.tree.leaves(nnx.state(module, nnx.Param)))
  encoders = size(decoder.image) + size(decoder.audio)
  embed = model.vocab_size * model.d_model
  return {'params_total': counts['total'] - encoders,
          'params_active_per_token': counts['active'] - encoders,
          'params_encoders': encoders, 'params_embedding': embed,
          'matmul_params_per_token': metrics_lib.matmul_params_per_token(model)}


def peer_shape_problem(m) -> str | None:
  """Why the peers cannot build this shape (they are Mixtral-style: MoE in every layer)."""
  if not m.num_experts or m.moe_every != 1:
    return 'the peers run a Mixtral-style MoE in every layer (model.num_experts > 0, moe_every 1)'
  if m.shared_expert or m.attention_window:
    return 'the peers have no shared expert and no local attention window'
  return None


def maxtext_runs(config, args) -> list[dict]:
  m, t = config.model, config.train
  if not (PEER_VENV['maxtext'] / 'bin' / 'python').exists():
    print(f'\n== maxtext: skipped: venv missing, run {PEER_SETUP["maxtext"]}')
    return [{'name': 'maxtext', 'skipped': f'venv missing, run {PEER_SETUP["maxtext"]}'}]
  dtypes = []
  for d in args.maxtext_dtype.split(','):
    d = m.dtype if d.strip() == 'same' else d.strip()
    if d not in dtypes:
      dtypes.append(d)
  # MaxText's first two steps print misleadingly fast times: never time them.
  warmup = max(args.warmup, 3)
  results = []
  for dtype in dtypes:
    for moe in args.maxtext_moe.split(','):
      env = {'EMB': m.d_model, 'LAYERS': m.num_layers, 'EXPERTS': m.num_experts,
             'TOPK': m.experts_per_token, 'SEQ': t.seq_len, 'BATCH': t.batch_size, 'MLP': m.d_ff,
             'HEADS': m.num_heads, 'KV_HEADS': m.num_kv_heads, 'HEAD_DIM': m.head_dim,
             'VOCAB': m.vocab_size, 'STEPS': warmup + args.steps, 'MEDIAN_FROM': warmup,
             'DTYPE': dtype, 'MOE_IMPL': moe.strip(), 'CAPACITY': m.capacity_factor,
             'LB_WEIGHT': t.load_balance_weight}
      env = {k: str(v) for k, v in env.items()}
      result = common.run_peer_script(f'maxtext ({dtype}, {moe.strip()})',
                                      ['bash', str(PEERS_DIR / 'run_maxtext.sh')], env,
                                      args.peer_timeout, cwd=REPO)
      result.update(name='maxtext', variant=f'{dtype}, {moe.strip()}', dtype=dtype)
      results.append(result)
  return results


def hf_run(config, args) -> dict:
  m, t = config.model, config.train
  python = common.peer_python(args.hf_python)
  if not python:
    print(f'\n== hf: skipped: {args.hf_python} missing, run {PEER_SETUP["hf"]}')
    return {'name': 'hf', 'skipped': f'{args.hf_python} missing, run {PEER_SETUP["hf"]}'}
  dtype = m.dtype if args.hf_dtype == 'same' else args.hf_dtype
  command = [str(python), str(PEERS_DIR / 'hf_train_bench.py'),
             '--hidden', m.d_model, '--heads', m.num_heads, '--kv-heads', m.num_kv_heads,
             '--head-dim', m.head_dim, '--ffn', m.d_ff, '--layers', m.num_layers,
             '--experts', m.num_experts, '--topk', m.experts_per_token, '--vocab', m.vocab_size,
             '--seq', t.seq_len, '--batch', t.batch_size, '--warmup', max(args.warmup, 1),
             '--steps', args.steps, '--threads', os.cpu_count(), '--lr', t.learning_rate,
             '--aux-coef', t.load_balance_weight, '--dtype', dtype,
             '--device', common.torch_device()]
  result = common.run_peer_script(f'hf ({dtype})', [str(c) for c in command],
                                  timeout=args.peer_timeout, cwd=REPO)
  result.update(name='hf', variant=f'{dtype}, grouped_mm (dropless)', dtype=dtype)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('overrides', nargs='*', help='config overrides, e.g. model.d_model=512')
  parser.add_argument('--config', default=str(REPO / 'configs' / 'nano.yaml'))
  parser.add_argument('--steps', type=int, default=20, help='timed steps per system')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps first (>= 1; MaxText always >= 3)')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'],
                      help="gemini_mini's compute dtype (model.dtype; default: the config's)")
  parser.add_argument('--peers', default='maxtext,hf',
                      help="comma list of maxtext, hf; '' for none")
  parser.add_argument('--maxtext-dtype', default='same,bfloat16',
                      help="MaxText compute dtypes, one run each: 'same' (as gemini_mini), "
                           "float32, bfloat16 (MaxText's default and its fastest on CPU)")
  parser.add_argument('--maxtext-moe', default='dense',
                      help='MaxText MoE implementations (run_maxtext.sh MOE_IMPL), one run each: '
                           'dense (capacity factor = model.capacity_factor, drops tokens; its '
                           'fastest on CPU), dense_nodrop, ragged_dot, ...')
  parser.add_argument('--hf-dtype', default='same', choices=['same', 'float32', 'bfloat16'],
                      help='transformers compute dtype (bfloat16 = torch.autocast)')
  parser.add_argument('--hf-python', default=str(PEER_VENV['hf'] / 'bin' / 'python'),
                      help='the python that has torch and transformers: a path or a command on '
                           'PATH (on a GPU the peer runs on the GPU too)')
  parser.add_argument('--peak-size', type=int, default=4096)
  parser.add_argument('--peak-reps', type=int, default=5)
  parser.add_argument('--peer-timeout', type=float, default=None, help='seconds per peer run')
  parser.add_argument('--json', metavar='FILE', help='also write the figures to this JSON file')
  args = parser.parse_args()

  overrides = (SHARED_SHAPE + list(args.overrides)
               + ([f'model.dtype={args.dtype}'] if args.dtype else []))
  try:
    config = config_lib.load(args.config, overrides)
  except config_lib.ConfigError as error:
    parser.error(str(error))
  m, t = config.model, config.train
  peers = [p.strip() for p in args.peers.split(',') if p.strip() and p.strip() != 'none']
  unknown = set(peers) - set(PEER_SETUP)
  if unknown:
    parser.error(f'unknown peers {sorted(unknown)}; choose from {sorted(PEER_SETUP)}')
  problem = peer_shape_problem(m)
  if peers and problem:
    print(f'peers skipped: {problem}')
    peers = []

  flops_per_token = metrics_lib.train_flops_per_token(m, t.seq_len)
  print(f'shape: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads / '
        f'{m.num_kv_heads} kv heads, head_dim {m.head_dim}, {m.num_experts} experts top-'
        f'{m.experts_per_token}, d_ff {m.d_ff}, vocab {m.vocab_size}, batch {t.batch_size} x '
        f'{t.seq_len}; gemini_mini dtype {m.dtype}, dispatch {m.moe_dispatch}')
  print(common.describe(common.environment()))

  print('\n== matmul peak', flush=True)
  peaks = matmul_peak.measure_peaks(args.peak_size, args.peak_reps)
  print(matmul_peak.describe_peaks(peaks))

  print(f'\n== gemini_mini ({m.dtype}, {m.moe_dispatch}): {args.warmup} warm-up + '
        f'{args.steps} timed steps', flush=True)
  ours = measure_gemini_mini(config, args.steps, args.warmup)
  ours.update(name='gemini_mini', variant=f'{m.dtype}, {m.moe_dispatch}',
              **gemini_mini_counts(m), palm_train_flops_per_token=flops_per_token)

  results = [ours]
  for peer in peers:
    if peer == 'maxtext':
      results.extend(maxtext_runs(config, args))
    elif peer == 'hf':
      results.append(hf_run(config, args))

  # Measured again at the end; the peak is the best of both (a busy moment only lowers one).
  print('\n== matmul peak, again', flush=True)
  peaks_end = matmul_peak.measure_peaks(args.peak_size, args.peak_reps)
  print(matmul_peak.describe_peaks(peaks_end))
  peaks_start = peaks
  peaks = {key: max(value, peaks_end[key]) if key in matmul_peak.PEAK_KEY.values() or
           key == 'numpy_float32' else value for key, value in peaks_start.items()}
  print('peak used: ' + matmul_peak.describe_peaks(peaks).removeprefix('matmul peak '))

  # FLOPs per token: one count for all, checked against each peer's own parameter counts.
  print('\n== FLOPs per token: parameter counts as each system prints them')
  print('   (matmul params/token = active per token - input embedding - norm scales; PaLM train '
        'FLOPs/token = 6 x that + 12 x layers x heads x head_dim x seq, full context)')
  rows, seen = [], set()
  for r in results:
    if 'tokens_per_s' not in r or r['name'] in seen:
      continue
    seen.add(r['name'])
    own = {'gemini_mini': r.get('palm_train_flops_per_token'),
           'maxtext': r.get('maxtext_train_flops_per_token'),
           'hf': r.get('hf_approx_train_flops_per_token')}[r['name']]
    attention = 12 * m.num_layers * m.num_heads * m.head_dim * t.seq_len
    palm = 6 * r['matmul_params_per_token'] + attention
    r['flops_match'] = r['matmul_params_per_token'] == ours['matmul_params_per_token']
    rows.append([r['name'], f"{r['params_total']:,}", f"{r['params_active_per_token']:,}",
                 f"{r['matmul_params_per_token']:,}", f'{palm:,.0f}',
                 f'{own:,.0f}' if own else '-', 'yes' if r['flops_match'] else 'NO'])
  common.print_table(['system', 'params total', 'active/token', 'matmul params/token',
                      'PaLM FLOPs/token', "system's own count", 'same as ours'], rows)
  print(f'   gemini_mini also has {ours["params_encoders"]:,} parameters in its image/audio '
        'encoders (not in the counts above; a text batch runs them on one zero item per row, and '
        'AdamW updates them).\n'
        "   MaxText's own count halves causal attention; transformers' adds the norm scales. "
        'Every MFU below uses the PaLM count.')
  for r in results:
    if 'tokens_per_s' in r and not r.get('flops_match', True):
      print(f'   WARNING: {r["name"]} has {r["matmul_params_per_token"]:,} matmul params/token, '
            f'ours {ours["matmul_params_per_token"]:,}: its MFU and ratio compare unequal work')

  print(f'\n== training throughput: median over {args.steps} timed steps, batch {t.batch_size} x '
        f'{t.seq_len}; MFU = tokens/s x {flops_per_token:,.0f} FLOPs / the matmul peak of the '
        'dtype')
  table, notes = [], []
  for r in results:
    label = f"{r['name']} ({r.get('variant', '')})"
    if 'tokens_per_s' not in r:
      table.append([label if r.get('variant') else r['name'],
                    'skipped' if r.get('skipped') else 'FAILED', '-', '-', '-', '-'])
      notes.append(f"{r['name']}: " + (
          f"skipped: {r['skipped']}" if r.get('skipped') else
          f"FAILED ({r.get('failed')}): " + ' / '.join(r.get('tail', [])[-3:])))
      continue
    peak = matmul_peak.peak_for_dtype(peaks, r['dtype'])
    r['peak_gflop_per_s'] = peak
    r['mfu'] = r['tokens_per_s'] * flops_per_token / (peak * 1e9)
    r['gemini_mini_over_peer'] = ours['tokens_per_s'] / r['tokens_per_s']
    table.append([label, f"{r['tokens_per_s']:,.1f}", f"{r['mean_tokens_per_s']:,.1f}",
                  f"{r['gemini_mini_over_peer']:.2f}", f"{r['mfu']:.3f}", f'{peak:.0f}'])
  common.print_table(['system', 'tokens/s', 'mean', 'gemini_mini / it', 'MFU', 'peak GFLOP/s'],
                     table)
  for note in notes:
    print(f'   {note}')
  print(f"   gemini_mini: dropped {ours['dropped_fraction']:.2%} of routed slots, load balance "
        f"{ours['load_balance']:.3f} (1.0 = uniform), loss {ours['loss_first']:.3f} -> "
        f"{ours['loss_last']:.3f}; first step (compile) {ours['first_step_s']:.1f} s")
  for r in results:
    if r['name'] == 'maxtext' and 'tokens_per_s' in r and r.get('moe_impl') == 'dense':
      print(f"   maxtext ({r['variant']}): capacity factor {r['capacity_factor']} drops routed "
            'tokens (dropless: --maxtext-moe dense_nodrop); load-balance loss weight '
            f"{r.get('load_balance_loss_weight')}")
  common.write_json(args.json, {
      'benchmark': 'train_throughput', 'config': {**vars(args), 'model': vars(m),
                                                  'train': vars(t)},
      'environment': common.environment(), 'peaks_gflop_per_s': peaks,
      'peaks_start_gflop_per_s': peaks_start, 'peaks_end_gflop_per_s': peaks_end,
      'flops_per_token': flops_per_token, 'results': results})


if __name__ == '__main__':
  main()
