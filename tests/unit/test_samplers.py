"""Samplers: the Gaussian oracle, DDIM(eta=1) = ancestral, determinism, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from tests.helpers import GaussianOracle

ORACLE = GaussianOracle(mean=[0.5, -0.3, 0.0, 0.6], std=[0.3, 0.5, 0.4, 0.35])


@pytest.mark.parametrize(
  "sampler,eta,objective,schedule",
  [
    ("ddpm", 0.0, "eps", D.CosineSchedule()),
    ("ddim", 0.0, "v", D.CosineSchedule()),
    ("ddpm", 0.0, "x0", D.LinearSchedule()),
    ("ddim", 0.0, "eps", D.LinearSchedule()),
  ],
)
def test_oracle_denoiser_reproduces_data_mean_and_variance(sampler, eta, objective, schedule):
  n, steps = 32768, 1000
  fn = jax.jit(
    lambda key: D.sample(
      ORACLE.model_fn(objective),
      key,
      (n, 1, 1, 4),
      None,
      schedule=schedule,
      num_steps=steps,
      objective=objective,
      sampler=sampler,
      ddim_eta=eta,
      guidance_scale=1.0,
      thresholding_method="none",
    )
  )
  x = np.asarray(fn(jax.random.PRNGKey(0)), np.float64).reshape(n, 4)
  # Statistical tolerance (about 4 standard errors) plus the 1000-step discretisation bias (< 1.5%).
  np.testing.assert_allclose(x.mean(0), ORACLE.mean, atol=float(4 * ORACLE.std.max() / np.sqrt(n)))
  np.testing.assert_allclose(x.std(0) / ORACLE.std, 1.0, atol=4 / np.sqrt(2 * n) + 0.015)


def test_oracle_sampler_is_not_fooled_by_a_wrong_denoiser():
  # The same check fails for a denoiser that believes the data is twice as wide.
  wrong = GaussianOracle(ORACLE.mean, 2 * ORACLE.std)
  x = D.sample(
    wrong.model_fn("eps"),
    jax.random.PRNGKey(0),
    (8192, 1, 1, 4),
    None,
    schedule=D.CosineSchedule(),
    num_steps=200,
    objective="eps",
    thresholding_method="none",
  )
  ratio = np.asarray(x).reshape(-1, 4).std(0) / ORACLE.std
  assert np.all(ratio > 1.6)


def test_ddim_eta_one_is_the_ancestral_sampler():
  kw = dict(schedule=D.CosineSchedule(), num_steps=20, objective="eps", thresholding_method="none")
  key = jax.random.PRNGKey(3)
  a = D.sample(ORACLE.model_fn(), key, (64, 1, 1, 4), None, sampler="ddpm", **kw)
  b = D.sample(ORACLE.model_fn(), key, (64, 1, 1, 4), None, sampler="ddim", ddim_eta=1.0, **kw)
  c = D.sample(ORACLE.model_fn(), key, (64, 1, 1, 4), None, sampler="ddim", ddim_eta=0.0, **kw)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(a - c).max()) > 1e-2


def test_ancestral_update_matches_textbook_posterior():
  # q(z_s | z_t, x0) in the alpha/sigma form of Ho et al. (2020), written independently.
  sched = D.LinearSchedule()
  t, s = 0.7, 0.6
  at, st = (float(v) for v in sched.alpha_sigma(t))
  as_, ss = (float(v) for v in sched.alpha_sigma(s))
  ats = at / as_
  sts2 = st**2 - ats**2 * ss**2
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  z = jax.random.normal(k[0], (2, 3, 3, 1))
  x0 = jax.random.normal(k[1], (2, 3, 3, 1))
  noise = jax.random.normal(k[2], (2, 3, 3, 1))
  mean = ats * ss**2 / st**2 * z + as_ * sts2 / st**2 * x0
  std = np.sqrt(sts2 * ss**2 / st**2)
  out = D.ancestral_update(
    z, x0, sched.log_snr(jnp.full((2,), t)), sched.log_snr(jnp.full((2,), s)), noise
  )
  np.testing.assert_allclose(out, mean + std * noise, rtol=1e-4, atol=1e-5)


def test_deterministic_per_key_and_trajectory():
  kw = dict(schedule=D.CosineSchedule(), objective="eps", thresholding_method="dynamic")
  key = jax.random.PRNGKey(11)
  a = D.sample(ORACLE.model_fn(), key, (4, 2, 2, 4), None, num_steps=10, **kw)
  b = D.sample(ORACLE.model_fn(), key, (4, 2, 2, 4), None, num_steps=10, **kw)
  c = D.sample(ORACLE.model_fn(), jax.random.PRNGKey(12), (4, 2, 2, 4), None, num_steps=10, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  out, traj = D.sample(
    ORACLE.model_fn(), key, (4, 2, 2, 4), None, num_steps=10, return_trajectory=True, **kw
  )
  assert traj["z"].shape == (11, 4, 2, 2, 4) and traj["x0"].shape == (10, 4, 2, 2, 4)
  np.testing.assert_allclose(out, a, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(traj["z"][-1], out)
  np.testing.assert_array_equal(traj["x0"][-1], out)  # the last step returns x0 exactly
  # Dynamic thresholding keeps every x0 prediction in [-1, 1].
  assert float(jnp.abs(traj["x0"]).max()) <= 1.0 + 1e-6


def _one_device_sampler(apply_fn, diffusion, image_size, channels):
  from imagen_jax import partitioning
  from imagen_jax.sample.stage_sampler import StageSampler

  return StageSampler(
    apply_fn,
    diffusion,
    image_size,
    super_resolution=False,
    batch_size=8,
    mesh=partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1]),
    channels=channels,
  )


def test_sampler_compiles_once_whatever_the_step_count_and_guidance():
  """The one sampler (sample.stage_sampler.StageSampler): step count and guidance weight are
  traced arguments."""
  from imagen_jax.sample.settings import StageSettings
  from imagen_jax.sample.stage_sampler import image_keys

  traces = []

  def apply_fn(params, z, log_snr, cond):
    traces.append(z.shape[0])
    m = cond[D.TEXT_MASK].astype(jnp.float32).mean(1)
    return params["scale"] * z * (1.0 + m)[:, None, None, None]

  sampler = _one_device_sampler(apply_fn, D.DiffusionConfig(), 4, 3)
  params = {"scale": jnp.float32(0.5)}
  emb, mask, keys = np.ones((2, 3, 4), np.float32), np.ones((2, 3), bool), image_keys([0, 1], 0)
  run = lambda n, w, guided=True: sampler.run(
    params, emb, mask, keys, StageSettings(num_steps=n, guidance_scale=w), guided=guided
  )
  outs = [run(n, 3.0) for n in (2, 5, 17)] + [run(5, 1.5)]
  assert sampler.trace_count == 1
  assert traces == [4]  # one traced network call on the doubled batch, not one per step
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[3])
  # w = 1 unguided: a second program with a single, unguided network call.
  run(3, 1.0, guided=False)
  assert sampler.trace_count == 2 and traces == [4, 2]


def test_jitted_sampler_equals_the_pure_function():
  from imagen_jax.diffusion import process
  from imagen_jax.sample.settings import StageSettings
  from imagen_jax.sample.stage_sampler import image_keys

  apply_fn = lambda params, z, log_snr, cond: ORACLE.model_fn("v")(z, log_snr, cond) * params
  cfg = D.DiffusionConfig(objective="v")
  keys = image_keys(range(8), 0)
  setting = StageSettings(sampler="ddim", num_steps=12, guidance_scale=1.0, thresholding="static")
  got = _one_device_sampler(apply_fn, cfg, 1, 4).run(
    jnp.float32(1.0), np.zeros((8, 2, 3), np.float32), np.ones((8, 2), bool), keys, setting
  )
  _, k_sample = process.split_key(jnp.asarray(keys))  # the sampler's own split of each image's key
  ref = D.sample(
    ORACLE.model_fn("v"),
    k_sample,
    (8, 1, 1, 4),
    schedule=cfg.schedule,
    num_steps=12,
    objective="v",
    sampler="ddim",
    guidance_scale=1.0,
    thresholding_method="static",
  )
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_bad_sampler_arguments():
  with pytest.raises(ValueError, match="unknown sampler"):
    D.sample(
      ORACLE.model_fn(),
      jax.random.PRNGKey(0),
      (1, 1, 1, 4),
      schedule=D.CosineSchedule(),
      num_steps=2,
      sampler="euler",
    )
  with pytest.raises(ValueError, match="Python int"):
    D.sample(
      ORACLE.model_fn(),
      jax.random.PRNGKey(0),
      (1, 1, 1, 4),
      schedule=D.CosineSchedule(),
      num_steps=jnp.int32(2),
      return_trajectory=True,
    )


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_thresholded_x0_and_eps_stay_a_consistent_pair(method):
  # A network whose x0 prediction is far outside [-1, 1]: after thresholding, eps must be re-derived
  # from the clipped x0 (DDIM's update uses both), i.e. z = alpha x0 + sigma eps still holds.
  z = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  log_snr = jnp.array([-1.0, 0.5, 2.0])
  x0, eps = D.samplers.denoise(
    lambda z, l, c: -0.2 * z,
    z,
    log_snr,
    None,
    objective="eps",
    guidance_scale=1.0,
    thresholding_method=method,
    percentile=99.5,
  )
  alpha, sigma = D.alpha_sigma_from_log_snr(log_snr)
  assert float(jnp.abs(x0).max()) <= 1.0 + 1e-6
  np.testing.assert_allclose(D.diffuse(x0, eps, alpha, sigma), z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_value", [1.5, 1.0])
def test_learned_range_step_with_thresholding_equals_diffusers_ddpm_scheduler(max_value):
  """DeepFloyd IF's sampling step: given the same model output (eps + variance channels) and noise,
  our x0 (dynamic thresholding at percentile 95 with IF's upper bound) and learned-range ancestral
  step equal diffusers' DDPMScheduler(variance_type='learned_range', thresholding=True) step by
  step over a 10-step schedule on the discrete cosine schedule."""
  import torch
  from diffusers import DDPMScheduler

  ref = DDPMScheduler(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    variance_type="learned_range",
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
    sample_max_value=max_value,
    prediction_type="epsilon",
  )
  ref.set_timesteps(10)
  schedule = D.DiscreteCosineSchedule()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)  # diffusers' NCHW
  ours = x.transpose(0, 2, 3, 1)
  steps = [int(t) for t in ref.timesteps]
  for i, t in enumerate(steps):
    prev = steps[i + 1] if i + 1 < len(steps) else -1
    out = rng.standard_normal((2, 6, 8, 8)).astype(np.float32) * np.float32(1.5)
    out[:, 3:] = np.tanh(out[:, 3:])  # the variance channels in [-1, 1]
    gen = torch.Generator().manual_seed(i)  # diffusers draws its noise from this
    want_noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(i))
    step = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=gen)
    x = step.prev_sample.numpy()
    noise = want_noise.numpy().transpose(0, 2, 3, 1)
    # ours, NHWC, alpha_bar from the continuous schedule at the discrete points (step n at t = n/N)
    abar = lambda k: np.full(  # noqa: E731
      (2,), 1.0 if k < 0 else float(schedule.alpha_sigma((k + 1) / 1000)[0]) ** 2, np.float32
    )
    eps, frac = out[:, :3].transpose(0, 2, 3, 1), out[:, 3:].transpose(0, 2, 3, 1)
    a_t = abar(t)
    x0 = (ours - np.sqrt(1 - a_t)[:, None, None, None] * eps) / np.sqrt(a_t)[:, None, None, None]
    x0 = D.dynamic_threshold(jnp.asarray(x0), 95.0, max_value)
    np.testing.assert_allclose(
      np.asarray(x0), step.pred_original_sample.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )
    ours = np.asarray(D.learned_range_update(jnp.asarray(ours), x0, frac, a_t, abar(prev), noise))
    np.testing.assert_allclose(ours, x.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


def test_if_step_sets_and_diffusers_spacings_are_diffusers_timesteps():
  """IF's named step sets (improved DDPM's section respacing) equal diffusers' lists, and the
  'leading' / 'trailing' / 'linspace' spacings equal DDPMScheduler's timesteps."""
  import diffusers
  from diffusers.pipelines.deepfloyd_if import timesteps as if_timesteps

  from imagen_jax.diffusion import samplers

  for name in samplers.STEP_SETS:
    assert list(samplers.parse_timesteps(name)) == list(getattr(if_timesteps, f"{name}_timesteps"))
  for spacing in samplers.DISCRETE_SPACINGS:
    for n in (1, 7, 27, 50, 100):
      sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
      sched.set_timesteps(n)
      ours = samplers.discrete_timesteps(spacing, n, 1000)
      assert list(ours) == [int(t) for t in sched.timesteps], (spacing, n)
  assert list(samplers.parse_timesteps("sections:2,1", 10)) == [5, 4, 0]
  assert list(samplers.parse_timesteps("999, 500,0")) == [999, 500, 0]
  for bad in ("500,999", "1000,0", "smart12", "", "sections:7,1"):
    with pytest.raises(ValueError):
      samplers.parse_timesteps(bad, 10 if bad.startswith("sections") else 1000)
