"""Noise-conditioning augmentation for super-resolution stages (Imagen section 2.5; Ho et al. 2021).

The low-resolution conditioning image is corrupted with the forward process at an augmentation
level in [0, 1] (a time of `schedule`): random per example in training, a chosen value at sampling
(0 gives the best FID in the paper, 0.1-0.3 the best-looking samples). The network is conditioned on
the level. Level 0 leaves the image exactly unchanged and level 1 is exactly pure noise.

Where the noise is added (`DiffusionConfig.noise_aug_at`): 'output' (the default) first upsamples
the image (bilinear) to the stage's output size and adds independent noise per output pixel, as
imagen-pytorch and DeepFloyd IF do, so a level means what it means to the stage's own diffusion;
'input' noises the low-resolution pixels (the network then upsamples them, which spreads each noise
sample over a factor x factor patch: spatially correlated, per-pixel variance about 0.39 sigma^2 at
factor 2 after bilinear upsampling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process
from imagen_jax.diffusion.schedules import NoiseSchedule
from imagen_jax.errors import ConfigError


def sample_aug_levels(key, batch_size: int, level_range=(0.0, 1.0)):
  lo, hi = level_range
  if not 0.0 <= lo <= hi <= 1.0:
    raise ConfigError(
      f"augmentation level range must satisfy 0 <= lo <= hi <= 1, got {level_range}"
    )
  return jax.random.uniform(key, (batch_size,), jnp.float32, lo, hi)


def upsample(lowres, size: int, align_corners: bool = False):
  """(B, s, s, C) -> (B, size, size, C), bilinear (the identity when already at size).

  Args:
    lowres: the images.
    size: the output size.
    align_corners: False: half-pixel centres (jax.image.resize, antialiased); True: corner centres
      aligned, as DeepFloyd IF upsamples its stage II input (F.interpolate(align_corners=True)).

  Returns:
    The upsampled images, float32.
  """
  lowres = jnp.asarray(lowres, jnp.float32)
  b, h, w, c = lowres.shape
  if (h, w) == (size, size):
    return lowres
  if align_corners:
    from imagen_jax.images import bilinear_matrix

    mh, mw = bilinear_matrix(h, size, "align_corners"), bilinear_matrix(w, size, "align_corners")
    return jnp.einsum("oh,bhwc,pw->bopc", mh, lowres, mw, precision=jax.lax.Precision.HIGHEST)
  return jax.image.resize(lowres, (b, size, size, c), method="bilinear")


def discrete_noise_level(noise_level, num_timesteps: int = 1000):
  """A discrete noise level n of a DDPM with num_timesteps steps (DeepFloyd IF stage II's
  `noise_level`, 250 by default) as this package's augmentation level: alpha_bar of step n is the
  discrete schedule's value after n + 1 steps, i.e. at t = (n + 1) / num_timesteps
  (`schedules.DiscreteCosineSchedule`)."""
  return (jnp.asarray(noise_level, jnp.float32) + 1.0) / num_timesteps


def noise_augment(lowres, key, schedule: NoiseSchedule, aug_level, size=None, align_corners=False):
  """The low-res image corrupted by the forward process at `aug_level` (a scalar or a (B,) array;
  there is no default: sampling must say which level it uses).

  Args:
    lowres: (B, s, s, C) in [-1, 1].
    key: a PRNG key, or one per example (B, 2).
    schedule: the augmentation's noise schedule (level -> alpha, sigma).
    aug_level: the level, a scalar or (B,).
    size: upsample to size x size (bilinear) before adding the noise; None: noise at s x s.
    align_corners: the upsampling's pixel grid (`upsample`).

  Returns:
    (augmented image, per-example level of shape (B,)).
  """
  lowres = jnp.asarray(lowres, jnp.float32)
  if size is not None:
    lowres = upsample(lowres, int(size), align_corners)
  level = jnp.broadcast_to(jnp.asarray(aug_level, jnp.float32), (lowres.shape[0],))
  alpha, sigma = schedule.alpha_sigma_exact_ends(level)
  eps = process.standard_normal(key, lowres.shape)  # a key, or one key per example (B, 2)
  return process.diffuse(lowres, eps, alpha, sigma), level


def noise_augment_random(
  lowres, key, schedule: NoiseSchedule, level_range=(0.0, 1.0), size=None, align_corners=False
):
  """Training: a level drawn uniformly from level_range per example, then `noise_augment` at it
  (upsampled to `size` first when given)."""
  k_level, k_noise = jax.random.split(key)
  level = sample_aug_levels(k_level, jnp.shape(lowres)[0], level_range)
  return noise_augment(lowres, k_noise, schedule, level, size, align_corners)
