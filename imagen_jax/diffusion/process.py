"""The forward process and conversions between eps-, x0- and v-predictions.

z_t = alpha_t x + sigma_t eps with alpha^2 + sigma^2 = 1. With v = alpha eps - sigma x
(Salimans & Ho 2022) the three parameterisations are related, for a given z, by

  x = (z - sigma eps) / alpha        eps = (z - alpha x) / sigma
  x = alpha z - sigma v              eps = sigma z + alpha v
  v = alpha eps - sigma x

`alpha` and `sigma` may be scalars or per-example vectors of shape (B,); they broadcast over the
trailing (H, W, C) axes. All arithmetic is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.errors import ConfigError

OBJECTIVES = ("eps", "x0", "v")


def check_objective(objective: str) -> str:
  if objective not in OBJECTIVES:
    raise ConfigError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
  return objective


def bcast(a, x):
  """Reshapes a scalar or (B,) array so it broadcasts against x of shape (B, ...)."""
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def per_example_keys(key) -> bool:
  """True for a batch of raw PRNG keys, shape (B, 2): one key per example."""
  return jnp.ndim(key) == 2


def standard_normal(key, shape):
  """N(0, I) of `shape` = (B, ...). With one key per example (B, 2), example b's noise depends on
  its own key only: the same whatever the batch it is drawn in (batch size, padding, device
  count)."""
  if per_example_keys(key):
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(key)
  return jax.random.normal(key, tuple(shape), jnp.float32)


def split_key(key, num: int = 2):
  """jax.random.split, per example for a batch of keys: returns `num` keys (or key batches)."""
  if per_example_keys(key):
    keys = jax.vmap(lambda k: jax.random.split(k, num))(key)  # (B, num, 2)
    return tuple(keys[:, i] for i in range(num))
  return tuple(jax.random.split(key, num))


def fold_in(key, data):
  """jax.random.fold_in, per example for a batch of keys."""
  if per_example_keys(key):
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)
  return jax.random.fold_in(key, data)


def diffuse(x, eps, alpha, sigma):
  """z = alpha x + sigma eps."""
  x = jnp.asarray(x, jnp.float32)
  return bcast(alpha, x) * x + bcast(sigma, x) * jnp.asarray(eps, jnp.float32)


def x0_from_eps(z, eps, alpha, sigma):
  return (z - bcast(sigma, z) * eps) / bcast(alpha, z)


def eps_from_x0(z, x0, alpha, sigma):
  return (z - bcast(alpha, z) * x0) / bcast(sigma, z)


def v_from_x0_eps(x0, eps, alpha, sigma):
  return bcast(alpha, x0) * eps - bcast(sigma, x0) * x0


def x0_from_v(z, v, alpha, sigma):
  return bcast(alpha, z) * z - bcast(sigma, z) * v


def eps_from_v(z, v, alpha, sigma):
  return bcast(sigma, z) * z + bcast(alpha, z) * v


def v_from_eps(z, eps, alpha, sigma):
  return v_from_x0_eps(x0_from_eps(z, eps, alpha, sigma), eps, alpha, sigma)


def v_from_x0(z, x0, alpha, sigma):
  return v_from_x0_eps(x0, eps_from_x0(z, x0, alpha, sigma), alpha, sigma)


def prediction_to_x0_eps(pred, z, alpha, sigma, objective: str):
  """(x0, eps) implied by a network output in the given parameterisation, in float32.

  Each branch uses the formulas that stay finite for its parameterisation: eps-prediction divides
  by alpha (large near t = 1, which thresholding of x0 then tames), x0-prediction divides by sigma,
  v-prediction divides by nothing.
  """
  pred = jnp.asarray(pred, jnp.float32)
  z = jnp.asarray(z, jnp.float32)
  check_objective(objective)
  if objective == "eps":
    return x0_from_eps(z, pred, alpha, sigma), pred
  if objective == "x0":
    return pred, eps_from_x0(z, pred, alpha, sigma)
  return x0_from_v(z, pred, alpha, sigma), eps_from_v(z, pred, alpha, sigma)


def target_for_objective(x0, eps, alpha, sigma, objective: str):
  """The regression target of the training loss: eps, x0 or v."""
  check_objective(objective)
  if objective == "eps":
    return jnp.asarray(eps, jnp.float32)
  if objective == "x0":
    return jnp.asarray(x0, jnp.float32)
  return v_from_x0_eps(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), alpha, sigma)
