"""FLOPs from XLA's cost analysis, per-device peak throughput, and model FLOPs utilisation (MFU).

MFU = (FLOPs of one compiled step per device / step time) / peak FLOP/s of the device. The FLOPs
come from `compiled.cost_analysis()` of the very executable that runs (per device for a partitioned
program); the peaks are the chip table's (`scale.topology`); on a CPU the peak is a measured float32
matmul rate (`cpu_matmul_rate`), so CPU MFU reads "fraction of what this machine's BLAS reaches".
"""

from __future__ import annotations

import functools
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from imagen_jax.scale import topology


def device_peak_flops(device=None) -> Tuple[float, str]:
  """(peak FLOP/s, where the figure comes from) for a device (default: the first local one).

  The peak is the chip table's (`scale.topology.CHIPS`); on a CPU a measured float32 matmul rate.
  """
  device = device or jax.local_devices()[0]
  kind = getattr(device, "device_kind", "")
  chip = topology.chip_of_kind(kind)
  if chip is not None:
    return chip.peak_flops, f"{kind}: bf16 dense peak"
  if device.platform == "cpu":
    return cpu_matmul_rate(), f"{kind or 'cpu'}: measured f32 matmul rate"
  return float("nan"), f"{kind}: no peak figure known"


@functools.lru_cache(maxsize=1)
def cpu_matmul_rate(n: int = 1024, repeats: int = 5) -> float:
  """Measured float32 matmul FLOP/s of one CPU device (median of `repeats`, after a warm-up)."""
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a).block_until_ready()
      times.append(time.perf_counter() - t0)
  return 2 * n**3 / sorted(times)[len(times) // 2]


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled executable, per device, from XLA's cost analysis (None if
  absent)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def mfu(flops_per_device: Optional[float], step_seconds: float, peak: float) -> float:
  """FLOPs per device / step time / peak (NaN where any is missing)."""
  if not flops_per_device or step_seconds <= 0 or not peak or peak != peak:
    return float("nan")
  return flops_per_device / step_seconds / peak
