"""The trainer's periodic sample grids (`train.sample_every`, `train.sample_hook =
@SampleGridHook()`).

Every N steps a small fixed prompt set, the first rows of the run's first batch (their cached text
embeddings, captions and, for SR stages, low-resolution images), is sampled with the EMA parameters
on the training mesh, written as `MODEL_DIR/samples/step_<step>.png` (prompts under the columns; SR
stages show their low-resolution inputs in a second row) and as a TensorBoard image.
"""

from __future__ import annotations

from typing import Optional

import gin
import jax
import numpy as np
from etils import epath

from imagen_jax import batch_keys as K
from imagen_jax import images as imio
from imagen_jax import models
from imagen_jax.errors import ConfigError
from imagen_jax.sample.settings import StageSettings
from imagen_jax.sample.stage_sampler import StageSampler, image_keys, model_apply_fn


@gin.configurable
class SampleGridHook:
  def __init__(
    self,
    num_prompts: int = 4,
    num_steps: int = 64,
    guidance_scale: float = 3.0,
    thresholding: str = "dynamic",
    aug_level: float = 0.0,
    seed: int = 0,
    sampler: str = StageSettings.sampler,
    spacing: str = StageSettings.spacing,
  ):
    self.settings = StageSettings(
      sampler=sampler,
      spacing=spacing,
      num_steps=num_steps,
      guidance_scale=guidance_scale,
      thresholding=thresholding,
      aug_level=aug_level,
    )
    self.num_prompts = num_prompts
    self.seed = seed
    self.sampler: Optional[StageSampler] = None
    self.written = []

  def prepare(self, *, batch, model_config, diffusion, mesh, null_text=None) -> None:
    """Called by the trainer with its first host batch: fixes the prompts (process 0's, on every
    host)."""
    n = min(self.num_prompts, batch[K.TEXT_MASK].shape[0])
    if K.TEXT_EMB not in batch:
      raise ConfigError(
        "the sample hook needs cached text embeddings (StageDataConfig.embeddings = 'cached')"
      )
    data = {
      K.TEXT_EMB: np.asarray(batch[K.TEXT_EMB][:n], np.float32),
      K.TEXT_MASK: np.asarray(batch[K.TEXT_MASK][:n]),
    }
    sr = models.is_super_resolution(model_config)
    if sr:
      data[K.LOWRES] = np.asarray(batch[K.LOWRES][:n], np.float32)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      data = multihost_utils.broadcast_one_to_all(data)
    self.data = {k: np.asarray(v) for k, v in data.items()}
    captions = batch.get(K.CAPTION)
    self.labels = (
      [c.decode() if isinstance(c, bytes) else str(c) for c in np.asarray(captions)[:n]]
      if captions is not None
      else [f"example {i}" for i in range(n)]
    )
    self.sampler = StageSampler(
      model_apply_fn(models.build_model(model_config)),
      diffusion,
      model_config.image_size,
      super_resolution=sr,
      batch_size=n,
      mesh=mesh,
      channels=models.image_channels(model_config),
      null_text=null_text,
    )
    self.keys = image_keys(self.seed + np.arange(n), 0)

  def __call__(self, *, step: int, state, model_dir: str, write_images=None) -> None:
    x = self.sampler.run(
      state.ema_params,
      self.data[K.TEXT_EMB],
      self.data[K.TEXT_MASK],
      self.keys,
      self.settings,
      lowres=self.data.get(K.LOWRES),
    )
    rows = [list(imio.to_uint8(x))]
    if K.LOWRES in self.data:
      f = x.shape[1] // self.data[K.LOWRES].shape[1]
      rows.append([im.repeat(f, 0).repeat(f, 1) for im in imio.to_uint8(self.data[K.LOWRES])])
    picture = imio.grid(
      rows, self.labels, title=f"step {step}: {self.settings.label(K.LOWRES in self.data)} (EMA)"
    )
    if jax.process_index() == 0:
      path = epath.Path(model_dir) / "samples" / f"step_{step:08d}.png"
      imio.save_png(path, picture)
      self.written.append(str(path))
      if write_images is not None:
        write_images(step, {"samples": picture[None]})
