"""Evaluation during training: `ShapesEvalHook` scores a base stage's EMA parameters every N steps
on held-out synthetic captions (a scene seed the training data never used) and logs the alignment
to the run's writers (`eval/colour`, `eval/count`, ...) and to MODEL_DIR/eval/shapes.jsonl.

    train.eval_every = 200
    train.eval_hook = @ShapesEvalHook()
    ShapesEvalHook.vocab = 'out/demo/spiece.model'
    ShapesEvalHook.encoder = 'out/demo/t5'

For runs on real data, `imagen-jax eval fid` / `eval clip` score a finished checkpoint against a
reference folder (they need the Inception / CLIP weights the user provides).
"""

from __future__ import annotations

import json
import time
from typing import Optional

import gin
import jax
import numpy as np
from etils import epath

from imagen_jax import batch_keys as K
from imagen_jax import images as imio
from imagen_jax import models
from imagen_jax.errors import ConfigError
from imagen_jax.eval.tasks.shapes_eval import held_out_scenes, score_images
from imagen_jax.sample.settings import StageSettings
from imagen_jax.sample.stage_sampler import StageSampler, image_keys, model_apply_fn

METRICS = {
  "all": "all",
  "colour": "color",
  "count": "count",
  "shape": "shape",
  "left_right": "relation",
  "fidelity": "fidelity",
}


@gin.configurable
class ShapesEvalHook:
  """Held-out shapes alignment of the EMA parameters (see the module docstring).

  Args:
    vocab: the run's sentencepiece model.
    encoder: the run's T5 encoder checkpoint (the one its cache was made with).
    num_prompts: held-out captions scored each time.
    scene_seed: their scene seed (not the training data's).
    guidance_scale: classifier-free guidance weight.
    thresholding: 'none', 'static' or 'dynamic'.
    num_steps: sampler steps.
    sampler: the sampler.
    seed: the noise seed (the same every time, so the curve follows the network, not the noise).
    progress: print one line per evaluation.
  """

  def __init__(
    self,
    vocab: str = gin.REQUIRED,
    encoder: str = gin.REQUIRED,
    num_prompts: int = 32,
    scene_seed: int = 1000,
    guidance_scale: float = 3.0,
    thresholding: str = "dynamic",
    num_steps: int = 25,
    sampler: str = "dpmpp_2m_sde",
    seed: int = 0,
    progress: bool = True,
  ):
    self.progress = progress
    self.vocab, self.encoder = vocab, encoder
    self.num_prompts, self.scene_seed, self.seed = num_prompts, scene_seed, seed
    self.settings = StageSettings(
      sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, thresholding=thresholding
    )
    self.history = []

  def prepare(self, *, batch, model_config, diffusion, mesh) -> None:
    """Called by the trainer with its first batch: encodes the held-out captions at the batch's
    text length and builds the sampler."""
    from imagen_jax.text.encoder import encode_prompts

    if models.is_super_resolution(model_config):
      raise ConfigError(
        "ShapesEvalHook scores a base stage; this run trains a super-resolution one"
      )
    if K.TEXT_EMB not in batch:
      raise ConfigError("ShapesEvalHook needs cached text embeddings (StageDataConfig.embeddings)")
    self.captions = [s.caption for s in held_out_scenes(self.scene_seed, 0, self.num_prompts)]
    enc = encode_prompts(self.captions, self.vocab, self.encoder, batch[K.TEXT_EMB].shape[1])
    self.emb, self.mask = np.asarray(enc.emb, np.float32), np.asarray(enc.mask)
    self.sampler = StageSampler(
      model_apply_fn(models.build_model(model_config)),
      diffusion,
      model_config.image_size,
      super_resolution=False,
      batch_size=self.num_prompts,
      mesh=mesh,
      channels=model_config.out_channels,
    )
    self.keys = image_keys(self.seed + np.arange(self.num_prompts), 0)

  def __call__(self, *, step: int, state, model_dir: str, write_scalars=None) -> Optional[dict]:
    t0 = time.perf_counter()
    x = self.sampler.run(state.ema_params, self.emb, self.mask, self.keys, self.settings)
    overall = score_images(imio.to_uint8(x), self.captions)["overall"]
    scalars = {f"eval/{name}": float(overall[key]) for name, key in METRICS.items()}
    self.history.append((step, scalars))
    if jax.process_index() == 0:
      if write_scalars is not None:
        write_scalars(step, scalars)
      if self.progress:
        shown = " ".join(f"{k} {v:.3f}" for k, v in scalars.items())
        print(
          f"eval step {step}: {self.num_prompts} held-out captions, "
          f"{self.settings.label(False)}: {shown.replace('eval/', '')} "
          f"({time.perf_counter() - t0:.1f}s)",
          flush=True,
        )
      path = epath.Path(model_dir) / "eval" / "shapes.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("a") as f:
        f.write(json.dumps({"step": step, "setting": self.settings.label(False), **scalars}) + "\n")
    return scalars
