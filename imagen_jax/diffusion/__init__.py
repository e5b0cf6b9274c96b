"""The diffusion core: small pure functions of log-SNR, jittable and batch-polymorphic.

Never imports TensorFlow (lent GPU machines have none).
"""

from imagen_jax.diffusion import samplers
from imagen_jax.diffusion.augmentation import noise_augment, noise_augment_random, sample_aug_levels
from imagen_jax.diffusion.config import DiffusionConfig
from imagen_jax.diffusion.guidance import (
  LOWRES,
  LOWRES_AUG_LEVEL,
  TEXT_EMB,
  TEXT_MASK,
  drop_condition,
  guided_x0_eps,
  negative_condition,
  null_condition,
)
from imagen_jax.diffusion.losses import diffusion_loss, loss_weight, sample_times
from imagen_jax.diffusion.process import (
  OBJECTIVES,
  diffuse,
  eps_from_v,
  eps_from_x0,
  prediction_to_x0_eps,
  target_for_objective,
  v_from_eps,
  v_from_x0,
  v_from_x0_eps,
  x0_from_eps,
  x0_from_v,
)
from imagen_jax.diffusion.samplers import (
  ancestral_update,
  ddim_update,
  dpmpp_update,
  learned_range_update,
  sample,
)
from imagen_jax.diffusion.schedules import (
  SCHEDULES,
  CosineSchedule,
  DiscreteCosineSchedule,
  LinearSchedule,
  NoiseSchedule,
  alpha_sigma_from_log_snr,
  get_schedule,
)
from imagen_jax.diffusion.thresholding import dynamic_threshold, static_threshold, threshold
