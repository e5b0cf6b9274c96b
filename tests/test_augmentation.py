import jax
import numpy as np
import pytest

from imagen_jax import diffusion as D


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
  out, level = D.noise_augment(x, jax.random.PRNGKey(4), D.CosineSchedule(), level_range=(0.0, 0.5))
  level = np.asarray(level)
  assert level.shape == (512,) and level.min() >= 0 and level.max() <= 0.5
  assert len(np.unique(level)) > 500 and abs(level.mean() - 0.25) < 0.03
  # The least-augmented example is closest to its clean image.
  err = np.abs(np.asarray(out) - np.asarray(x)).mean((1, 2, 3))
  assert np.argmin(err) == np.argmin(level)
  with pytest.raises(ValueError, match="augmentation level range"):
    D.sample_aug_levels(jax.random.PRNGKey(0), 2, (0.5, 2.0))
