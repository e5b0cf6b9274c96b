"""The launch scripts' dry runs print the exact command, and what they pass to gin parses."""

import os
import shlex
import subprocess

import gin
import pytest

from imagen_jax import gin_utils
from tests import helpers

ROOT = helpers.ROOT
ARGS = [
  "runs/train_base_64.gin",
  "MODEL_DIR=gs://bucket/runs/base64",
  "TRAIN_DATA=gs://bucket/cache/laion",
  "NUM_STEPS=1000",
  "MESH=(-1, 4, 1)",
  "--gin.train.seed=3",
]


def _dry_run(script, *args, **env):
  full = dict(os.environ, DRY_RUN="1", **env)
  res = subprocess.run(
    ["bash", str(ROOT / "launch" / script), *args],
    capture_output=True,
    text=True,
    env=full,
    timeout=60,
  )
  assert res.returncode == 0, res.stderr
  return shlex.split(res.stdout)


def _check_train_command(argv):
  """argv is `.../imagen-jax train --gin_file=F --gin...`: the gin it carries parses to what was
  asked."""
  assert argv[0].endswith("imagen-jax") and argv[1] == "train"
  files = [a.split("=", 1)[1] for a in argv if a.startswith("--gin_file=")]
  import importlib

  from imagen_jax.cli import TRAIN_GIN_MODULES

  for m in TRAIN_GIN_MODULES:
    importlib.import_module(m)
  _, bindings = gin_utils.bindings_from_flags(argv[2:])
  gin_utils.parse_gin(files, bindings)
  assert files == ["runs/train_base_64.gin"]
  assert gin.query_parameter("MODEL_DIR/gin.macro.value") == "gs://bucket/runs/base64"
  assert gin.query_parameter("NUM_STEPS/gin.macro.value") == 1000
  assert gin.query_parameter("MESH/gin.macro.value") == (-1, 4, 1)
  assert gin.query_parameter("train.seed") == 3
  gin.clear_config()


def test_local_dry_run():
  argv = _dry_run("local.sh", *ARGS, IMAGEN_JAX="imagen-jax")
  _check_train_command(argv)


def test_tpu_pod_dry_run_runs_the_same_command_on_every_worker():
  argv = _dry_run("tpu_pod.sh", *ARGS, TPU_NAME="pod1", ZONE="us-central2-b", PROJECT="proj")
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"]
  assert "--worker=all" in argv and "--zone=us-central2-b" in argv and "--project=proj" in argv
  remote = next(a for a in argv if a.startswith("--command=")).split("=", 1)[1]
  words = shlex.split(remote)
  assert words[:3] == ["cd", "imagen-jax", "&&"] and words[3] == "IMAGEN_DISTRIBUTED=auto"
  _check_train_command(words[4:])


def test_slurm_dry_run_starts_one_process_per_gpu_with_the_distributed_env():
  argv = _dry_run(
    "gpu_slurm.sbatch", *ARGS, REPO_DIR=str(ROOT), VENV="/venv", SLURM_JOB_NODELIST=""
  )
  assert argv[:2] == ["srun", "--kill-on-bad-exit=1"] and argv[2:4] == ["bash", "-c"]
  task = argv[4]
  for part in (
    "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID",
    "IMAGEN_NUM_PROCESSES=$SLURM_NTASKS",
    "IMAGEN_PROCESS_ID=$SLURM_PROCID",
    "IMAGEN_COORDINATOR_ADDRESS=localhost:12355",
  ):
    assert part in task, task
  _check_train_command(shlex.split(task.split("exec ", 1)[1]))


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "gpu_slurm.sbatch"])
def test_scripts_without_arguments_print_their_usage(script):
  res = subprocess.run(
    ["bash", str(ROOT / "launch" / script)], capture_output=True, text=True, timeout=60
  )
  assert res.returncode == 2 and "DRY_RUN=1" in res.stdout
