"""A quiet start on CPU, GPU and TPU hosts, without the user setting anything.

Two sources of start-up lines that a user cannot tell from real errors are silenced here
(TensorFlow's own are filtered where TensorFlow is imported: `imagen_jax.data.tf_setup`):
- libtpu (the `tpu` extra, for the compile check) probes for a TPU on any host and logs errors where
  there is none; where JAX_PLATFORMS is unset and the host has no TPU device, JAX is pointed at the
  other platforms (the compile check's compile-only TPU devices do not need the TPU backend);
- orbax warns that a checkpoint folder opened for reading is read-only, which is what reading is.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

# A TPU VM exposes its chips as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5e and later).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def has_tpu() -> bool:
  """Whether this host has TPU chips."""
  return any(glob.glob(g) for g in TPU_DEVICE_GLOBS)


def default_platforms() -> str:
  """What JAX_PLATFORMS means on this host when the user leaves it unset: '' (JAX's own choice)
  on a TPU host or where libtpu is not installed, else the CUDA and CPU backends."""
  if has_tpu() or importlib.util.find_spec("libtpu") is None:
    return ""
  return "cuda,cpu" if any(importlib.util.find_spec(p) is not None for p in CUDA_PLUGINS) else "cpu"


class _ReadOnlyCheckpointWarning(logging.Filter):
  def filter(self, record):
    return "is read only" not in str(record.msg)


def quiet() -> None:
  """Chooses JAX's platforms where the user did not (see the module doc) and filters orbax's
  read-only warning. Call before anything asks JAX for devices."""
  if "JAX_PLATFORMS" not in os.environ:
    platforms = default_platforms()
    if platforms:
      os.environ["JAX_PLATFORMS"] = platforms
      import sys

      if "jax" in sys.modules:  # imported already: its config read the variable at import
        import jax

        jax.config.update("jax_platforms", platforms)
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _ReadOnlyCheckpointWarning) for f in logger.filters):
    logger.addFilter(_ReadOnlyCheckpointWarning())
