"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment, or cluster
detection.

Order of precedence: explicit arguments (the CLI's --coordinator_address / --num_processes /
--process_id), then IMAGEN_COORDINATOR_ADDRESS / IMAGEN_NUM_PROCESSES / IMAGEN_PROCESS_ID, then the
clusters JAX detects by itself, where `jax.distributed.initialize()` takes everything from the
environment: IMAGEN_DISTRIBUTED=auto (launch/tpu_pod.sh sets it on every TPU VM worker), several
hosts in TPU_WORKER_HOSTNAMES, or SLURM_NTASKS > 1. A single process with none of these runs without
it. Must run before JAX touches a device.

On CPU (the tests' simulated hosts), collectives go through gloo.
"""

from __future__ import annotations

import os
from typing import Optional

from imagen_jax.errors import ConfigError


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def cluster_detected() -> bool:
  if os.environ.get("IMAGEN_DISTRIBUTED", "").lower() == "auto":
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  return (_env_int("SLURM_NTASKS") or 1) > 1


def initialize(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
) -> bool:
  """Initializes multi-host JAX when asked or detected; returns whether it did."""
  import jax

  coordinator_address = coordinator_address or os.environ.get("IMAGEN_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("IMAGEN_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("IMAGEN_PROCESS_ID")
  explicit = coordinator_address is not None
  if not explicit and not cluster_detected():
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ConfigError(
      "multi-host needs coordinator address, number of processes and process id together "
      f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
    )
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()
  return True
