"""Per-stage diffusion settings of training (gin-configurable): what a stage's network is trained
for.

Defaults are the paper's base-stage choices (docs/paper.md §2); the stage files in
`gin_configs/diffusion/` override what differs per stage. Sampling settings are not here: one
sampling setting of a stage is a `sample.settings.StageSettings`, taken by the one sampler,
`sample.stage_sampler.StageSampler`.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import gin

from imagen_jax.diffusion import augmentation, losses, process
from imagen_jax.diffusion.schedules import (
  CosineSchedule,
  NoiseSchedule,
  get_schedule,
  schedule_from_record,
  schedule_record,
)
from imagen_jax.errors import ConfigError

# What a sampler must reproduce of how a stage was trained (the rest of DiffusionConfig is training-
# only).
TRAINED_FIELDS = ("objective", "schedule", "noise_aug_schedule", "noise_aug_at")
# Recorded only when set (runs recorded before they existed keep their records).
OPTIONAL_TRAINED_FIELDS = {
  "learned_variance": False,
  "lowres_align_corners": False,
  "null_text": "zeros",
}
NULL_TEXTS = ("zeros", "empty_prompt")
NOISE_AUG_AT = ("output", "input")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """How one cascade stage is trained: schedule, objective, loss weighting, condition dropout and
  (SR stages) noise-conditioning augmentation. Hashable: a static jit argument."""

  schedule: NoiseSchedule = CosineSchedule()
  objective: str = "eps"  # eps | x0 | v
  loss_weighting: str = "uniform"  # uniform | min_snr
  min_snr_gamma: float = 5.0
  cond_drop_prob: float = 0.1  # text -> null condition, per example, in training
  low_discrepancy_time: bool = False
  # Noise-conditioning augmentation (super-resolution stages only).
  noise_aug_schedule: NoiseSchedule = CosineSchedule()
  train_aug_level_range: Tuple[float, float] = (0.0, 1.0)
  # 'output': upsample the low-res image to the output size, then add the noise (imagen-pytorch,
  # DeepFloyd IF); 'input': noise the low-res pixels (runs recorded before this field existed).
  noise_aug_at: str = "output"
  # IF-II upsamples its low-res image with aligned corners (F.interpolate(align_corners=True)).
  lowres_align_corners: bool = False
  # A learned variance (improved DDPM, as DeepFloyd IF): the network outputs 2C channels, the
  # objective's C and the variance fraction v in [-1, 1] of `samplers.learned_range_update`; the
  # first C train with the MSE, the last C with the variational bound's term at t
  # (`losses.vlb_term`, stop-gradient on the mean) weighted by vlb_weight (1.0: improved DDPM's
  # hybrid loss, L_simple + 0.001 L_vlb with L_vlb = 1000 E_t[L_t]; 0: not trained).
  learned_variance: bool = False
  vlb_weight: float = 1.0
  # > 0: training times drawn from the discrete steps t = (n + 1) / N, n = 0 .. N - 1, of a
  # discrete schedule (IF's N = 1000) instead of U(0, 1).
  discrete_timesteps: int = 0
  # The null condition (condition dropout, guidance's unconditional half): 'zeros' (the text zeroed
  # and masked out, Imagen) or 'empty_prompt' (the encoder's embedding of "", DeepFloyd IF, whose
  # U-Net ignores the mask; training reads it from the embedding cache, sampling encodes it).
  null_text: str = "zeros"

  def __post_init__(self):
    object.__setattr__(self, "schedule", get_schedule(self.schedule))
    object.__setattr__(self, "noise_aug_schedule", get_schedule(self.noise_aug_schedule))
    object.__setattr__(
      self, "train_aug_level_range", tuple(float(v) for v in self.train_aug_level_range)
    )
    process.check_objective(self.objective)
    losses.check_weighting(self.loss_weighting)
    if self.noise_aug_at not in NOISE_AUG_AT:
      raise ConfigError(f"noise_aug_at must be one of {NOISE_AUG_AT}, got {self.noise_aug_at!r}")
    if not 0.0 <= self.cond_drop_prob <= 1.0:
      raise ConfigError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
    if self.learned_variance and self.objective != "eps":
      raise ConfigError("learned_variance needs objective='eps' (as improved DDPM and IF)")
    if self.null_text not in NULL_TEXTS:
      raise ConfigError(f"null_text must be one of {NULL_TEXTS}, got {self.null_text!r}")
    if self.vlb_weight < 0 or self.discrete_timesteps < 0:
      raise ConfigError("vlb_weight and discrete_timesteps must be >= 0")

  def training_record(self) -> dict:
    """TRAINED_FIELDS as JSON: the trainer writes them to run.json, a sampler reads them back."""
    return {
      "objective": self.objective,
      "schedule": schedule_record(self.schedule),
      "noise_aug_schedule": schedule_record(self.noise_aug_schedule),
      "noise_aug_at": self.noise_aug_at,
      **{
        k: getattr(self, k)
        for k, default in OPTIONAL_TRAINED_FIELDS.items()
        if getattr(self, k) != default
      },
    }

  @classmethod
  def from_training_record(cls, record: dict) -> "DiffusionConfig":
    """The config a stage trained with (its `training_record`; a record without noise_aug_at is
    from before it existed, when the noise was added at the input resolution)."""
    return cls(
      objective=record["objective"],
      schedule=schedule_from_record(record["schedule"]),
      noise_aug_schedule=schedule_from_record(record["noise_aug_schedule"]),
      noise_aug_at=record.get("noise_aug_at", "input"),
      **{k: record.get(k, default) for k, default in OPTIONAL_TRAINED_FIELDS.items()},
    )

  def loss(self, model_fn, x, cond, key, null_text=None):
    """The stage's training loss (`losses.diffusion_loss`) of a network `model_fn(z, log_snr,
    cond)`; null_text: the (emb (L, D), mask (L,)) dropped conditions take (default zeros)."""
    return losses.diffusion_loss(
      model_fn,
      x,
      cond,
      key,
      schedule=self.schedule,
      objective=self.objective,
      weighting=self.loss_weighting,
      min_snr_gamma=self.min_snr_gamma,
      cond_drop_prob=self.cond_drop_prob,
      low_discrepancy=self.low_discrepancy_time,
      learned_variance=self.learned_variance,
      vlb_weight=self.vlb_weight,
      discrete_timesteps=self.discrete_timesteps,
      null_text=null_text,
    )

  def _aug_size(self, output_size: int):
    return int(output_size) if self.noise_aug_at == "output" else None

  def augment_lowres_for_training(self, lowres, key, output_size: int):
    """Noise-conditioning augmentation in training: a random level per example from
    train_aug_level_range, added where noise_aug_at says. Returns (augmented conditioning image,
    levels (B,))."""
    return augmentation.noise_augment_random(
      lowres,
      key,
      self.noise_aug_schedule,
      self.train_aug_level_range,
      self._aug_size(output_size),
      self.lowres_align_corners,
    )

  def augment_lowres(self, lowres, key, aug_level, output_size: int):
    """Noise-conditioning augmentation at sampling: the given level, added where noise_aug_at
    says. Returns (augmented conditioning image, levels (B,))."""
    return augmentation.noise_augment(
      lowres,
      key,
      self.noise_aug_schedule,
      aug_level,
      self._aug_size(output_size),
      self.lowres_align_corners,
    )
