"""Cascade sampling: jitted, sharded batch sampling of trained stages (`imagen-jax sample`),
settings sweeps, img2img, and the trainer's periodic sample grids. Imports without TensorFlow."""

from imagen_jax.sample.settings import SettingsError, StageSettings
from imagen_jax.sample.stage_sampler import RunStats, StageSampler, image_keys, model_apply_fn
