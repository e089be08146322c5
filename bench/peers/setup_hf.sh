#!/usr/bin/env bash
# Builds the Hugging Face peer's venv: transformers 5.23 (MixtralForCausalLM) on torch 2.13 CPU,
# used by hf_train_bench.py and hf_decode_bench.py beside this file.
#
# What it installs: a Python 3.11 venv with torch==2.13.0, transformers==5.23.0, safetensors,
#   numpy (PyPI packages; no Hugging Face code is kept in this repository, no hub access at run
#   time: the models are built from a config with random weights).
#   torch: on this kind of machine `pip install torch==2.13.0` takes the CPU wheel that lies on
#   disk (/opt/wheels, Python 3.11 only, hence the 3.11 venv). Elsewhere, PyPI's Linux torch 2.13.0
#   is a CUDA build of several GB: it works on the CPU too but is much bigger; set
#   TORCH_INDEX=<a CPU wheel index> to get a CPU build there.
# Where: bench/peers/.venv-hf (ignored by git); VENV=... to put it elsewhere.
# How long / how big: about 1 minute here (the torch wheel is local; 54 s measured); ~1.2 GB.
# Idempotent: running it again only checks and tops up.
#
#   bash bench/peers/setup_hf.sh     # then: bench/peers/.venv-hf/bin/python bench/peers/hf_train_bench.py
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${VENV:-$HERE/.venv-hf}
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for c in python3.11 "$HOME"/.pyenv/versions/3.11*/bin/python3.11 python3; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then PYTHON=$c; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "need a Python 3.11 interpreter (set PYTHON=...)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi

TORCH_ARGS=()
if [ -n "${TORCH_INDEX:-}" ]; then TORCH_ARGS=(--extra-index-url "$TORCH_INDEX"); fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"} torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
  torch==2.13.0 transformers==5.23.0 safetensors numpy

"$VENV/bin/python" -c 'import torch, transformers; from transformers import MixtralForCausalLM;
print("hf ok; torch", torch.__version__, "transformers", transformers.__version__)'
du -sh "$VENV" 2>/dev/null | awk '{print "venv size: "$1}'
