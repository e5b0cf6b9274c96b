#!/usr/bin/env bash
# Train one stage on a Cloud TPU pod slice: the same command on every worker of the TPU VM, started
# from your workstation with gcloud. IMAGEN_DISTRIBUTED=auto makes each worker call
# jax.distributed.initialize() with no arguments (JAX finds the other workers from the TPU VM's
# metadata), each worker reads its own part of the data, and
# orbax writes the checkpoints collectively to MODEL_DIR, which must be a bucket (gs://...).
#
#   launch/tpu_pod.sh runs/train_base_64.gin MODEL_DIR=gs://bucket/runs/base64 TRAIN_DATA=gs://bucket/cache/laion
#   DRY_RUN=1 launch/tpu_pod.sh ...      # print the gcloud command, run nothing
#
# The paper trained the base stage on 256 TPU-v4 chips (a v4-512 slice) and each SR stage on 128
# (v4-256); see docs/paper.md §2.

# ---- settings --------------------------------------------------------------------------------------
TPU_NAME="${TPU_NAME:-imagen-pod}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-my-project}"
REPO_DIR="${REPO_DIR:-imagen-jax}"              # the repository on every worker (relative: to the ssh home)
VENV="${VENV:-.venv}"                           # its virtualenv, relative to REPO_DIR (`make install` there)
XLA_CACHE="${XLA_CACHE:-.cache/xla}"            # persistent compilation cache, relative to REPO_DIR
# ------------------------------------------------------------------------------------------------------
set -euo pipefail
if [[ $# -lt 1 ]]; then awk 'NR > 1 && /^$/ {exit} NR > 1' "$0"; exit 2; fi
source "$(dirname "$0")/_common.sh"
GIN_FILE="$1"; shift
TRAIN=("$VENV/bin/imagen-jax" train "--gin_file=$GIN_FILE" "--gin.train.compilation_cache_dir='$XLA_CACHE'")
gin_args TRAIN "$@"
REMOTE="cd $REPO_DIR && IMAGEN_DISTRIBUTED=auto $(printf '%q ' "${TRAIN[@]}")"
run_or_print gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all \
  --command="$REMOTE"
