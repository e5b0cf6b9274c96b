"""The one table of accelerator chips (peak FLOP/s, HBM and its compiler limit) and TPU topologies.

Peaks are the vendors' dense bfloat16 figures per device as JAX shows it (one megacore chip for v4
and v5p). The HBM limits are what XLA's TPU compiler enforces, read from its RESOURCE_EXHAUSTED
messages (docs/scale.md), a little under the nominal HBM.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

from imagen_jax.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind."""

  name: str  # 'v4', 'H100', ...
  device_kinds: Tuple[
    str, ...
  ]  # substrings of jax's device_kind that name it (the first is canonical)
  peak_flops: float  # dense bf16 FLOP/s per device
  hbm_gib: float = 0.0  # nominal HBM (TPUs)
  hbm_limit: float = 0.0  # bytes per chip XLA's TPU compiler allows (TPUs)
  chip_config: str = ""  # libtpu's chip config name (TPUs)
  small_slice: str = ""  # the smallest slice, for per-chip-equivalent compiles (TPUs)


# Matched in order against a device's kind: 'TPU v5 lite' must meet v5e before 'TPU v5' meets v5p.
CHIPS = (
  Chip("H200", ("H200",), 989e12),  # NVIDIA H200 SXM
  Chip("H100", ("H100",), 989e12),  # NVIDIA H100 SXM (PCIe: 756e12; SXM used)
  Chip("A100", ("A100",), 312e12),
  Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32, 31.25 * GiB, "default", "v6e:2x2"),
  Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16, 15.75 * GiB, "default", "v5e:2x2"),
  Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, 95, 95.74 * GiB, "megacore", "v5p:2x2x1"),
  Chip("v4", ("TPU v4",), 275e12, 32, 30.75 * GiB, "megacore", "v4:2x2x1"),
)
# Topology prefixes: libtpu names v5p slices 'v5' as well.
TPU_GENERATIONS = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v5": "v5p", "v6e": "v6e"}


def chip_of_kind(device_kind: str) -> Optional[Chip]:
  """The chip whose kind names `device_kind` (JAX's `device.device_kind`), or None."""
  for chip in CHIPS:
    if any(k.lower() in device_kind.lower() for k in chip.device_kinds):
      return chip
  return None


def generation(topology: str) -> str:
  """The generation prefix of a topology name such as 'v4:4x4x8'.

  Raises:
    ConfigError: the name is not <generation>:<AxB[xC]> with a known generation.
  """
  gen = topology.split(":")[0]
  if gen not in TPU_GENERATIONS or ":" not in topology:
    raise ConfigError(
      f"topology {topology!r}: expected <generation>:<AxB[xC]> with generation one of "
      f"{sorted(TPU_GENERATIONS)} (e.g. v4:4x4x8 = 128 v4 chips, v5e:16x16)"
    )
  return gen


def tpu_chip(topology: str) -> Chip:
  """The chip of a topology name's generation."""
  name = TPU_GENERATIONS[generation(topology)]
  return next(c for c in CHIPS if c.name == name)


def small_slice(topology: str) -> str:
  """The smallest slice of the topology's generation, named with the same prefix."""
  gen = generation(topology)
  return f"{gen}:{tpu_chip(topology).small_slice.split(':')[1]}"


def topology_devices(topology: str, num_slices: int = 1):
  """The compile-only TPU devices of a topology (libtpu needed; no TPU needed).

  Raises:
    ConfigError: libtpu is missing or does not know the topology.
  """
  chip = tpu_chip(topology)
  quiet_libtpu()
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise ConfigError("the TPU compile check needs libtpu: pip install 'imagen-jax[tpu]'") from None
  from jax.experimental import topologies

  dims = topology.split(":")[1].split("x")
  bounds = (2, 2, 1) if len(dims) == 3 else (min(2, int(dims[0])), min(2, int(dims[1])), 1)
  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topology,
      chip_config_name=chip.chip_config,
      chips_per_host_bounds=bounds,
      num_slices=num_slices,
    )
  except Exception as e:  # libtpu's own message names what it did not like
    raise ConfigError(f"topology {topology!r}: {str(e).splitlines()[0]}") from None
  return list(desc.devices)


def quiet_libtpu() -> None:
  """Settings that keep libtpu from probing for a TPU VM's metadata (and warning) on a host without
  one.

  They do not change what it compiles for; compile-only use needs no exclusive TPU access, so
  several processes (tests, parallel checks) may load it.
  """
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
