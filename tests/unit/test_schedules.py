import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from imagen_jax.diffusion import schedules


@pytest.mark.parametrize(
  "schedule",
  [
    D.CosineSchedule(),
    D.LinearSchedule(),
    D.CosineSchedule(-10.0, 12.0),
    D.LinearSchedule(1e-4, 0.02, 100),
    D.DiscreteCosineSchedule(),
  ],
)
def test_variance_preserving_and_strictly_decreasing(schedule):
  t = jnp.linspace(0.0, 1.0, 10001)
  alpha, sigma = schedule.alpha_sigma(t)
  np.testing.assert_allclose(np.asarray(alpha**2 + sigma**2), 1.0, atol=1e-6)
  lam = np.asarray(schedule.log_snr(t), np.float64)
  assert np.all(np.isfinite(lam))
  # Strictly decreasing wherever the log-SNR is not clipped at its maximum.
  inner = lam[1:] < schedule.logsnr_max
  assert np.all(np.diff(lam)[inner] < 0)
  assert np.sum(lam >= schedule.logsnr_max) <= 1  # only t = 0 may sit at the clip


def test_cosine_matches_closed_form_and_clip_range():
  s = D.CosineSchedule()
  np.testing.assert_allclose(float(s.log_snr(0.0)), 20.0, rtol=1e-5)
  np.testing.assert_allclose(float(s.log_snr(1.0)), -20.0, rtol=1e-6)
  # Away from the clipped ends, alpha_t = cos(pi t / 2) (the clipping moves t by about 1e-4).
  t = np.linspace(0.05, 0.95, 91)
  alpha, sigma = s.alpha_sigma(jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(alpha), np.cos(np.pi * t / 2), atol=2e-4)
  np.testing.assert_allclose(np.asarray(sigma), np.sin(np.pi * t / 2), atol=2e-4)


@pytest.mark.parametrize("lo,hi", [(-20.0, 20.0), (-10.0, 12.0), (-30.0, 30.0)])
def test_cosine_log_snr_keeps_float32_precision_up_to_t_one(lo, hi):
  """Against float64 at the same float32 t, on a dense grid and at the points samplers start
  from."""
  t = np.concatenate(
    [
      np.linspace(0.0, 1.0, 400_001, dtype=np.float32),
      np.float32([1e-6, 1 - 1e-6, 1 - 2.0**-24, 0.5, np.nextafter(np.float32(0.5), 0), 1.0]),
    ]
  )
  t64 = t.astype(np.float64)
  b = np.arctan(np.exp(-0.5 * hi))
  a = np.arctan(np.exp(-0.5 * lo)) - b
  ref = -2.0 * np.log(np.tan(a * t64 + b))
  got = np.asarray(D.CosineSchedule(lo, hi).log_snr(jnp.asarray(t)), np.float64)
  err = np.abs(got - ref)
  assert err.max() < 1e-5, (t[np.argmax(err)], err.max())
  assert got[-1] == pytest.approx(lo, abs=1e-5) and got[0] == pytest.approx(hi, abs=1e-5)


def test_linear_matches_discrete_ddpm_cumprod():
  s = D.LinearSchedule()  # beta 1e-4 .. 0.02 over 1000 steps, the paper's 256->1024 schedule
  betas = np.linspace(1e-4, 0.02, 1000)
  alpha_bar = np.cumprod(1.0 - betas)  # independent of the schedule's own table
  t = np.arange(1, 1001) / 1000.0
  alpha, _ = s.alpha_sigma(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(np.asarray(alpha, np.float64) ** 2, alpha_bar, rtol=1e-5)
  # In between two discrete times, alpha_bar lies between its neighbours.
  mid, _ = s.alpha_sigma(jnp.asarray((np.arange(1, 1000) + 0.5) / 1000.0, jnp.float32))
  mid2 = np.asarray(mid, np.float64) ** 2
  assert np.all(mid2 <= alpha_bar[:-1] * (1 + 1e-6)) and np.all(mid2 >= alpha_bar[1:] * (1 - 1e-6))


def test_discrete_cosine_equals_diffusers_squaredcos_cap_v2():
  """DeepFloyd IF's training schedule: at t = n / 1000, alpha_bar equals diffusers' DDPMScheduler
  (beta_schedule='squaredcos_cap_v2').alphas_cumprod, an independent implementation."""
  from diffusers import DDPMScheduler

  ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
  alpha, _ = D.DiscreteCosineSchedule().alpha_sigma(jnp.arange(1, 1001, dtype=jnp.float32) / 1000)
  got = np.asarray(alpha, np.float64) ** 2
  np.testing.assert_allclose(got, ref.numpy().astype(np.float64), rtol=2e-5, atol=1e-6)
  assert D.get_schedule("discrete_cosine") == D.DiscreteCosineSchedule()
  record = schedules.schedule_record(D.DiscreteCosineSchedule(num_timesteps=100))
  assert schedules.schedule_from_record(record) == D.DiscreteCosineSchedule(num_timesteps=100)


def test_exact_ends_and_batch_polymorphism():
  s = D.CosineSchedule()
  a, sg = s.alpha_sigma_exact_ends(jnp.array([0.0, 1.0]))
  assert a.tolist() == [1.0, 0.0] and sg.tolist() == [0.0, 1.0]
  t = jnp.full((3, 5), 0.3)
  assert s.log_snr(t).shape == (3, 5)
  assert s.log_snr(t).dtype == jnp.float32


def test_bad_schedule_arguments_are_clear():
  with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
    D.CosineSchedule(5.0, -5.0)
  with pytest.raises(ValueError, match="beta_start < beta_end"):
    D.LinearSchedule(0.02, 1e-4)
  with pytest.raises(ValueError, match="unknown noise schedule"):
    D.get_schedule("quadratic")
  assert isinstance(D.get_schedule("linear"), D.LinearSchedule)
