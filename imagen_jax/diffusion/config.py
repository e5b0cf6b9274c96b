"""Per-stage diffusion settings (gin-configurable) and the jitted sampler built from them.

Defaults are the paper's base-stage choices (docs/paper.md §2); the stage files in
`gin_configs/diffusion/` override what differs per stage (schedule, guidance weight).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import gin
import jax
import jax.numpy as jnp

from imagen_jax.diffusion import augmentation, guidance, losses, process, samplers, thresholding
from imagen_jax.diffusion.schedules import (CosineSchedule, NoiseSchedule, get_schedule, schedule_from_record,
                                            schedule_record)
from imagen_jax.errors import ConfigError

# What a sampler must reproduce of how a stage was trained (the rest of DiffusionConfig are sampling choices
# or training-only settings).
TRAINED_FIELDS = ("objective", "schedule", "noise_aug_schedule")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Everything the diffusion core needs for one cascade stage. Hashable: a static jit argument."""
  schedule: NoiseSchedule = CosineSchedule()
  objective: str = "eps"                     # eps | x0 | v
  loss_weighting: str = "uniform"            # uniform | min_snr
  min_snr_gamma: float = 5.0
  cond_drop_prob: float = 0.1                # text -> null condition, per example, in training
  low_discrepancy_time: bool = False
  sampler: str = "ddpm"                      # ddpm (ancestral) | ddim
  num_sampling_steps: int = 256
  ddim_eta: float = 0.0
  guidance_scale: float = 1.35               # w; 1 = unguided (one network call)
  thresholding: str = "dynamic"              # none | static | dynamic
  dynamic_percentile: float = 99.5
  # Noise-conditioning augmentation (super-resolution stages only).
  noise_aug_schedule: NoiseSchedule = CosineSchedule()
  train_aug_level_range: Tuple[float, float] = (0.0, 1.0)
  sample_aug_level: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "schedule", get_schedule(self.schedule))
    object.__setattr__(self, "noise_aug_schedule", get_schedule(self.noise_aug_schedule))
    object.__setattr__(self, "train_aug_level_range", tuple(float(v) for v in self.train_aug_level_range))
    process.check_objective(self.objective)
    losses.check_weighting(self.loss_weighting)
    samplers.check_sampler(self.sampler)
    thresholding.check_thresholding(self.thresholding)
    if not 0.0 <= self.cond_drop_prob <= 1.0:
      raise ConfigError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
    if not 0.0 < self.dynamic_percentile <= 100.0:
      raise ConfigError(f"dynamic_percentile must be in (0, 100], got {self.dynamic_percentile}")
    if not 0.0 <= self.ddim_eta <= 1.0:
      raise ConfigError(f"ddim_eta must be in [0, 1], got {self.ddim_eta}")
    if self.num_sampling_steps < 1:
      raise ConfigError(f"num_sampling_steps must be >= 1, got {self.num_sampling_steps}")
    if not 0.0 <= self.sample_aug_level <= 1.0:
      raise ConfigError(f"sample_aug_level must be in [0, 1], got {self.sample_aug_level}")

  def training_record(self) -> dict:
    """TRAINED_FIELDS as JSON: the trainer writes them to run.json, a sampler reads them back."""
    return {"objective": self.objective, "schedule": schedule_record(self.schedule),
            "noise_aug_schedule": schedule_record(self.noise_aug_schedule)}

  @classmethod
  def from_training_record(cls, record: dict, **sampling) -> "DiffusionConfig":
    """The config a stage trained with (its `training_record`), with sampling settings from `sampling`."""
    return cls(objective=record["objective"], schedule=schedule_from_record(record["schedule"]),
               noise_aug_schedule=schedule_from_record(record["noise_aug_schedule"]), **sampling)

  def loss(self, model_fn, x, cond, key):
    return losses.diffusion_loss(
        model_fn, x, cond, key, schedule=self.schedule, objective=self.objective,
        weighting=self.loss_weighting, min_snr_gamma=self.min_snr_gamma,
        cond_drop_prob=self.cond_drop_prob, low_discrepancy=self.low_discrepancy_time)

  def augment_lowres_for_training(self, lowres, key):
    """Noise-conditioning augmentation in training: a random level per example from train_aug_level_range.
    Returns (augmented low-res image, levels (B,))."""
    return augmentation.noise_augment_random(lowres, key, self.noise_aug_schedule, self.train_aug_level_range)

  def augment_lowres_for_sampling(self, lowres, key, aug_level=None):
    """Noise-conditioning augmentation at sampling: the level is `sample_aug_level` (or the given one, e.g.
    a sweep's), never a random one. Returns (augmented low-res image, levels (B,))."""
    level = self.sample_aug_level if aug_level is None else aug_level
    return augmentation.noise_augment(lowres, key, self.noise_aug_schedule, level)

  def sample(self, model_fn, key, shape, cond=None, *, num_steps=None, guidance_scale=None,
             return_trajectory=False, z_init=None):
    return samplers.sample(
        model_fn, key, shape, cond, schedule=self.schedule,
        num_steps=self.num_sampling_steps if num_steps is None else num_steps,
        objective=self.objective, sampler=self.sampler, ddim_eta=self.ddim_eta,
        guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
        thresholding_method=self.thresholding, percentile=self.dynamic_percentile,
        return_trajectory=return_trajectory, z_init=z_init)


class JittedSampler:
  """One compiled sampler per (network, config, shape, guided-or-not).

  `apply_fn(params, z, log_snr, cond)` is the network. The step count and the guidance weight are
  traced arguments, so changing either does not recompile; only switching between w = 1 (one
  network call) and w != 1 (doubled batch) does.
  """

  def __init__(self, apply_fn: Callable[..., Any], config: DiffusionConfig):
    self.apply_fn = apply_fn
    self.config = config
    self.trace_count = 0      # times the loop was traced, i.e. compiled (or fetched from the compile cache)
    self._jitted = jax.jit(self._run, static_argnames=("shape", "guided"))

  def _run(self, params, cond, key, num_steps, guidance_scale, *, shape, guided):
    self.trace_count += 1     # runs at trace time only
    model_fn = functools.partial(self.apply_fn, params)
    return self.config.sample(model_fn, key, shape, cond, num_steps=num_steps,
                              guidance_scale=guidance_scale if guided else 1.0)

  def __call__(self, params, key, shape, cond=None, *, num_steps: Optional[int] = None,
               guidance_scale: Optional[float] = None):
    w = self.config.guidance_scale if guidance_scale is None else guidance_scale
    n = self.config.num_sampling_steps if num_steps is None else num_steps
    guided = not guidance.is_unguided(w) and cond is not None
    return self._jitted(params, cond, key, jnp.asarray(n, jnp.int32), jnp.asarray(w, jnp.float32),
                        shape=tuple(shape), guided=guided)
