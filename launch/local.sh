#!/usr/bin/env bash
# Train one stage on this machine (one host, all its devices: CPU, GPUs or a single TPU VM).
#
#   launch/local.sh runs/train_base_64.gin MODEL_DIR=/data/runs/base64 TRAIN_DATA=/data/cache/laion [KEY=VALUE ...]
#   DRY_RUN=1 launch/local.sh ...        # print the command, run nothing
#
# Arguments after the gin file are gin macros (MACRO=value, strings quoted for you) or full bindings
# (--gin.KEY=VALUE). Everything else about the run is in the gin file.

# ---- settings --------------------------------------------------------------------------------------
IMAGEN_JAX="${IMAGEN_JAX:-imagen-jax}"          # the command (from `make install` / pip install imagen-jax)
XLA_CACHE="${XLA_CACHE:-$HOME/.cache/imagen_jax/xla}"
# ------------------------------------------------------------------------------------------------------
set -euo pipefail
if [[ $# -lt 1 ]]; then awk 'NR > 1 && /^$/ {exit} NR > 1' "$0"; exit 2; fi
source "$(dirname "$0")/_common.sh"
GIN_FILE="$1"; shift
CMD=("$IMAGEN_JAX" train "--gin_file=$GIN_FILE" "--gin.train.compilation_cache_dir='$XLA_CACHE'")
gin_args CMD "$@"
run_or_print "${CMD[@]}"
