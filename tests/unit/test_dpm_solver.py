"""DPM-Solver++ against diffusers' DPMSolverMultistepScheduler (an independent implementation, run
step by step on the project's schedule with a stand-in network), the Gaussian closed form, and the
step spacings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from imagen_jax.diffusion import process, samplers
from tests.helpers import GaussianOracle

ORACLE = GaussianOracle(mean=[0.5, -0.3, 0.0, 0.6], std=[0.3, 0.5, 0.4, 0.35])
SHAPE = (3, 4, 4, 2)


def _stand_in(objective):
  """A nonlinear network of (z, log_snr, text): the Gaussian oracle bent by tanh, shifted by the
  text embedding's mean (so guidance has something to amplify)."""
  oracle = GaussianOracle(mean=[0.4, -0.2], std=[0.6, 0.5]).model_fn(objective)

  def fn(z, log_snr, cond):
    text = (cond[D.TEXT_EMB].mean((1, 2)) * cond[D.TEXT_MASK].any(1))[:, None, None, None]
    return oracle(z, log_snr, None) + 0.3 * jnp.tanh(z + text) + 0.5 * text

  return fn


def _cond():
  emb = jnp.asarray(np.linspace(-1.0, 2.0, 3 * 2 * 5, dtype=np.float32).reshape(3, 2, 5))
  return {D.TEXT_EMB: emb, D.TEXT_MASK: jnp.ones((3, 2), bool)}


def _diffusers_trajectory(schedule, objective, n, w, *, order, sde, threshold, key):
  """diffusers' DPM-Solver++ on `schedule` discretised at t = (k + 1) / 1000, over the timesteps our
  uniform grid of n steps visits, with our stand-in network, initial noise and SDE noise."""
  import torch
  from diffusers import DPMSolverMultistepScheduler

  t = (np.arange(1000, dtype=np.float64) + 1) / 1000
  abar = np.asarray(jax.nn.sigmoid(schedule.log_snr(jnp.asarray(t, jnp.float32))), np.float64)
  betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
  sched = DPMSolverMultistepScheduler(
    trained_betas=betas,
    solver_order=order,
    prediction_type={"eps": "epsilon", "v": "v_prediction"}[objective],
    algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
    thresholding=threshold,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1e9,  # no upper clamp of s: the paper's dynamic thresholding
    lower_order_final=True,
    final_sigmas_type="zero",
  )
  sched.set_timesteps(timesteps=[1000 * (n - i) // n - 1 for i in range(n)])
  fn, cond = _stand_in(objective), _cond()
  k_init, k_loop = process.split_key(key)
  z = process.standard_normal(k_init, SHAPE)
  to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())
  sample, out = to_torch(z), [np.asarray(z)]
  for i, k in enumerate(sched.timesteps):
    abar_k = float(sched.alphas_cumprod[int(k)])
    log_snr = jnp.full((SHAPE[0],), np.log(abar_k / (1.0 - abar_k)), jnp.float32)
    z_j = jnp.asarray(sample.numpy().transpose(0, 2, 3, 1))
    pred = w * fn(z_j, log_snr, cond) + (1 - w) * fn(z_j, log_snr, D.null_condition(cond))
    noise = process.standard_normal(process.fold_in(k_loop, i), SHAPE)
    sample = sched.step(to_torch(pred), k, sample, variance_noise=to_torch(noise)).prev_sample
    out.append(sample.numpy().transpose(0, 2, 3, 1))
  return np.stack(out)


@pytest.mark.parametrize(
  "sampler,objective,w,threshold,n",
  [
    ("dpmpp_2m", "eps", 1.0, False, 10),
    ("dpmpp_2m", "v", 3.0, True, 10),
    ("dpmpp_2m", "eps", 5.0, True, 20),
    ("dpmpp_3m", "v", 1.0, False, 20),
    ("dpmpp_3m", "eps", 3.0, True, 10),
    ("dpmpp_2m_sde", "v", 3.0, True, 10),
  ],
)
def test_dpm_solver_matches_diffusers_step_by_step(sampler, objective, w, threshold, n):
  schedule, key = D.CosineSchedule(), jax.random.PRNGKey(5)
  _, traj = D.sample(
    _stand_in(objective),
    key,
    SHAPE,
    _cond(),
    schedule=schedule,
    num_steps=n,
    objective=objective,
    sampler=sampler,
    guidance_scale=w,
    thresholding_method="dynamic" if threshold else "none",
    return_trajectory=True,
  )
  ref = _diffusers_trajectory(
    schedule,
    objective,
    n,
    w,
    order=samplers.SOLVER_ORDER[sampler],
    sde=sampler.endswith("_sde"),
    threshold=threshold,
    key=key,
  )
  ours = np.asarray(traj["z"])
  assert ours.shape == ref.shape
  scale = np.abs(ref).max(axis=(1, 2, 3, 4), keepdims=True) + 1.0
  np.testing.assert_allclose(ours / scale, ref / scale, atol=2e-4)


def _exact_ode_solution(z1, schedule):
  """The probability-flow ODE for Gaussian data is linear: (z_t - alpha_t m) / sqrt(alpha_t^2 s^2 +
  sigma_t^2) stays constant, so the exact end point from z at t = 1 is m + s * that."""
  a, sg = (float(v) for v in schedule.alpha_sigma(1.0))
  m, s = ORACLE.mean, ORACLE.std
  return m + s * (np.asarray(z1) - a * m) / np.sqrt(a * a * s * s + sg * sg)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_gaussian_closed_form_dpm_solver_beats_ddim_at_equal_steps(objective):
  schedule, key, n = D.CosineSchedule(), jax.random.PRNGKey(2), 20
  shape = (4096, 1, 1, 4)
  z1 = process.standard_normal(process.split_key(key)[0], shape)
  exact = _exact_ode_solution(z1, schedule)
  errors = {}
  for sampler, steps in [("ddim", n), ("ddim", 100), ("dpmpp_2m", n), ("dpmpp_3m", n)]:
    x = D.sample(
      ORACLE.model_fn(objective),
      key,
      shape,
      schedule=schedule,
      num_steps=steps,
      objective=objective,
      sampler=sampler,
      thresholding_method="none",
    )
    errors[f"{sampler}@{steps}"] = float(np.sqrt(np.mean((np.asarray(x) - exact) ** 2)))
  # Measured (RMSE against the exact end point): DDIM 3.4e-2 at 20 steps and 7.1e-3 at 100;
  # DPM-Solver++ 2M 2.6e-3 and 3M 6.5e-3 at 20.
  assert errors["dpmpp_2m@20"] < 0.3 * errors["ddim@20"], errors
  assert errors["dpmpp_3m@20"] < 0.3 * errors["ddim@20"], errors
  assert errors["dpmpp_2m@20"] < errors["ddim@100"], errors
  # The distribution, too: DPM-Solver++'s samples have the data's mean and spread.
  x = np.asarray(x).reshape(-1, 4)
  np.testing.assert_allclose(x.std(0) / ORACLE.std, 1.0, atol=0.05)


def test_spacings_closed_forms_and_traced_choice():
  schedule, n = D.CosineSchedule(), 8
  grid = lambda sp: np.array(
    [float(samplers.grid_log_snr(schedule, sp, i, n)) for i in range(n + 1)]
  )
  uniform, logsnr, karras = grid("uniform"), grid("logsnr"), grid("karras")
  np.testing.assert_allclose(uniform[:-1], schedule.log_snr(jnp.arange(n, 0, -1) / n), rtol=1e-6)
  lam_end = float(schedule.log_snr(samplers.T_END_FRACTION))
  np.testing.assert_allclose(logsnr[:-1], np.linspace(-20.0, lam_end, n), rtol=1e-5, atol=1e-5)
  root = np.linspace(np.exp(10.0 / 7), np.exp(-lam_end / 14), n)  # sigma^(1/7), sigma = e^(-lam/2)
  np.testing.assert_allclose(karras[:-1], -14.0 * np.log(root), rtol=1e-5, atol=1e-4)
  assert np.all(np.isinf([uniform[-1], logsnr[-1], karras[-1]]))
  # A traced index gives the same grid: one compiled program serves every spacing.
  traced = jax.jit(lambda sp, i: samplers.grid_log_snr(schedule, sp, i, n))
  for name, ref in [("uniform", uniform), ("logsnr", logsnr), ("karras", karras)]:
    got = [float(traced(samplers.spacing_index(name), i)) for i in range(n + 1)]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_dpm_solver_orders_share_one_compiled_loop():
  traces = []

  def fn(z, log_snr, cond):
    traces.append(1)
    return ORACLE.model_fn("eps")(z, log_snr, cond)

  run = jax.jit(
    lambda order, sde, spacing, n: D.sample(
      fn,
      jax.random.PRNGKey(0),
      (8, 1, 1, 4),
      schedule=D.CosineSchedule(),
      num_steps=n,
      sampler="dpmpp_2m",
      solver_order=order,
      sde=sde,
      spacing=spacing,
      thresholding_method="none",
    )
  )
  a = run(2, 0.0, 0, 12)
  b = run(3, 0.0, 1, 12)
  c = run(2, 1.0, 2, 25)
  assert len(traces) == 1
  assert not np.allclose(a, b) and not np.allclose(a, c)
  with pytest.raises(ValueError, match="unknown step spacing"):
    samplers.check_spacing("cosine")
