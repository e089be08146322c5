#!/usr/bin/env bash
# MaxText peer: a tiny sparse-MoE (Mixtral-style) decoder pre-trained with MaxText 0.2.5 on the
# CPU, synthetic data (dataset_type=synthetic), no checkpointing, no TensorBoard. Our copy of
# shared/peers/maxtext_run.sh, run by bench/train_throughput.py (needs setup_maxtext.sh first):
#
#   bash bench/peers/run_maxtext.sh                     # the nano shape, 30 steps
#   STEPS=23 MEDIAN_FROM=3 DTYPE=float32 bash bench/peers/run_maxtext.sh
#
# Takes about 1 minute of set-up and compilation, then ~3-4 s a step at the nano shape on 2
# cores (about 2.5 minutes at the defaults).
# Changed from the shared copy: the venv is bench/peers/.venv-maxtext; the trainer is started
# through maxtext_train.py, which prints exact parameter counts and MaxText's own FLOP count
# (`maxtext_params {json}`); the router load-balance loss is on with weight LB_WEIGHT (0.01, as
# gemini_mini's and transformers'; MaxText's default is 0); a `peer_result {json}` line.
# Last line printed: `maxtext tokens_per_s <median Tokens/s/device over steps >= MEDIAN_FROM>`.
#
# Env knobs (defaults in brackets):
#   VENV [bench/peers/.venv-maxtext]   the venv made by setup_maxtext.sh
#   EMB [256] LAYERS [4] EXPERTS [8] TOPK [2] SEQ [512] BATCH [8] (per-device batch)
#   MLP [512] (expert FFN hidden dim, base_mlp_dim == base_moe_mlp_dim)
#   HEADS [4] KV_HEADS [1] HEAD_DIM [64] VOCAB [8192] STEPS [30] MEDIAN_FROM [10]
#     (MaxText numbers steps from 0; its first two steps print misleadingly fast times, so
#      MEDIAN_FROM should be >= 2)
#   LB_WEIGHT [0.01]  load_balance_loss_weight
#   MOE_IMPL [dense]:
#       dense        sparse_matmul=False, capacity_factor=$CAPACITY (token dropping, einsum dispatch)
#       dense_nodrop sparse_matmul=False, capacity_factor=-1 (dropless dense: every expert on every token)
#       ragged_dot   sparse_matmul=True megablox=False  -> jax.lax.ragged_dot (dropless); on CPU JAX lowers it
#                    to a masked dense dot over all experts for each of tokens*topk rows (~5x slower than dense)
#       megablox     sparse_matmul=True megablox=True   -> Pallas GMM kernel in interpret mode on CPU (very slow)
#       tokamax      sparse_matmul=True use_tokamax_gmm=True (Mosaic-TPU kernel: FAILS on CPU)
#   CAPACITY [1.25]  (only for MOE_IMPL=dense)
#   DTYPE [bfloat16] activation/compute dtype (MaxText default; float32 measured ~1.27x slower)
#   WEIGHT_DTYPE [float32]
#   REMAT [full]  remat_policy (MaxText default; 'none' measured the same speed on this CPU shape)
#   ATTN [dot_product]
#   SCAN [true]   scan_layers
#   LOG [bench/peers/logs/maxtext_<pid>.log]  the full training log (kept)
#   EXTRA ['']    extra key=value overrides appended verbatim
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${VENV:-$HERE/.venv-maxtext}
EMB=${EMB:-256}; LAYERS=${LAYERS:-4}; EXPERTS=${EXPERTS:-8}; TOPK=${TOPK:-2}
SEQ=${SEQ:-512}; BATCH=${BATCH:-8}; MLP=${MLP:-512}
HEADS=${HEADS:-4}; KV_HEADS=${KV_HEADS:-1}; HEAD_DIM=${HEAD_DIM:-64}; VOCAB=${VOCAB:-8192}
STEPS=${STEPS:-30}; MEDIAN_FROM=${MEDIAN_FROM:-10}; LB_WEIGHT=${LB_WEIGHT:-0.01}
MOE_IMPL=${MOE_IMPL:-dense}; CAPACITY=${CAPACITY:-1.25}
DTYPE=${DTYPE:-bfloat16}; WEIGHT_DTYPE=${WEIGHT_DTYPE:-float32}
REMAT=${REMAT:-full}; ATTN=${ATTN:-dot_product}; SCAN=${SCAN:-true}
mkdir -p "$HERE/logs"
LOG=${LOG:-$HERE/logs/maxtext_$$.log}
EXTRA=${EXTRA:-}

if [ ! -x "$VENV/bin/python" ]; then
  echo "skipped: venv missing, run bench/peers/setup_maxtext.sh" >&2
  echo "maxtext tokens_per_s SKIPPED"
  exit 3
fi

case "$MOE_IMPL" in
  dense)        MOE_ARGS="sparse_matmul=False capacity_factor=$CAPACITY" ;;
  dense_nodrop) MOE_ARGS="sparse_matmul=False capacity_factor=-1" ;;
  ragged_dot)   MOE_ARGS="sparse_matmul=True megablox=False use_tokamax_gmm=False" ;;
  megablox)     MOE_ARGS="sparse_matmul=True megablox=True use_tokamax_gmm=False" ;;
  tokamax)      MOE_ARGS="sparse_matmul=True megablox=False use_tokamax_gmm=True" ;;
  *) echo "unknown MOE_IMPL=$MOE_IMPL" >&2; exit 2 ;;
esac

PY="$VENV/bin/python"
CFG="$("$PY" -c 'import maxtext,os;print(os.path.join(os.path.dirname(maxtext.__file__),"configs","base.yml"))')"
WORK=$(mktemp -d /tmp/maxtext_out.XXXXXX)

# Offline/CPU mode: stub out every Google Cloud client, force the CPU backend.
export DECOUPLE_GCLOUD=TRUE
export JAX_PLATFORMS=cpu
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

# shellcheck disable=SC2086
ARGS=(
  "$CFG"
  run_name=tiny_moe base_output_directory="$WORK"
  hardware=cpu skip_jax_distributed_system=true
  dataset_type=synthetic
  enable_checkpointing=false enable_tensorboard=false save_config_to_gcs=false
  enable_goodput_recording=false monitor_goodput=false
  steps="$STEPS" log_period=1000
  per_device_batch_size="$BATCH" max_target_length="$SEQ"
  decoder_block=mixtral
  num_experts="$EXPERTS" num_experts_per_tok="$TOPK"
  base_emb_dim="$EMB" base_mlp_dim="$MLP" base_moe_mlp_dim="$MLP"
  base_num_query_heads="$HEADS" base_num_kv_heads="$KV_HEADS" head_dim="$HEAD_DIM"
  base_num_decoder_layers="$LAYERS" vocab_size="$VOCAB"
  dtype="$DTYPE" weight_dtype="$WEIGHT_DTYPE"
  remat_policy="$REMAT" attention="$ATTN" scan_layers="$SCAN"
  load_balance_loss_weight="$LB_WEIGHT"
  $MOE_ARGS
  $EXTRA
)

OTHERS=$(pgrep -f "maxtext.trainers.pre_train.train|maxtext_train.py" | wc -l || true)
if [ "${OTHERS:-0}" -gt 0 ]; then echo "# WARNING: $OTHERS other MaxText trainer process(es) running: timings will be contended" >&2; fi
echo "# MOE_IMPL=$MOE_IMPL emb=$EMB layers=$LAYERS experts=$EXPERTS topk=$TOPK seq=$SEQ batch=$BATCH mlp=$MLP heads=$HEADS/$KV_HEADS head_dim=$HEAD_DIM vocab=$VOCAB dtype=$DTYPE remat=$REMAT lb_weight=$LB_WEIGHT log=$LOG" >&2
set +e
"$PY" "$HERE/maxtext_train.py" "${ARGS[@]}" >"$LOG" 2>&1
RC=$?
set -e
rm -rf "$WORK"

grep -E "Total TFLOPs|learnable weight flops|number parameters|expert_capacity" "$LOG" || true
grep -E "completed step:" "$LOG" | sed -E 's/.*(completed step: [0-9]+, seconds: [0-9.]+, TFLOP\/s\/device: [0-9.]+, Tokens\/s\/device: [0-9.]+).*, (loss: [0-9.]+),.*/\1, \2/' || true
if [ "$RC" -ne 0 ]; then
  echo "maxtext training failed rc=$RC; tail of $LOG:" >&2
  tail -25 "$LOG" >&2
  echo "maxtext tokens_per_s FAILED"
  exit "$RC"
fi

"$PY" - "$LOG" "$MEDIAN_FROM" "$MOE_IMPL" "$CAPACITY" <<'EOF'
import json, re, statistics, sys
import maxtext
log, start, moe_impl, capacity = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pat = re.compile(r"completed step: (\d+), seconds: ([\d.]+), TFLOP/s/device: ([\d.]+), Tokens/s/device: ([\d.]+)")
lines = open(log).read().splitlines()
rows = [(int(m[1]), float(m[2]), float(m[3]), float(m[4])) for m in map(pat.search, lines) if m]
sel = [r for r in rows if r[0] >= start] or rows[len(rows)//2:]
params = next((json.loads(l.split("maxtext_params ", 1)[1]) for l in lines if "maxtext_params {" in l), {})
params.pop("leaves", None)
if params:
    print("params total {params_total} active_per_token {params_active_per_token} (embedding {params_embedding}; "
          "expert {params_expert}; norm scales {params_norm}); matmul params per token {matmul_params_per_token}; "
          "MaxText train FLOPs/token {maxtext_train_flops_per_token:.0f} (weights {maxtext_weight_flops_per_token:.0f} "
          "+ attention {maxtext_attention_flops_per_token:.0f}, causal-halved)".format(**params))
med_s = statistics.median(r[1] for r in sel)
print(f"# steps {sel[0][0]}..{sel[-1][0]} (n={len(sel)}): median seconds/step {med_s:.4f}, "
      f"median TFLOP/s/device {statistics.median(r[2] for r in sel):.4f}")
tps = statistics.median(r[3] for r in sel)
print("peer_result " + json.dumps({
    "system": f"MaxText {getattr(maxtext, '__version__', '0.2.5')} (jax {__import__('jax').__version__})",
    "tokens_per_s": tps, "mean_tokens_per_s": statistics.mean(r[3] for r in sel), "median_step_s": med_s,
    "min_step_s": min(r[1] for r in sel), "steps": len(sel), "first_timed_step": sel[0][0],
    "moe_impl": moe_impl, "capacity_factor": float(capacity) if moe_impl == "dense" else None, **params}))
print(f"maxtext tokens_per_s {tps:.1f}")
EOF
