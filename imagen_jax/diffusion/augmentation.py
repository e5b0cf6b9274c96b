"""Noise-conditioning augmentation for super-resolution stages (Imagen section 2.5; Ho et al. 2021).

The low-resolution conditioning image is corrupted with the forward process at an augmentation
level in [0, 1] (a time of `schedule`): random per example in training, a chosen value at sampling
(0 gives the best FID in the paper, 0.1-0.3 the best-looking samples). The network is conditioned on
the level. Level 0 leaves the image exactly unchanged and level 1 is exactly pure noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process
from imagen_jax.diffusion.schedules import NoiseSchedule


def sample_aug_levels(key, batch_size: int, level_range=(0.0, 1.0)):
  lo, hi = level_range
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"augmentation level range must satisfy 0 <= lo <= hi <= 1, got {level_range}")
  return jax.random.uniform(key, (batch_size,), jnp.float32, lo, hi)


def noise_augment(lowres, key, schedule: NoiseSchedule, aug_level=None, level_range=(0.0, 1.0)):
  """Returns (corrupted low-res image, per-example level of shape (B,)).

  aug_level=None draws a level per example uniformly from level_range (training); a scalar or (B,)
  array uses that level (sampling).
  """
  lowres = jnp.asarray(lowres, jnp.float32)
  b = lowres.shape[0]
  k_level, k_noise = jax.random.split(key)
  if aug_level is None:
    level = sample_aug_levels(k_level, b, level_range)
  else:
    level = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32), (b,))
  alpha, sigma = schedule.alpha_sigma_exact_ends(level)
  eps = jax.random.normal(k_noise, lowres.shape, jnp.float32)
  return process.diffuse(lowres, eps, alpha, sigma), level
