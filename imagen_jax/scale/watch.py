"""The host-RAM watch: a command runs in a child process whose resident memory is polled, and it is
stopped, with one line, before the machine runs out (the kernel's OOM killer would end it with no
word).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from typing import Dict, Optional, Sequence

GiB = 2**30
# Set in the watched child, so that the command does not watch itself again.
CHILD_ENV = "IMAGEN_COMPILE_CHECK_CHILD"


def rss_bytes(pid: int) -> Optional[float]:
  """Resident memory of a process (Linux /proc), or None."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return float(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def available_bytes() -> Optional[float]:
  """Memory the machine can still give (Linux /proc/meminfo MemAvailable), or None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def out_of_host_ram_line(used: float, limit: float, per_chip_equivalent: bool = False) -> str:
  """What a stopped compile check says: the RAM needed so far and the ways to need less."""
  head = (
    f"compile-check stopped: the compile needed {used / GiB:.1f} GiB of host RAM so far, over the "
    f"{limit / GiB:.1f} GiB this machine can give it; "
  )
  if per_chip_equivalent:  # already the smallest program of this per-chip batch
    return head + (
      "shrink the per-chip program (SCAN_LAYERS = True, a smaller per-chip batch) or run on a host "
      "with more RAM (a TPU VM)"
    )
  return head + (
    "compile on a smaller slice and derive the pod's figures (a per-chip-equivalent compile), or "
    "shrink the program (SCAN_LAYERS = True), or run on a host with more RAM (a TPU VM)"
  )


@dataclasses.dataclass
class Watched:
  """How a watched command ended."""

  returncode: int
  peak_rss: float
  stopped: bool  # killed by the watch (over the limit)
  limit: float


def limit_bytes(max_host_ram_gb: float) -> float:
  """The RAM a watched child may use: `max_host_ram_gb` GiB, or (when it is negative) what the
  machine has free less 0.75 GiB."""
  if max_host_ram_gb > 0:
    return max_host_ram_gb * GiB
  return (available_bytes() or 0.0) - 0.75 * GiB


def run_watched(
  cmd: Sequence[str], limit: float, env: Optional[Dict[str, str]] = None, poll_seconds: float = 0.25
) -> Watched:
  """Runs `cmd` in a child process and kills it when its resident memory passes `limit` bytes, or
  when the machine has less than 0.5 GiB left.

  Args:
    cmd: the command line.
    limit: bytes of resident memory the child may use.
    env: the child's environment (default: this one's), with CHILD_ENV set.
    poll_seconds: how often the child's memory is read.

  Returns:
    A `Watched`.
  """
  child_env = dict(os.environ if env is None else env, **{CHILD_ENV: "1"})
  child = subprocess.Popen(list(cmd), env=child_env)
  peak = 0.0
  while child.poll() is None:
    rss = rss_bytes(child.pid) or 0.0
    peak = max(peak, rss)
    left = available_bytes()
    if rss > limit or (left is not None and left < 0.5 * GiB):
      child.kill()
      child.wait()
      return Watched(returncode=child.returncode, peak_rss=peak, stopped=True, limit=limit)
    time.sleep(poll_seconds)
  return Watched(returncode=child.returncode, peak_rss=peak, stopped=False, limit=limit)


def record_peak(json_path: str, peak_rss: float) -> None:
  """Adds the watched compile's peak host RAM to the report it wrote (if it wrote one)."""
  from imagen_jax import files

  if os.path.exists(json_path):
    files.write_json(json_path, dict(files.read_json(json_path, "report"), peak_host_rss=peak_rss))
