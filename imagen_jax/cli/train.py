"""`imagen-jax cache-embeddings` and `imagen-jax train`: the data cache and one stage's training."""

from __future__ import annotations

import sys

from imagen_jax.cli import common


def add_parsers(sub) -> None:
  p = sub.add_parser(
    "cache-embeddings", help="encode a task's captions once and write the embedding cache"
  )
  common.gin_command(
    p,
    cache_embeddings,
    ("imagen_jax.data.cache", "imagen_jax.data.tasks"),
    example="runs/cache_synthetic.gin",
  )
  p = sub.add_parser(
    "train", help="train one cascade stage from a gin run config (resumes automatically)"
  )
  common.gin_command(p, train, common.TRAIN_GIN_MODULES, example="runs/demo_base.gin")
  p.add_argument(
    "--coordinator_address",
    help="multi-host: host:port of process 0 (or "
    "IMAGEN_COORDINATOR_ADDRESS; TPU pods and SLURM are detected)",
  )
  p.add_argument(
    "--num_processes", type=int, help="multi-host: number of processes (or IMAGEN_NUM_PROCESSES)"
  )
  p.add_argument(
    "--process_id", type=int, help="multi-host: this process's index (or IMAGEN_PROCESS_ID)"
  )


def cache_embeddings(args) -> int:
  from imagen_jax.data import cache, tasks

  tasks.register_source_task()  # the source the gin config describes, then the cache of it
  summary = cache.cache_embeddings()
  print(f"cache {summary.line()}")
  return 0


def train(args) -> int:
  from imagen_jax.train import distributed, loop

  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  try:
    summary = loop.train()
  except loop.NonFiniteError as e:
    print(f"imagen-jax: stopped: {common.first_line(e)}", file=sys.stderr)
    return 3
  last = f", loss {summary.history[-1][1]:.4f}" if summary.history else ""
  print(
    f"train: {summary.stopped} at step {summary.final_step}{last}; checkpoints "
    f"{summary.checkpoints or 'none new'}"
  )
  return 0
