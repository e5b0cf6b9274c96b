"""The data pipeline: image-caption sources, seqio tasks, the cached-embedding records, stage batches.

The only part of the package that imports TensorFlow / seqio / tfds. tf.data runs on the host:
`tf_setup()` hides every accelerator from TensorFlow before any tf.data work.
"""

_TF_READY = False


def tf_setup():
  """Imports TensorFlow with GPUs/TPUs hidden from it (JAX owns the accelerators); idempotent."""
  global _TF_READY
  import tensorflow as tf
  if not _TF_READY:
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):   # already initialised, or no such device type
      pass
    _TF_READY = True
  return tf
