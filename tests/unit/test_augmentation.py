import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from imagen_jax.errors import ConfigError


def _img(b=64):
  return jax.random.uniform(jax.random.PRNGKey(0), (b, 8, 8, 3), minval=-1, maxval=1)


def test_level_zero_is_unchanged():
  x = _img()
  out, level = D.noise_augment(x, jax.random.PRNGKey(1), D.CosineSchedule(), aug_level=0.0)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(level, np.zeros(64))


@pytest.mark.parametrize("schedule", [D.CosineSchedule(), D.LinearSchedule()])
def test_level_one_is_pure_noise(schedule):
  x = _img()
  out, _ = D.noise_augment(x, jax.random.PRNGKey(2), schedule, aug_level=1.0)
  o = np.asarray(out).ravel()
  n = o.size
  assert abs(o.mean()) < 4 / np.sqrt(n) and abs(o.std() - 1) < 4 / np.sqrt(2 * n)
  assert abs(np.corrcoef(o, np.asarray(x).ravel())[0, 1]) < 4 / np.sqrt(n)


def test_intermediate_level_follows_forward_process():
  x = _img(256)
  sched = D.CosineSchedule()
  out, _ = D.noise_augment(x, jax.random.PRNGKey(3), sched, aug_level=0.3)
  alpha, sigma = sched.alpha_sigma(0.3)
  resid = (np.asarray(out) - float(alpha) * np.asarray(x)) / float(sigma)
  assert abs(resid.std() - 1) < 0.02 and abs(resid.mean()) < 0.02


def test_random_levels_per_example_in_range():
  x = _img(512)
  out, level = D.noise_augment_random(
    x, jax.random.PRNGKey(4), D.CosineSchedule(), level_range=(0.0, 0.5)
  )
  level = np.asarray(level)
  assert level.shape == (512,) and level.min() >= 0 and level.max() <= 0.5
  assert len(np.unique(level)) > 500 and abs(level.mean() - 0.25) < 0.03
  # The least-augmented example is closest to its clean image.
  err = np.abs(np.asarray(out) - np.asarray(x)).mean((1, 2, 3))
  assert np.argmin(err) == np.argmin(level)
  with pytest.raises(ValueError, match="augmentation level range"):
    D.sample_aug_levels(jax.random.PRNGKey(0), 2, (0.5, 2.0))


def test_sampling_uses_the_configured_level_never_a_random_one():
  from imagen_jax.sample.settings import StageSettings

  x = _img(32)
  key = jax.random.PRNGKey(5)
  cfg = D.DiffusionConfig(train_aug_level_range=(0.0, 1.0))
  # The sampler augments at its setting's level (StageSampler: noise_augment at settings.aug_level).
  out, level = D.noise_augment(
    x, key, cfg.noise_aug_schedule, StageSettings(aug_level=0.3).aug_level
  )
  np.testing.assert_array_equal(level, np.full(32, 0.3, np.float32))
  # Exactly the forward process at 0.3 with the key's noise: no key spent on drawing a level.
  alpha, sigma = cfg.noise_aug_schedule.alpha_sigma(0.3)
  np.testing.assert_allclose(
    out, alpha * x + sigma * jax.random.normal(key, x.shape), rtol=1e-6, atol=1e-6
  )
  # Level 0 is the untouched image.
  out0, level0 = D.noise_augment(x, key, cfg.noise_aug_schedule, 0.0)
  np.testing.assert_array_equal(out0, x)
  np.testing.assert_array_equal(level0, np.zeros(32))
  # The default setting samples at level 0 (the paper's best-FID setting), whatever the training
  # range.
  np.testing.assert_array_equal(
    D.noise_augment(x, key, cfg.noise_aug_schedule, StageSettings().aug_level)[0], x
  )
  # Training draws random levels from its range, one per example.
  _, train_levels = cfg.augment_lowres_for_training(x, key, x.shape[1])
  assert len(np.unique(np.asarray(train_levels))) == 32
  # The low-level function has no default level to fall back on.
  with pytest.raises(TypeError):
    D.noise_augment(x, key, D.CosineSchedule())


def test_noise_is_added_at_the_output_resolution_by_default():
  # 'output' (the default): upsample first, then independent noise per output pixel, so level l
  # means alpha_l * upsampled + sigma_l * N(0, 1) per pixel, as for the stage's own diffusion.
  x = _img(8)
  key = jax.random.PRNGKey(3)
  cfg = D.DiffusionConfig()
  assert cfg.noise_aug_at == "output"
  out, _ = cfg.augment_lowres(x, key, 0.5, 32)
  assert out.shape == (8, 32, 32, 3)
  alpha, sigma = cfg.noise_aug_schedule.alpha_sigma(0.5)
  up = jax.image.resize(x, (8, 32, 32, 3), "bilinear")
  noise = (np.asarray(out) - alpha * np.asarray(up)) / sigma
  assert abs(noise.std() - 1.0) < 0.02
  neighbour = np.mean(noise[:, :, 1:] * noise[:, :, :-1])
  assert abs(neighbour) < 0.03  # independent neighbours
  # 'input' (runs recorded before the field existed): noise at 8 px, the network upsamples it.
  old = D.DiffusionConfig.from_training_record({**cfg.training_record(), "noise_aug_at": "input"})
  low, _ = old.augment_lowres(x, key, 0.5, 32)
  assert low.shape == x.shape
  legacy = {k: v for k, v in cfg.training_record().items() if k != "noise_aug_at"}
  assert D.DiffusionConfig.from_training_record(legacy).noise_aug_at == "input"
  assert D.DiffusionConfig.from_training_record(cfg.training_record()) == cfg
  with pytest.raises(ConfigError):
    D.DiffusionConfig(noise_aug_at="middle")


def test_deepfloyd_if_stage_ii_noising_equals_diffusers():
  """IF-II's conditioning: bilinear upsampling with aligned corners then the forward process at
  noise level 250 of 1000 on the discrete cosine schedule equal torch's
  F.interpolate(align_corners=True) and diffusers' DDPMScheduler.add_noise with the same noise."""
  import torch
  import torch.nn.functional as F
  from diffusers import DDPMScheduler

  from imagen_jax.diffusion import augmentation

  rng = np.random.default_rng(0)
  low = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)  # NCHW for torch
  noise = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  up_ref = F.interpolate(torch.from_numpy(low), (32, 32), mode="bilinear", align_corners=True)
  sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
  want = sched.add_noise(up_ref, torch.from_numpy(noise), torch.tensor([250, 250])).numpy()
  nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
  up = augmentation.upsample(nhwc(low), 32, align_corners=True)
  np.testing.assert_allclose(np.asarray(up), nhwc(up_ref.numpy()), atol=1e-6)
  level = augmentation.discrete_noise_level(250)
  alpha, sigma = D.DiscreteCosineSchedule().alpha_sigma_exact_ends(jnp.full((2,), level))
  got = D.diffuse(
    up, jnp.asarray(nhwc(noise)), alpha[:, None, None, None], sigma[:, None, None, None]
  )
  np.testing.assert_allclose(np.asarray(got), nhwc(want), atol=2e-6)
  # the default grid (half-pixel centres) is another upsampling
  assert float(jnp.abs(augmentation.upsample(nhwc(low), 32) - up).max()) > 1e-2
