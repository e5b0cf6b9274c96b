"""The diffusion training loss for a batch.

t ~ U(0, 1) per example (or low-discrepancy: one uniform offset, then evenly spaced, Kingma et al.
2021), z_t = alpha_t x + sigma_t eps, text condition dropped to the null condition with probability
cond_drop_prob, network output regressed on the objective's target (eps, x0 or v) with a weight:

- 'uniform': mean squared error in the objective's own space (the paper: eps-MSE).
- 'min_snr': Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR, gamma), re-expressed in
  the objective's space: eps -> min(SNR, gamma) / SNR, x0 -> min(SNR, gamma),
  v -> min(SNR, gamma) / (SNR + 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance, process
from imagen_jax.diffusion.schedules import NoiseSchedule
from imagen_jax.errors import ConfigError

WEIGHTINGS = ("uniform", "min_snr")


def check_weighting(weighting: str) -> str:
  if weighting not in WEIGHTINGS:
    raise ConfigError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  return weighting


def sample_times(key, batch_size: int, low_discrepancy: bool = False):
  """t in [0, 1), shape (batch_size,), float32."""
  if low_discrepancy:
    u = jax.random.uniform(key, (), jnp.float32)
    return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return jax.random.uniform(key, (batch_size,), jnp.float32)


def loss_weight(log_snr, objective: str, weighting: str = "uniform", min_snr_gamma: float = 5.0):
  """Per-example weight of the squared error in the objective's space."""
  log_snr = jnp.asarray(log_snr, jnp.float32)
  process.check_objective(objective)
  if check_weighting(weighting) == "uniform":
    return jnp.ones_like(log_snr)
  # min(SNR, gamma) / SNR etc., written with exp(-log_snr) so that large SNR stays finite.
  snr = jnp.exp(log_snr)
  clipped = jnp.minimum(snr, min_snr_gamma)
  if objective == "x0":
    return clipped
  if objective == "eps":
    return jnp.minimum(1.0, min_snr_gamma * jnp.exp(-log_snr))
  return clipped / (snr + 1.0)


def diffusion_loss(
  model_fn,
  x,
  cond,
  key,
  *,
  schedule: NoiseSchedule,
  objective: str = "eps",
  weighting: str = "uniform",
  min_snr_gamma: float = 5.0,
  cond_drop_prob: float = 0.1,
  low_discrepancy: bool = False,
):
  """Mean weighted loss over the batch, and per-example diagnostics.

  model_fn(z, log_snr, cond) -> prediction; x: (B, H, W, C) in [-1, 1]; cond: see `guidance`.
  Returns (loss, aux) with aux = {'loss': (B,), 't': (B,), 'log_snr': (B,)}.
  """
  x = jnp.asarray(x, jnp.float32)
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  t = sample_times(k_t, x.shape[0], low_discrepancy)
  log_snr = schedule.log_snr(t)
  alpha, sigma = schedule.alpha_sigma(t)
  eps = jax.random.normal(k_eps, x.shape, jnp.float32)
  z = process.diffuse(x, eps, alpha, sigma)
  cond = guidance.drop_condition(cond, k_drop, cond_drop_prob)
  pred = jnp.asarray(model_fn(z, log_snr, cond), jnp.float32)
  target = process.target_for_objective(x, eps, alpha, sigma, objective)
  mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x.ndim)))
  per_example = loss_weight(log_snr, objective, weighting, min_snr_gamma) * mse
  return jnp.mean(per_example), {"loss": per_example, "t": t, "log_snr": log_snr}
