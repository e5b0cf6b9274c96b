"""Thresholding of the predicted clean image x0 (Imagen, Saharia et al. 2022, section 2.3).

- none: x0 unchanged.
- static: clip x0 to [-1, 1].
- dynamic: per example, s = the p-th percentile of |x0| over all its pixels and channels;
  s = max(s, 1); x0 = clip(x0, -s, s) / s. When s <= 1 this is the static clip.
"""

from __future__ import annotations

import jax.numpy as jnp

THRESHOLDING = ("none", "static", "dynamic")


def check_thresholding(method: str) -> str:
  """The one validation of a thresholding name (configs, the sampler, the CLI all call it)."""
  if method not in THRESHOLDING:
    raise ValueError(f"unknown thresholding {method!r}; expected one of {THRESHOLDING}")
  return method


def static_threshold(x0):
  return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0, percentile: float = 99.5):
  """Per-example dynamic thresholding; x0 has shape (B, ...)."""
  x0 = jnp.asarray(x0, jnp.float32)
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.percentile(flat, percentile, axis=1)
  s = jnp.maximum(s, 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def threshold(x0, method: str = "dynamic", percentile: float = 99.5):
  check_thresholding(method)
  if method == "none":
    return jnp.asarray(x0, jnp.float32)
  if method == "static":
    return static_threshold(jnp.asarray(x0, jnp.float32))
  return dynamic_threshold(x0, percentile)
