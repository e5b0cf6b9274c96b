"""The diffusion training loss for a batch.

t ~ U(0, 1) per example (or low-discrepancy: one uniform offset, then evenly spaced, Kingma et al.
2021), z_t = alpha_t x + sigma_t eps, text condition dropped to the null condition with probability
cond_drop_prob, network output regressed on the objective's target (eps, x0 or v) with a weight:

- 'uniform': mean squared error in the objective's own space (the paper: eps-MSE).
- 'min_snr': Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR, gamma), re-expressed in
  the objective's space: eps -> min(SNR, gamma) / SNR, x0 -> min(SNR, gamma),
  v -> min(SNR, gamma) / (SNR + 1).

A network with a learned variance (improved DDPM, DeepFloyd IF) outputs 2C channels: the eps
prediction, trained with the weighted MSE, and the variance fraction, trained with the variational
bound's term at t (`vlb_term`), improved DDPM's hybrid loss.
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


def sample_times(key, batch_size: int, low_discrepancy: bool = False, discrete: int = 0):
  """t in [0, 1), shape (batch_size,), float32; with discrete = N > 0, t in {1/N, ..., 1}: the
  steps (n + 1) / N of a discrete schedule (`schedules._DiscreteSchedule`)."""
  if discrete:
    if low_discrepancy:
      u = jax.random.uniform(key, (), jnp.float32)
      u = jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
      n = jnp.minimum(jnp.floor(u * discrete), discrete - 1)
    else:
      n = jax.random.randint(key, (batch_size,), 0, discrete).astype(jnp.float32)
    return (n + 1.0) / discrete
  if low_discrepancy:
    u = jax.random.uniform(key, (), jnp.float32)
    return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return jax.random.uniform(key, (batch_size,), jnp.float32)


def _discretized_gaussian_log_likelihood(x, mean, log_var):
  """log P(x) of 8-bit data in [-1, 1] under N(mean, exp(log_var)) integrated over each value's
  bin (width 2/255; the end bins open), improved DDPM's decoder L_0."""
  from jax.scipy.special import ndtr

  inv_std = jnp.exp(-0.5 * log_var)
  centred = x - mean
  cdf_plus = ndtr(inv_std * (centred + 1.0 / 255.0))
  cdf_min = ndtr(inv_std * (centred - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term(x, z, eps_pred, frac, t, schedule: NoiseSchedule, num_timesteps: int):
  """The variational bound's term at discrete step t = (n + 1) / N in bits per dimension, per
  example (improved DDPM, Nichol & Dhariwal 2021, eq. 10-13): KL(q(z_s | z_t, x) || p(z_s | z_t))
  with s = t - 1/N, and at n = 0 the decoder's discretized Gaussian NLL of x. p's mean comes from
  the eps prediction (pass it stop-gradiented for the hybrid loss) and its log variance from the
  variance fraction v as in `samplers.learned_range_update`; the posterior's log variance is
  clipped at n = 0 to step 1's, as improved DDPM and IF do.

  Args:
    x: clean images (B, H, W, C); z: z_t; eps_pred: the network's eps; frac: its v in [-1, 1].
    t: (B,) discrete times; schedule: the discrete schedule; num_timesteps: its N.

  Returns:
    (B,) bits per dimension.
  """
  from imagen_jax.diffusion import samplers

  t = jnp.asarray(t, jnp.float32)
  b = lambda a: process.bcast(a, x)
  abar = lambda u: jnp.where(u <= 0, 1.0, jnp.square(schedule.alpha_sigma(jnp.maximum(u, 0))[0]))
  step = 1.0 / num_timesteps
  abar_t, abar_s = abar(t), abar(t - step)
  first = t <= step * 1.5
  # Step 1's posterior variance (improved DDPM's posterior_log_variance_clipped at n = 0).
  abar_1, abar_2 = abar(jnp.full_like(t, 2 * step)), abar(jnp.full_like(t, step))
  clipped = (1.0 - abar_2) / (1.0 - abar_1) * (1.0 - abar_1 / abar_2)
  floor = jnp.where(first, clipped, 1e-20)  # the posterior variance is 0 at n = 0
  # q: v = -1 selects the posterior variance, clipped at the first step.
  mean_q, log_var_q = samplers.learned_range_moments(
    z, x, jnp.full_like(x, -1.0), abar_t, abar_s, floor
  )
  sqrt_abar_t = jnp.sqrt(abar_t)
  x0_pred = (z - b(jnp.sqrt(1.0 - abar_t)) * eps_pred) / b(sqrt_abar_t)
  mean_p, log_var_p = samplers.learned_range_moments(z, x0_pred, frac, abar_t, abar_s, floor)
  kl = 0.5 * (
    -1.0
    + log_var_p
    - log_var_q
    + jnp.exp(log_var_q - log_var_p)
    + jnp.square(mean_q - mean_p) * jnp.exp(-log_var_p)
  )
  nll = -_discretized_gaussian_log_likelihood(x, mean_p, log_var_p)
  per_dim = jnp.where(b(first), nll, kl) / jnp.log(2.0)
  return jnp.mean(per_dim, axis=tuple(range(1, x.ndim)))


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
  learned_variance: bool = False,
  vlb_weight: float = 1.0,
  discrete_timesteps: int = 0,
  null_text=None,
):
  """Mean weighted loss over the batch, and per-example diagnostics.

  model_fn(z, log_snr, cond) -> prediction; x: (B, H, W, C) in [-1, 1]; cond: see `guidance`.
  learned_variance: the prediction has 2C channels (eps, variance fraction); the second half is
  trained with vlb_weight * `vlb_term` (times drawn from the discrete_timesteps steps).
  null_text: (emb (L, D), mask (L,)) a dropped condition takes (default: zeros, all masked).
  Returns (loss, aux) with aux = {'loss': (B,), 't': (B,), 'log_snr': (B,)} (and 'vlb': (B,)).
  """
  x = jnp.asarray(x, jnp.float32)
  if learned_variance and not discrete_timesteps:
    raise ConfigError("a learned variance trains on a discrete schedule: set discrete_timesteps")
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  t = sample_times(k_t, x.shape[0], low_discrepancy, discrete_timesteps)
  log_snr = schedule.log_snr(t)
  alpha, sigma = schedule.alpha_sigma(t)
  eps = jax.random.normal(k_eps, x.shape, jnp.float32)
  z = process.diffuse(x, eps, alpha, sigma)
  cond = guidance.drop_condition(cond, k_drop, cond_drop_prob, null_text)
  pred = jnp.asarray(model_fn(z, log_snr, cond), jnp.float32)
  aux = {}
  if learned_variance:
    c = x.shape[-1]
    if pred.shape[-1] != 2 * c:
      raise ConfigError(f"learned_variance needs {2 * c} output channels, got {pred.shape[-1]}")
    pred, frac = pred[..., :c], pred[..., c:]
    vlb = vlb_term(x, z, jax.lax.stop_gradient(pred), frac, t, schedule, discrete_timesteps)
    aux["vlb"] = vlb
  target = process.target_for_objective(x, eps, alpha, sigma, objective)
  mse = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, x.ndim)))
  per_example = loss_weight(log_snr, objective, weighting, min_snr_gamma) * mse
  if learned_variance:
    per_example = per_example + vlb_weight * aux["vlb"]
  return jnp.mean(per_example), {"loss": per_example, "t": t, "log_snr": log_snr, **aux}
