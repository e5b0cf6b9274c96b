"""Ancestral (DDPM) and DDIM samplers in continuous time, as one jitted loop.

N uniformly spaced steps walk t from 1 to 0: step i (0-based) goes from t = (N - i) / N to
s = (N - i - 1) / N. Every step
  1. calls the network (once; on a doubled batch when guided) and forms the guided (x0, eps),
  2. thresholds x0 (none / static / dynamic) and re-derives eps from the thresholded x0,
  3. updates z_t -> z_s.
The last step lands on s = 0, where alpha = 1 and sigma = 0 exactly, so its output is the
(thresholded) x0 prediction with no noise added.

Updates, with lambda = log-SNR and c = -expm1(lambda_t - lambda_s) = sigma_{t|s}^2 / sigma_t^2:
  ancestral: the posterior q(z_s | z_t, x0) (Kingma et al. 2021):
             mean = alpha_s ((1 - c) z_t / alpha_t + c x0),   variance = c sigma_s^2
  DDIM:      z_s = alpha_s x0 + sqrt(sigma_s^2 - c_eta^2) eps + c_eta noise,
             c_eta^2 = eta^2 c sigma_s^2  (eta = 1 is the ancestral sampler, eta = 0 deterministic)

The number of steps may be a traced integer: one compilation serves every step count (the loop is
`lax.fori_loop`). Returning the trajectory needs a static step count (`lax.scan`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance, process, thresholding
from imagen_jax.diffusion.schedules import NoiseSchedule, alpha_sigma_from_log_snr
from imagen_jax.errors import ConfigError

SAMPLERS = ("ddpm", "ddim")


def check_sampler(sampler: str) -> str:
  """The one validation of a sampler name (configs, the sampler, the CLI all call it)."""
  if sampler not in SAMPLERS:
    raise ConfigError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  return sampler


def _log_snr_at(schedule: NoiseSchedule, t):
  """Schedule log-SNR, with t <= 0 mapped to +inf (clean data) for the final step."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.where(t <= 0, jnp.inf, schedule.log_snr(t))


def ancestral_update(z, x0, log_snr_t, log_snr_s, noise):
  """One step of the DDPM posterior q(z_s | z_t, x0); noise ~ N(0, I)."""
  alpha_t, _ = alpha_sigma_from_log_snr(log_snr_t)
  alpha_s, sigma_s = alpha_sigma_from_log_snr(log_snr_s)
  c = -jnp.expm1(log_snr_t - log_snr_s)
  mean = process.bcast(alpha_s, z) * (
    process.bcast((1.0 - c) / alpha_t, z) * z + process.bcast(c, z) * x0
  )
  std = jnp.sqrt(c) * sigma_s
  return mean + process.bcast(std, z) * noise


def ddim_update(x0, eps, log_snr_t, log_snr_s, noise, eta):
  """One DDIM step (Song et al. 2021) with stochasticity eta in [0, 1]."""
  alpha_s, sigma_s = alpha_sigma_from_log_snr(log_snr_s)
  c = -jnp.expm1(log_snr_t - log_snr_s)
  c_eta2 = jnp.square(eta) * c * jnp.square(sigma_s)
  dir_coef = jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - c_eta2, 0.0))
  return (
    process.bcast(alpha_s, x0) * x0
    + process.bcast(dir_coef, x0) * eps
    + process.bcast(jnp.sqrt(c_eta2), x0) * noise
  )


def denoise(
  model_fn, z, log_snr, cond, *, objective, guidance_scale, thresholding_method, percentile
):
  """Guided, thresholded (x0, eps) at one noise level. log_snr has shape (B,).
  thresholding_method: a name, or a traced index into `thresholding.THRESHOLDING`."""
  x0, eps = guidance.guided_x0_eps(model_fn, z, log_snr, cond, guidance_scale, objective)
  if isinstance(thresholding_method, str) and thresholding_method == "none":
    return x0, eps
  alpha, sigma = alpha_sigma_from_log_snr(log_snr)
  return thresholding.threshold_x0_eps(x0, eps, z, alpha, sigma, thresholding_method, percentile)


def sample(
  model_fn,
  key,
  shape,
  cond=None,
  *,
  schedule: NoiseSchedule,
  num_steps,
  objective: str = "eps",
  sampler: str = "ddpm",
  ddim_eta: float = 0.0,
  guidance_scale=1.0,
  thresholding_method="dynamic",
  percentile: float = 99.5,
  return_trajectory: bool = False,
  z_init=None,
  x_init=None,
  t_start=1.0,
):
  """Draws samples of `shape` = (B, H, W, C). Pure and jittable; see the module docstring.

  Deterministic for a given key; with one key per example (`key` of shape (B, 2)) every example's
  randomness is its own, so an image does not depend on the batch it is drawn in. num_steps,
  guidance_scale, ddim_eta, percentile and t_start may be traced; thresholding_method is a name or a
  traced index into `thresholding.THRESHOLDING`. z_init: the state at t = 1 (instead of N(0, I)).
  x_init, t_start (img2img, SDEdit): start from x_init forward-noised to t = t_start in [0, 1] with
  the noise the sampler would start from, and walk t_start -> 0 in num_steps steps. t_start = 1 is
  exactly sampling from noise (the process is pure noise at t = 1); t_start = 0 returns x_init. With
  return_trajectory=True (num_steps a Python int) returns (x, {'z': (N + 1, B, H, W, C) states from
  t = t_start to the output, 'x0': (N, ...) x0 predictions}).
  """
  check_sampler(sampler)
  process.check_objective(objective)
  if isinstance(thresholding_method, str):
    thresholding.check_thresholding(thresholding_method)
  k_init, k_loop = process.split_key(key)
  noise0 = process.standard_normal(k_init, shape)
  t0 = jnp.asarray(t_start, jnp.float32)
  if x_init is not None:
    x_init = jnp.asarray(x_init, jnp.float32)
    a0, s0 = schedule.alpha_sigma_exact_ends(t0)
    z = a0 * x_init + s0 * noise0
  else:
    z = noise0 if z_init is None else jnp.asarray(z_init, jnp.float32)
  b = shape[0]
  n = jnp.asarray(num_steps, jnp.int32)
  nf = n.astype(jnp.float32)
  den = functools.partial(
    denoise,
    model_fn,
    objective=objective,
    guidance_scale=guidance_scale,
    thresholding_method=thresholding_method,
    percentile=percentile,
  )

  def step(i, z):
    t = (nf - i) / nf * t0
    s = (nf - i - 1) / nf * t0
    log_snr_t = jnp.full((b,), _log_snr_at(schedule, t))
    log_snr_s = jnp.full((b,), _log_snr_at(schedule, s))
    x0, eps = den(z, log_snr_t, cond)
    noise = process.standard_normal(process.fold_in(k_loop, i), shape)
    if sampler == "ddpm":
      z_s = ancestral_update(z, x0, log_snr_t, log_snr_s, noise)
    else:
      z_s = ddim_update(x0, eps, log_snr_t, log_snr_s, noise, jnp.asarray(ddim_eta, jnp.float32))
    # The last step lands on clean data, where both updates reduce to x0: select it rather than
    # trust
    # (1 - c) / alpha_t * z + c * x0 to round to exactly x0.
    return jnp.where(i == n - 1, x0, z_s), x0

  def finish(x):
    if x_init is None:
      return x
    return jnp.where(t0 <= 0, x_init, x)  # nothing to denoise: the init image itself

  if not return_trajectory:
    return finish(jax.lax.fori_loop(0, n, lambda i, z: step(i, z)[0], z))

  if not isinstance(num_steps, int):
    raise ValueError("return_trajectory=True needs num_steps as a Python int")

  def scan_body(z, i):
    z_s, x0 = step(i, z)
    return z_s, (z_s, x0)

  _, (zs, x0s) = jax.lax.scan(scan_body, z, jnp.arange(num_steps, dtype=jnp.int32))
  # XLA may evaluate the last x0 once for the carry and once for the stacked output, rounding each
  # its
  # own way (an ulp apart); the output is defined as the stacked last x0.
  out = finish(x0s[-1])
  return out, {"z": jnp.concatenate([z[None], zs[:-1], out[None]], axis=0), "x0": x0s}
