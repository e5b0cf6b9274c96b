"""imagen-jax: Imagen-style cascaded text-to-image diffusion in JAX/Flax."""

import os as _os
import sys as _sys

# TF_CPP_MIN_LOG_LEVEL as the user set it, read before JAX is imported: `import jax` sets it to '1'
# when it
# is unset, so later reads cannot tell the user's choice from JAX's default.
# `imagen_jax.data.tf_setup`
# filters TensorFlow's start-up chatter only when the user did not set it.
USER_TF_CPP_MIN_LOG_LEVEL = _os.environ.get("TF_CPP_MIN_LOG_LEVEL")
if "jax" in _sys.modules and USER_TF_CPP_MIN_LOG_LEVEL == "1":
  USER_TF_CPP_MIN_LOG_LEVEL = None  # JAX was imported first and set its default; treat as unset
