"""Thresholding of the predicted clean image x0 (Imagen, Saharia et al. 2022, section 2.3).

- none: x0 unchanged.
- static: clip x0 to [-1, 1].
- dynamic: per example, s = the p-th percentile of |x0| over all its pixels and channels;
  s = max(s, 1); x0 = clip(x0, -s, s) / s. When s <= 1 this is the static clip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.errors import ConfigError

THRESHOLDING = ("none", "static", "dynamic")


def check_thresholding(method: str) -> str:
  """The one validation of a thresholding name (configs, the sampler, the CLI all call it)."""
  if method not in THRESHOLDING:
    raise ConfigError(f"unknown thresholding {method!r}; expected one of {THRESHOLDING}")
  return method


def static_threshold(x0):
  return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0, percentile: float = 99.5, max_value=None):
  """Per-example dynamic thresholding; x0 has shape (B, ...).

  Args:
    x0: the predicted clean images.
    percentile: the percentile of |x0| that sets s (linear interpolation, as torch.quantile).
    max_value: an upper bound on s (DeepFloyd IF's `sample_max_value`: 1.5 for stage I, 1.0 for
      stage II, where 1.0 makes it the static clip); None: unbounded (Imagen).

  Returns:
    clip(x0, -s, s) / s with s = clip(percentile, 1, max_value).
  """
  x0 = jnp.asarray(x0, jnp.float32)
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
  if max_value is not None:
    s = jnp.minimum(s, max_value)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def threshold(x0, method: str = "dynamic", percentile: float = 99.5):
  check_thresholding(method)
  if method == "none":
    return jnp.asarray(x0, jnp.float32)
  if method == "static":
    return static_threshold(jnp.asarray(x0, jnp.float32))
  return dynamic_threshold(x0, percentile)


def thresholding_index(method: str) -> int:
  """The method's index in THRESHOLDING: what a sampler takes as a traced argument (one
  compilation serves every thresholding setting; `lax.switch` runs only the chosen branch)."""
  return THRESHOLDING.index(check_thresholding(method))


def threshold_x0_eps(x0, eps, z, alpha, sigma, method, percentile=99.5, max_value=None):
  """Thresholds x0 and re-derives eps from it (eps = (z - alpha x0) / sigma); 'none' returns the
  pair untouched. `method` is a name (static) or a traced index into THRESHOLDING; max_value bounds
  dynamic thresholding's s (`dynamic_threshold`; may be traced, inf: unbounded)."""
  from imagen_jax.diffusion import process

  def clipped(fn):
    def branch(x0, eps):
      x0 = fn(x0)
      return x0, process.eps_from_x0(z, x0, alpha, sigma)

    return branch

  branches = [
    lambda x0, eps: (jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32)),
    clipped(lambda x: static_threshold(jnp.asarray(x, jnp.float32))),
    clipped(lambda x: dynamic_threshold(x, percentile, max_value)),
  ]
  if isinstance(method, str):
    return branches[thresholding_index(method)](x0, eps)
  return jax.lax.switch(jnp.asarray(method, jnp.int32), branches, x0, eps)
