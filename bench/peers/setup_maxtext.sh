#!/usr/bin/env bash
# Builds the MaxText peer's venv: MaxText 0.2.5 (pre-training, maxtext.trainers.pre_train.train)
# on the CPU, in decoupled/offline mode (DECOUPLE_GCLOUD=TRUE), with JAX 0.11.1 (CPU jaxlib only).
#
# What it installs: a Python 3.12 venv (MaxText needs >= 3.12; pyenv's 3.12 is used when no
#   python3.12 is on PATH) holding maxtext==0.2.5 and the packages its trainer imports on CPU,
#   every version pinned by maxtext_constraints.txt beside this file (a `pip freeze` of a venv
#   that ran). All from PyPI; no MaxText code is kept in this repository.
# Where: bench/peers/.venv-maxtext (ignored by git); VENV=... to put it elsewhere.
# How long / how big: about 2 minutes on a 2-core machine (1 min 55 s measured); ~1.4 GB.
# Idempotent: running it again only checks and tops up.
#
#   bash bench/peers/setup_maxtext.sh            # then: bash bench/peers/run_maxtext.sh
#   PYTHON=/path/to/python3.12 VENV=/tmp/mt bash bench/peers/setup_maxtext.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${VENV:-$HERE/.venv-maxtext}
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1; then PYTHON=$c; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "need a Python >= 3.12 interpreter (set PYTHON=...)" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] >= (3, 12), sys.version' \
  || { echo "$VENV is not Python >= 3.12; remove it and run again" >&2; exit 1; }

# maxtext 0.2.5 declares no base dependencies, so they are listed here explicitly: what
# `import maxtext.trainers.pre_train.train` needs on CPU. tensorflow is not needed (optional import).
PKGS=(
  maxtext==0.2.5
  jax==0.11.1 jaxlib==0.11.1 flax==0.12.9 optax==0.2.8 orbax-checkpoint==0.12.4
  grain==0.2.18 qwix==0.1.8 aqtp==0.9.0 tokamax==0.0.17 drjax==0.2.1
  absl-py etils pydantic==2.13.5 ml_collections omegaconf numpy jaxtyping chex
  pathwaysutils psutil tiktoken sentencepiece jinja2 huggingface_hub transformers pillow sympy
)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$HERE/maxtext_constraints.txt" "${PKGS[@]}"

# Smoke check: the trainer module imports in decoupled (offline) mode on CPU.
DECOUPLE_GCLOUD=TRUE JAX_PLATFORMS=cpu "$VENV/bin/python" -c \
  'import jax, maxtext.trainers.pre_train.train as t; print("maxtext ok; jax", jax.__version__, jax.devices())' 2>&1 | tail -1
du -sh "$VENV" 2>/dev/null | awk '{print "venv size: "$1}'
