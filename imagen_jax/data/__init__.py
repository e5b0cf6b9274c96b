"""The data pipeline: image-caption sources, seqio tasks, the cached-embedding records, stage
batches.

The only part of the package that imports TensorFlow / seqio / tfds. tf.data runs on the host:
`tf_setup()` hides every accelerator from TensorFlow (not from JAX) before any tf.data work, and
keeps TensorFlow's start-up chatter off the user's terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_TF = None

# What TensorFlow's native code prints on stderr while it is imported and its GPUs are hidden, on
# machines
# with and without CUDA: absl's pre-initialisation notice, info/warning lines (oneDNN, CPU features,
# CUDA
# stubs, cuDNN/cuFFT/cuBLAS factory registration, TensorRT), and the error line of a failed cuInit
# on a
# machine without a driver. None of it concerns the user: TensorFlow only runs tf.data on the host
# here.
TF_STARTUP_NOISE = (
  re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
  ),
  re.compile(r"^[IW]\d{4} "),  # absl / tsl info and warning lines
  re.compile(r"^E\d{4} .*(cuInit|cuda_platform|cuda_dnn|cuda_fft|cuda_blas|Unable to register cu)"),
  re.compile(r"^\d{4}-\d\d-\d\d [\d:.]+: [IW] "),  # older tsl format
  re.compile(r"^To enable the following instructions: .* in other operations, rebuild TensorFlow"),
  re.compile(r"^.*TF-TRT Warning: Could not find TensorRT"),
)


@contextlib.contextmanager
def filtered_native_stderr(noise=TF_STARTUP_NOISE):
  """Captures what native code writes to file descriptor 2 inside the block, then writes back every
  line that matches none of the `noise` patterns (so real errors still reach the user, after the
  block).

  Python's own stderr is flushed first and goes through the same filter: nothing is lost, only
  noise.
  """
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no usable fd 2 (e.g. a detached process): nothing to filter
    yield
    return
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = [
        line
        for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
        if not any(p.search(line) for p in noise)
      ]
      if kept:
        os.write(2, "".join(kept).encode())


def tf_setup():
  """Imports TensorFlow with GPUs/TPUs hidden from it (JAX owns the accelerators); idempotent.

  Unless the user set TF_CPP_MIN_LOG_LEVEL, TensorFlow's start-up log lines are dropped (see
  `TF_STARTUP_NOISE`); only TensorFlow is affected: JAX's device messages and logging are untouched,
  and no environment variable is changed.
  """
  global _TF
  if _TF is not None:
    return _TF
  import imagen_jax

  user_set = (
    imagen_jax.USER_TF_CPP_MIN_LOG_LEVEL is not None
  )  # then TensorFlow's log is theirs to see
  quiet = contextlib.nullcontext() if user_set else filtered_native_stderr()
  with quiet:
    import tensorflow as tf

    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
      pass
    # seqio's tokenizer ops; its own copy of the runtime logs at import.
    import tensorflow_text  # noqa: F401
  _TF = tf
  return tf
