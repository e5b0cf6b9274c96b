"""The samplers, as one jitted loop: ancestral (DDPM), DDIM and DPM-Solver++ (2M, 3M, 2M SDE).

N steps walk a grid of noise levels from t_start to clean data. Grid point i (0 <= i <= N) has
log-SNR `grid_log_snr(schedule, spacing, i, N, t_start)`; point N is clean data (log-SNR +inf):
- uniform: uniform in t, t_i = (N - i) / N * t_start (the default);
- logsnr: uniform in log-SNR from lambda(t_start) to lambda(T_END_FRACTION * t_start), then 0;
- karras: Karras et al. (2022)'s rho = 7 spacing of sigma/alpha over the same range, then 0.
Every step
  1. calls the network (once; on a doubled batch when guided) and forms the guided (x0, eps): the
     unconditional half is the null condition or a negative prompt's,
  2. thresholds x0 (none / static / dynamic) and re-derives eps from the thresholded x0,
  3. updates z_t -> z_s,
  4. when inpainting, replaces the known region by the known image forward-noised to s.
The last step lands on s = 0, where alpha = 1 and sigma = 0 exactly, so its output is the
(thresholded) x0 prediction with no noise added (every solver is first order there).

Updates, with lambda = log-SNR and c = -expm1(lambda_t - lambda_s) = sigma_{t|s}^2 / sigma_t^2:
  ancestral: the posterior q(z_s | z_t, x0) (Kingma et al. 2021):
             mean = alpha_s ((1 - c) z_t / alpha_t + c x0),   variance = c sigma_s^2
  DDIM:      z_s = alpha_s x0 + sqrt(sigma_s^2 - c_eta^2) eps + c_eta noise,
             c_eta^2 = eta^2 c sigma_s^2  (eta = 1 is the ancestral sampler, eta = 0 deterministic)
  DPM-Solver++ (Lu et al. 2022), multistep, data prediction, in h = (lambda_s - lambda_t) / 2 (the
             paper's lambda is half the log-SNR): the order-k update uses this step's x0 and the
             k - 1 previous ones (`dpmpp_update`); the first steps use the order their history
             allows, and with fewer than 15 steps the second-to-last step is at most second order
             (diffusers' lower_order_final). The SDE variant (2M SDE) adds fresh noise each step;
             its first-order step is the ancestral one.

The step count, guidance weight, spacing, solver order and inpainting resampling count may be
traced: one compilation serves every value (the loop is `lax.fori_loop`). Returning the trajectory
needs a static step count (`lax.scan`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import guidance, process, thresholding
from imagen_jax.diffusion.schedules import NoiseSchedule, alpha_sigma_from_log_snr
from imagen_jax.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde")
# Samplers of one family share one compiled program (the order and SDE flag are traced).
FAMILY = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp_2m": "dpmpp", "dpmpp_3m": "dpmpp"}
FAMILY["dpmpp_2m_sde"] = "dpmpp"
FAMILY_SAMPLER = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp": "dpmpp_2m"}  # each family's program
SOLVER_ORDER = {"ddpm": 1, "ddim": 1, "dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2m_sde": 2}
SPACINGS = ("uniform", "logsnr", "karras")
# diffusers' step spacings of a discrete schedule (`discrete_timesteps`), computed on the host.
DISCRETE_SPACINGS = ("leading", "trailing", "linspace")
# logsnr and karras spacings end at lambda(T_END_FRACTION * t_start) before the final step to t = 0
# (DPM-Solver's t_end = 1e-3; diffusers ends its Karras sigmas at the first training step's).
T_END_FRACTION = 1e-3
KARRAS_RHO = 7.0
# With fewer steps than this, the second-to-last step is at most second order (diffusers' rule).
LOWER_ORDER_FINAL_BELOW = 15


def check_sampler(sampler: str) -> str:
  """The one validation of a sampler name (configs, the sampler, the CLI all call it)."""
  if sampler not in SAMPLERS:
    raise ConfigError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
  return sampler


def check_spacing(spacing: str) -> str:
  """The one validation of a step-spacing name."""
  if spacing not in SPACINGS:
    raise ConfigError(f"unknown step spacing {spacing!r}; expected one of {SPACINGS}")
  return spacing


def spacing_index(spacing: str) -> int:
  """The spacing's index in SPACINGS: what the sampler takes as a traced argument."""
  return SPACINGS.index(check_spacing(spacing))


def _log_snr_at(schedule: NoiseSchedule, t):
  """Schedule log-SNR, with t <= 0 mapped to +inf (clean data) for the final step."""
  t = jnp.asarray(t, jnp.float32)
  return jnp.where(t <= 0, jnp.inf, schedule.log_snr(t))


def grid_log_snr(schedule: NoiseSchedule, spacing, i, num_steps, t_start=1.0):
  """Log-SNR of grid point i in [0, num_steps] (point num_steps: +inf, clean data).

  Args:
    schedule: the stage's noise schedule.
    spacing: a name of SPACINGS, or a traced index into it.
    i: the grid point (may be traced).
    num_steps: N, the number of steps (may be traced).
    t_start: where the walk starts (1: pure noise; below 1: img2img).

  Returns:
    A float32 scalar log-SNR.
  """
  i = jnp.asarray(i, jnp.float32)
  n = jnp.asarray(num_steps, jnp.float32)
  t0 = jnp.asarray(t_start, jnp.float32)
  uniform = _log_snr_at(schedule, (n - i) / n * t0)
  lam_a = schedule.log_snr(t0)
  lam_b = schedule.log_snr(T_END_FRACTION * t0)
  frac = i / jnp.maximum(n - 1.0, 1.0)  # 0 at the first point, 1 at the last before clean data
  logsnr = lam_a + frac * (lam_b - lam_a)
  # sigma/alpha = exp(-lambda / 2); Karras: sigma^(1/rho) uniform between the ends.
  inv_rho = 1.0 / KARRAS_RHO
  root_a, root_b = jnp.exp(-0.5 * inv_rho * lam_a), jnp.exp(-0.5 * inv_rho * lam_b)
  karras = -2.0 * KARRAS_RHO * jnp.log(root_a + frac * (root_b - root_a))
  if isinstance(spacing, str):
    chosen = {"uniform": uniform, "logsnr": logsnr, "karras": karras}[check_spacing(spacing)]
  else:
    chosen = jnp.select(
      [jnp.asarray(spacing) == 0, jnp.asarray(spacing) == 1], [uniform, logsnr], karras
    )
  # The uniform grid reaches t = 0 at i = N by itself; the others jump there from their last point.
  return jnp.where(i >= n, jnp.inf, chosen)


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


def learned_range_moments(z, x0, frac_out, abar_t, abar_s, min_var=None):
  """Mean and log variance of the learned-range step from t to s (`learned_range_update`).

  Args:
    z, x0, frac_out: the state at t, the clean-image prediction, the variance fraction v.
    abar_t, abar_s: alpha_bar at t and s (B,); abar_s = 1 at the last step.
    min_var: (B,) the posterior variance's floor (improved DDPM's clipped variance at the first
      step, in training); default 1e-20 (diffusers' sampling floor).

  Returns:
    (mean, log variance), each of z's shape.
  """
  abar_t = jnp.asarray(abar_t, jnp.float32)
  abar_s = jnp.asarray(abar_s, jnp.float32)
  beta = 1.0 - abar_t / abar_s
  mean = (
    process.bcast(jnp.sqrt(abar_s) * beta / (1.0 - abar_t), z) * x0
    + process.bcast(jnp.sqrt(abar_t / abar_s) * (1.0 - abar_s) / (1.0 - abar_t), z) * z
  )
  floor = 1e-20 if min_var is None else min_var
  post_var = jnp.maximum((1.0 - abar_s) / (1.0 - abar_t) * beta, floor)
  frac = (frac_out + 1.0) / 2.0
  log_var = frac * process.bcast(jnp.log(beta), z) + (1.0 - frac) * process.bcast(
    jnp.log(post_var), z
  )
  return mean, log_var


def learned_range_update(z, x0, frac_out, abar_t, abar_s, noise):
  """One ancestral step with a learned variance (improved DDPM, Nichol & Dhariwal 2021), as
  DeepFloyd IF samples (diffusers' DDPMScheduler with variance_type='learned_range'): the mean of
  the DDPM posterior q(z_s | z_t, x0), and a log variance interpolated between the posterior's
  (lower) and the step's beta (upper) by the network's extra output channels v in [-1, 1]:
  log var = (v + 1)/2 log beta + (1 - v)/2 log max(posterior var, 1e-20).

  Args:
    z: the state at the current point t, (B, H, W, C).
    x0: the (thresholded) clean-image prediction.
    frac_out: the network's variance channels v, z's shape.
    abar_t, abar_s: alpha_bar (= alpha^2) at t and at the next point s (B,); 1.0 at the end.
    noise: N(0, I) of z's shape, added except on the last step (abar_s = 1).

  Returns:
    z at s.
  """
  mean, log_var = learned_range_moments(z, x0, frac_out, abar_t, abar_s)
  add = jnp.asarray(abar_s, jnp.float32) < 1.0
  return mean + process.bcast(add.astype(jnp.float32), z) * jnp.exp(0.5 * log_var) * noise


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


def dpmpp_update(z, x0s, log_snrs, log_snr_s, order, sde, noise):
  """One multistep DPM-Solver++ step (data prediction; Lu et al. 2022, diffusers' "midpoint" form).

  Args:
    z: the state at log_snrs[0], (B, H, W, C).
    x0s: (x0 at log_snrs[0], the previous step's, the one before), each (B, H, W, C); entries
      beyond the order are unused.
    log_snrs: the log-SNRs (B,) of those three points (current first).
    log_snr_s: the log-SNR (B,) of the point the step goes to (finite).
    order: 1, 2 or 3 (may be traced; the SDE variant uses at most 2).
    sde: 0 (the ODE solver) or 1 (SDE-DPM-Solver++; may be traced).
    noise: N(0, I) of z's shape (used by the SDE variant only).

  Returns:
    z at log_snr_s.
  """
  b = functools.partial(process.bcast, x=z)
  m0, m1, m2 = x0s
  lam_t, lam_1, lam_2 = (0.5 * jnp.asarray(v, jnp.float32) for v in log_snrs)
  lam_s = 0.5 * jnp.asarray(log_snr_s, jnp.float32)
  _, sigma_t = alpha_sigma_from_log_snr(2.0 * lam_t)
  alpha_s, sigma_s = alpha_sigma_from_log_snr(2.0 * lam_s)
  sde = jnp.asarray(sde, jnp.float32)
  order = jnp.asarray(order, jnp.int32)
  h = lam_s - lam_t
  # The ODE's coefficients in h; the SDE's are the same functions of 2h, with e^-h on z.
  hh = h * (1.0 + sde)
  em1 = jnp.expm1(-hh)  # e^{-h} - 1 (< 0)
  ratio = sigma_s / sigma_t * jnp.exp(-sde * h)
  safe = lambda x: jnp.where(jnp.abs(x) > 0, x, 1.0)
  r0 = (lam_t - lam_1) / safe(h)
  r1 = (lam_1 - lam_2) / safe(h)
  d1_0 = (m0 - m1) / b(safe(r0))
  d1_1 = (m1 - m2) / b(safe(r1))
  first = b(ratio) * z - b(alpha_s * em1) * m0
  second = first - b(0.5 * alpha_s * em1) * d1_0
  d1 = d1_0 + b(r0 / safe(r0 + r1)) * (d1_0 - d1_1)
  d2 = (d1_0 - d1_1) / b(safe(r0 + r1))
  third = (
    first
    + b(alpha_s * (em1 / safe(hh) + 1.0)) * d1
    - b(alpha_s * ((em1 + hh) / safe(jnp.square(hh)) - 0.5)) * d2
  )
  out = jnp.where(order >= 3, third, jnp.where(order == 2, second, first))
  return out + b(sde * sigma_s * jnp.sqrt(-jnp.expm1(-2.0 * h))) * noise


def denoise(
  model_fn,
  z,
  log_snr,
  cond,
  *,
  objective,
  guidance_scale,
  thresholding_method,
  percentile,
  uncond=None,
  threshold_max=None,
  learned_variance=False,
):
  """Guided, thresholded (x0, eps) at one noise level. log_snr has shape (B,).
  thresholding_method: a name, or a traced index into `thresholding.THRESHOLDING`. uncond: the
  unconditional half's condition (a negative prompt's); default the null condition.
  threshold_max: the bound on dynamic thresholding's s (None / inf: none). learned_variance:
  returns (x0, eps, v) with the network's variance fraction v (`guidance.guided_x0_eps`)."""
  out = guidance.guided_x0_eps(
    model_fn,
    z,
    log_snr,
    cond,
    guidance_scale,
    objective,
    uncond=uncond,
    learned_variance=learned_variance,
  )
  x0, eps = out[:2]
  if not (isinstance(thresholding_method, str) and thresholding_method == "none"):
    alpha, sigma = alpha_sigma_from_log_snr(log_snr)
    x0, eps = thresholding.threshold_x0_eps(
      x0, eps, z, alpha, sigma, thresholding_method, percentile, threshold_max
    )
  return (x0, eps, out[2]) if learned_variance else (x0, eps)


def discrete_timesteps(spacing: str, num_steps: int, num_train_timesteps: int = 1000):
  """The discrete steps (0-based, descending) diffusers' schedulers walk for `num_steps` steps of a
  `num_train_timesteps`-step schedule: 'leading' (arange(N) * (T // N), diffusers' default and
  DeepFloyd IF's), 'trailing' (T - 1 down in steps of T / N, rounded) or 'linspace'."""
  n, t = int(num_steps), int(num_train_timesteps)
  if not 1 <= n <= t:
    raise ConfigError(f"{n} steps do not fit a {t}-step schedule")
  if spacing == "leading":
    steps = np.arange(n) * (t // n)
  elif spacing == "trailing":
    steps = np.round(np.arange(t, 0, -t / n)).astype(np.int64)[::-1] - 1
  elif spacing == "linspace":
    steps = np.round(np.linspace(0, t - 1, n)).astype(np.int64)
  else:
    raise ConfigError(f"unknown discrete spacing {spacing!r}; expected leading, trailing, linspace")
  return np.asarray(steps[::-1], np.int64)


# DeepFloyd IF's respaced step sets, as section counts over the 1000 steps (`space_timesteps`).
STEP_SETS = {
  "fast27": "10,10,3,2,2",
  "smart27": "7,4,2,1,2,4,7",
  "smart50": "10,6,4,3,2,2,3,4,6,10",
  "smart100": "1,1,1,1,2,2,2,2,2,2,3,3,4,4,5,5,6,7,7,8,9,10,13",
  "smart185": "1,1,2,2,2,3,3,3,4,5,6,7,8,9,10,11,12,13,14,15,16,18,20",
  "super27": "1,1,1,1,1,1,1,2,5,13",
  "super40": "2,2,2,2,2,2,3,4,6,15",
  "super100": "4,4,6,6,8,8,10,10,14,30",
}


def space_timesteps(num_timesteps: int, section_counts) -> np.ndarray:
  """Improved DDPM's respacing: the steps split into len(section_counts) equal sections (the first
  ones one longer when they do not divide), each walked with section_count evenly spaced steps
  (rounded), ends included. Returns the steps, descending."""
  counts = [int(c) for c in section_counts]
  size_per, extra = divmod(int(num_timesteps), len(counts))
  start, steps = 0, set()
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if not 1 <= count <= size:
      raise ConfigError(f"cannot take {count} steps from a section of {size}")
    stride = 1.0 if count == 1 else (size - 1) / (count - 1)
    position = 0.0
    for _ in range(count):  # accumulated, as improved DDPM does (its roundings follow from that)
      steps.add(start + round(position))
      position += stride
    start += size
  return np.asarray(sorted(steps, reverse=True), np.int64)


def parse_timesteps(text: str, num_train_timesteps: int = 1000) -> np.ndarray:
  """A respaced step set: a name of STEP_SETS (IF's smart100, ...), 'sections:c1,c2,...' (improved
  DDPM's section counts) or comma-separated discrete steps, strictly descending, each in
  [0, num_train_timesteps)."""
  text = str(text).replace(" ", "")
  if text in STEP_SETS or text.startswith("sections:"):
    sections = STEP_SETS.get(text, text[len("sections:") :])
    try:
      return space_timesteps(num_train_timesteps, sections.split(","))
    except ValueError as e:
      raise ConfigError(f"timesteps {text!r}: {e}") from None
  try:
    steps = np.asarray([int(v) for v in text.split(",") if v], np.int64)
  except ValueError:
    raise ConfigError(
      f"timesteps must be a step set ({', '.join(STEP_SETS)}), 'sections:c1,c2,...' or "
      f"comma-separated integers, got {text!r}"
    ) from None
  if steps.size == 0 or np.any(np.diff(steps) >= 0):
    raise ConfigError(f"timesteps must be a non-empty, strictly descending list, got {text!r}")
  if steps[0] >= num_train_timesteps or steps[-1] < 0:
    raise ConfigError(f"timesteps must lie in [0, {num_train_timesteps}), got {text!r}")
  return steps


def timesteps_to_grid(steps, num_train_timesteps: int = 1000) -> np.ndarray:
  """Discrete steps n (descending) -> the grid times t = (n + 1) / T of a discrete schedule
  (`schedules._DiscreteSchedule`), float32, one per sampling step."""
  return ((np.asarray(steps, np.float64) + 1.0) / num_train_timesteps).astype(np.float32)


def step_order(sampler_order, i, num_steps):
  """The order step i of num_steps uses: what its history allows, first order on the last step
  (it lands on clean data), at most second on the one before when num_steps < 15."""
  i = jnp.asarray(i, jnp.int32)
  n = jnp.asarray(num_steps, jnp.int32)
  order = jnp.minimum(jnp.asarray(sampler_order, jnp.int32), i + 1)
  order = jnp.where((i == n - 2) & (n < LOWER_ORDER_FINAL_BELOW), jnp.minimum(order, 2), order)
  return jnp.where(i == n - 1, 1, order)


def _renoise(z_s, log_snr_s, log_snr_t, noise):
  """A draw of q(z_t | z_s): the forward process from s back up to the noisier t (RePaint)."""
  alpha_t, sigma_t = alpha_sigma_from_log_snr(log_snr_t)
  alpha_s, sigma_s = alpha_sigma_from_log_snr(log_snr_s)
  a_ts = alpha_t / alpha_s
  var = jnp.maximum(jnp.square(sigma_t) - jnp.square(a_ts * sigma_s), 0.0)
  return process.bcast(a_ts, z_s) * z_s + process.bcast(jnp.sqrt(var), z_s) * noise


def _initial_state(schedule, noise0, z_init, x_init, t0):
  """(z at t_start, x_init as float32): the noise, the given state, or x_init forward-noised."""
  if x_init is None:
    return (noise0 if z_init is None else jnp.asarray(z_init, jnp.float32)), None
  x_init = jnp.asarray(x_init, jnp.float32)
  a0, s0 = schedule.alpha_sigma_exact_ends(t0)
  return a0 * x_init + s0 * noise0, x_init


def _grid_fn(schedule, spacing, n, t0, b, t_grid=None, partial=False):
  """i -> the (B,) log-SNR of grid point i: the spacing's, or the given grid times' (point n and
  beyond: clean data); a given grid does not support img2img or inpainting (`partial`)."""
  if t_grid is None:
    return lambda i: jnp.full((b,), grid_log_snr(schedule, spacing, i, n, t0))
  if partial:
    raise ValueError("a discrete step set (t_grid) does not support img2img or inpainting")
  t_grid = jnp.asarray(t_grid, jnp.float32)

  def lam(i):
    t = t_grid[jnp.clip(jnp.asarray(i, jnp.int32), 0, t_grid.shape[0] - 1)]
    return jnp.full((b,), jnp.where(i >= n, jnp.inf, schedule.log_snr(t)))

  return lam


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
  spacing="uniform",
  solver_order=None,
  sde=None,
  uncond=None,
  known=None,
  mask=None,
  resample=1,
  return_trajectory: bool = False,
  z_init=None,
  x_init=None,
  t_start=1.0,
  t_grid=None,
  threshold_max=None,
  learned_variance: bool = False,
):
  """Draws samples of `shape` = (B, H, W, C). Pure and jittable; see the module docstring.

  Deterministic for a given key; with one key per example (`key` of shape (B, 2)) every example's
  randomness is its own, so an image does not depend on the batch it is drawn in.

  Args:
    model_fn: `model_fn(z, log_snr, cond) -> prediction` in the objective's parameterisation.
    key: a PRNG key, or one per example (B, 2).
    shape: (B, H, W, C).
    cond: the condition (text and, for SR stages, the low-res image).
    schedule: the stage's noise schedule.
    num_steps: N (may be traced).
    objective: what the network predicts: eps, x0 or v.
    sampler: a name of SAMPLERS; the loop is that of its FAMILY.
    ddim_eta: DDIM's stochasticity in [0, 1] (may be traced).
    guidance_scale: classifier-free guidance weight w (may be traced; statically 1: one call).
    thresholding_method: a name, or a traced index into `thresholding.THRESHOLDING`.
    percentile: dynamic thresholding's percentile (may be traced).
    spacing: a name of SPACINGS or a traced index into it.
    solver_order: DPM-Solver++'s order (1-3; may be traced); default the sampler's.
    sde: DPM-Solver++'s SDE flag (0 or 1; may be traced); default the sampler's.
    uncond: the unconditional half's condition (negative prompts); default the null condition.
    known, mask: inpainting: the known image (B, H, W, C) in the model's range and where it is
      kept, (B, H, W, 1) or (B, H, W, C), 1 = keep, 0 = generate (values in between blend). At each
      step the kept region is replaced by `known` forward-noised to that step's level.
    resample: RePaint's resampling when inpainting (jump length 1): each step but the last is run
      this many times, re-noising its result back to the step's start in between, so the network
      is called (num_steps - 1) * resample + 1 times (may be traced).
    return_trajectory: also return the states and x0 predictions (num_steps a Python int).
    z_init: the state at t = 1 (instead of N(0, I)).
    x_init, t_start: img2img (SDEdit): start from x_init forward-noised to t = t_start in [0, 1]
      with the noise the sampler would start from, and walk t_start -> 0. t_start = 1 is exactly
      sampling from noise; t_start = 0 returns x_init.
    t_grid: (num_steps,) times of grid points 0 .. N - 1, replacing the spacing (IF step sets).
    threshold_max: dynamic thresholding's bound on s (IF's sample_max_value; None / inf: none).
    learned_variance: 2C output channels (eps, variance fraction): 'ddpm' takes the learned-range
      step (`learned_range_update`), the others use eps.

  Returns:
    x (B, H, W, C) float32; with return_trajectory, (x, {'z': (N + 1, B, H, W, C) states from
    t_start to the output, 'x0': (N, ...) x0 predictions}).
  """
  check_sampler(sampler)
  process.check_objective(objective)
  if isinstance(thresholding_method, str):
    thresholding.check_thresholding(thresholding_method)
  if isinstance(spacing, str):
    check_spacing(spacing)
  family = FAMILY[sampler]
  order = SOLVER_ORDER[sampler] if solver_order is None else solver_order
  sde = float(sampler.endswith("_sde")) if sde is None else sde
  inpaint = known is not None
  if inpaint and mask is None:
    raise ValueError("inpainting needs a mask with the known image")
  k_init, k_loop = process.split_key(key)
  # Inpainting and resampling draw from their own stream, so that a mask of all "generate" gives
  # exactly the plain sampler's images.
  k_extra = process.fold_in(key, 0x1A1D)
  noise0 = process.standard_normal(k_init, shape)
  t0 = jnp.asarray(t_start, jnp.float32)
  z, x_init = _initial_state(schedule, noise0, z_init, x_init, t0)
  b = shape[0]
  n = jnp.asarray(num_steps, jnp.int32)
  repeats = jnp.maximum(jnp.asarray(resample, jnp.int32), 1) if inpaint else jnp.int32(1)
  den = functools.partial(
    denoise,
    model_fn,
    objective=objective,
    guidance_scale=guidance_scale,
    thresholding_method=thresholding_method,
    percentile=percentile,
    uncond=uncond,
    threshold_max=threshold_max,
    learned_variance=learned_variance,
  )
  lam = _grid_fn(schedule, spacing, n, t0, b, t_grid, x_init is not None or known is not None)

  if inpaint:
    known = jnp.asarray(known, jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), shape)

    def keep_known(z_s, log_snr_s, key):
      alpha, sigma = alpha_sigma_from_log_snr(log_snr_s)
      noised = process.diffuse(known, process.standard_normal(key, shape), alpha, sigma)
      return mask * noised + (1.0 - mask) * z_s

    z = keep_known(z, lam(0), process.fold_in(k_extra, 0))

  zeros = jnp.zeros(shape, jnp.float32)
  # The carry: the state, the previous two x0 predictions and their log-SNRs (DPM-Solver++).
  hist0 = (zeros, zeros, jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32))

  def step(i, z, hist, k_step):
    """Step i from grid point i to i + 1: (z_s, new history, this step's x0)."""
    log_snr_t, log_snr_s = lam(i), lam(i + 1)
    x0, eps, *var = den(z, log_snr_t, cond)
    noise = process.standard_normal(k_step, shape)
    if family == "ddpm" and learned_variance:
      abar = lambda log_snr: jax.nn.sigmoid(log_snr)  # alpha^2 = sigmoid(log-SNR); 1 at +inf
      z_s = learned_range_update(z, x0, var[0], abar(log_snr_t), abar(log_snr_s), noise)
    elif family == "ddpm":
      z_s = ancestral_update(z, x0, log_snr_t, log_snr_s, noise)
    elif family == "ddim":
      z_s = ddim_update(x0, eps, log_snr_t, log_snr_s, noise, jnp.asarray(ddim_eta, jnp.float32))
    else:
      m1, m2, lam1, lam2 = hist
      # On the last step log_snr_s is +inf; that branch's value is replaced by x0 below, and a
      # finite stand-in keeps the unused arithmetic finite.
      finite_s = jnp.where(jnp.isfinite(log_snr_s), log_snr_s, log_snr_t + 1.0)
      z_s = dpmpp_update(
        z, (x0, m1, m2), (log_snr_t, lam1, lam2), finite_s, step_order(order, i, n), sde, noise
      )
    # The last step lands on clean data, where every update reduces to x0: select it rather than
    # trust the update's arithmetic to round to exactly x0.
    z_s = jnp.where(i == n - 1, x0, z_s)
    return z_s, (x0, hist[0], log_snr_t, hist[2]), x0

  def body(k, carry):
    """Virtual step k: step i = k // repeats, its r-th run (RePaint; repeats = 1: plain). The
    last step (k = (n - 1) * repeats) runs once."""
    z, hist = carry
    i, r = k // repeats, k % repeats
    k_step = process.fold_in(k_loop, i)
    if inpaint:  # a rerun of a step draws its own noise (the first run: the plain sampler's)
      k_step = jnp.where(r == 0, k_step, process.fold_in(k_extra, 3 * k + 3))
    z_s, new_hist, _ = step(i, z, hist, k_step)
    if inpaint:
      z_s = keep_known(z_s, lam(i + 1), process.fold_in(k_extra, 3 * k + 1))
      again = (r < repeats - 1) & (i < n - 1)
      renoise_noise = process.standard_normal(process.fold_in(k_extra, 3 * k + 2), shape)
      back = _renoise(z_s, lam(i + 1), lam(i), renoise_noise)
      z_s = jnp.where(again, back, z_s)
      new_hist = jax.tree_util.tree_map(lambda o, nw: jnp.where(again, o, nw), hist, new_hist)
    return z_s, new_hist

  def finish(x):
    if x_init is None:
      return x
    return jnp.where(t0 <= 0, x_init, x)  # nothing to denoise: the init image itself

  if not return_trajectory:
    out, _ = jax.lax.fori_loop(0, (n - 1) * repeats + 1, body, (z, hist0))
    return finish(out)

  if not isinstance(num_steps, int):
    raise ValueError("return_trajectory=True needs num_steps as a Python int")
  if inpaint:
    raise ValueError("return_trajectory=True does not support inpainting")

  def scan_body(carry, i):
    z, hist = carry
    z_s, hist, x0 = step(i, z, hist, process.fold_in(k_loop, i))
    return (z_s, hist), (z_s, x0)

  _, (zs, x0s) = jax.lax.scan(scan_body, (z, hist0), jnp.arange(num_steps, dtype=jnp.int32))
  # XLA may evaluate the last x0 once for the carry and once for the stacked output, rounding each
  # its own way (an ulp apart); the output is defined as the stacked last x0.
  out = finish(x0s[-1])
  return out, {"z": jnp.concatenate([z[None], zs[:-1], out[None]], axis=0), "x0": x0s}
