"""Evaluation during training: hooks that score a base stage's EMA parameters every N steps and log
the metrics to the run's writers and to a JSON-lines file under MODEL_DIR/eval/.

- `ShapesEvalHook`: alignment on held-out synthetic captions (a scene seed the training data never
  used): `eval/colour`, `eval/count`, `eval/shape`, `eval/left_right`, `eval/all`, `eval/fidelity`
  (MODEL_DIR/eval/shapes.jsonl). For runs on the synthetic set.
- `FidClipEvalHook`: FID against reference statistics (or a folder of reference images) and CLIP
  score, for fixed prompts from a file, when the user gives the converted FID Inception weights
  and/or a Hugging Face CLIP folder: `eval/fid`, `eval/clip` (MODEL_DIR/eval/fid_clip.jsonl).

    train.eval_every = 200
    train.eval_hook = @ShapesEvalHook()
    ShapesEvalHook.vocab = 'out/demo/spiece.model'
    ShapesEvalHook.encoder = 'out/demo/t5'

A hook is any object with `prepare(batch=, model_config=, diffusion=, mesh=)` (plus `null_text=`
for stages whose null condition is the empty prompt) and
`__call__(step=, state=, model_dir=, write_scalars=)`.
"""

from __future__ import annotations

import json
import time
from typing import Dict, List, Optional

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


class _SamplingEvalHook:
  """What the evaluation hooks share: fixed prompts encoded once at the batch's text length, one
  compiled sampler, fixed noise (the curve follows the network, not the noise), logging."""

  name = "eval"  # the JSON-lines file under MODEL_DIR/eval/

  def __init__(self, vocab, encoder, sampling: dict, batch_size, seed, progress):
    self.vocab, self.encoder = vocab, encoder
    self.settings = StageSettings(**sampling)  # sampler, num_steps, guidance_scale, thresholding
    self.batch_size, self.seed, self.progress = batch_size, seed, progress
    self.history: List[tuple] = []

  def prompts(self) -> List[str]:
    raise NotImplementedError

  def score(self, images_uint8: np.ndarray) -> Dict[str, float]:
    raise NotImplementedError

  def prepare(self, *, batch, model_config, diffusion, mesh, null_text=None) -> None:
    """Called by the trainer with its first batch: encodes the prompts and builds the sampler."""
    from imagen_jax.text.encoder import encode_prompts

    if models.is_super_resolution(model_config):
      raise ConfigError(f"{type(self).__name__} scores a base stage; this run trains an SR one")
    if K.TEXT_EMB not in batch:
      raise ConfigError(f"{type(self).__name__} needs cached text embeddings")
    self.captions = self.prompts()
    enc = encode_prompts(self.captions, self.vocab, self.encoder, batch[K.TEXT_EMB].shape[1])
    self.emb, self.mask = np.asarray(enc.emb, np.float32), np.asarray(enc.mask)
    n = len(self.captions)
    self.sampler = StageSampler(
      model_apply_fn(models.build_model(model_config)),
      diffusion,
      model_config.image_size,
      super_resolution=False,
      batch_size=min(self.batch_size or n, n),
      mesh=mesh,
      channels=models.image_channels(model_config),
      null_text=null_text,
    )
    self.keys = image_keys(self.seed + np.arange(n), 0)

  def __call__(self, *, step: int, state, model_dir: str, write_scalars=None) -> Dict[str, float]:
    t0 = time.perf_counter()
    x = self.sampler.run(state.ema_params, self.emb, self.mask, self.keys, self.settings)
    self.last_images = imio.to_uint8(x)  # (N, S, S, 3) uint8: what the scores were computed from
    scalars = self.score(self.last_images)
    self.history.append((step, scalars))
    if jax.process_index() == 0:
      if write_scalars is not None:
        write_scalars(step, scalars)
      path = epath.Path(model_dir) / "eval" / f"{self.name}.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("a") as f:
        f.write(json.dumps({"step": step, "setting": self.settings.label(False), **scalars}) + "\n")
      if self.progress:
        shown = " ".join(f"{k.replace('eval/', '')} {v:.3f}" for k, v in scalars.items())
        print(
          f"eval step {step}: {len(self.captions)} prompts, {self.settings.label(False)}: "
          f"{shown} ({time.perf_counter() - t0:.1f}s)",
          flush=True,
        )
    return scalars


@gin.configurable
class ShapesEvalHook(_SamplingEvalHook):
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
    seed: the noise seed.
    batch_size: images per sampler call (None: all at once).
    progress: print one line per evaluation.
  """

  name = "shapes"

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
    batch_size: Optional[int] = None,
    progress: bool = True,
  ):
    sampling = dict(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale)
    super().__init__(
      vocab, encoder, dict(sampling, thresholding=thresholding), batch_size, seed, progress
    )
    self.num_prompts, self.scene_seed = num_prompts, scene_seed

  def prompts(self) -> List[str]:
    return [s.caption for s in held_out_scenes(self.scene_seed, 0, self.num_prompts)]

  def score(self, images_uint8: np.ndarray) -> Dict[str, float]:
    overall = score_images(images_uint8, self.captions)["overall"]
    return {f"eval/{name}": float(overall[key]) for name, key in METRICS.items()}


@gin.configurable
class FidClipEvalHook(_SamplingEvalHook):
  """FID and CLIP score of the EMA parameters' samples for fixed prompts (module docstring).

  Args:
    prompts_file: one prompt per line (e.g. `eval coco-prompts` output); the first `num_prompts`.
    vocab: the run's sentencepiece model.
    encoder: the run's T5 encoder checkpoint.
    inception_weights: the converted FID Inception weights (`eval convert-inception`); with `ref`,
      FID is logged.
    ref: reference statistics (.npz, `eval fid --save_stats`) or a folder of reference images.
    clip_checkpoint: a Hugging Face CLIP folder; CLIP score is logged.
    num_prompts: prompts (images) per evaluation (None: all).
    guidance_scale, thresholding, num_steps, sampler, seed: the sampling setting.
    batch_size: images per sampler / Inception call.
    progress: print one line per evaluation.
  """

  name = "fid_clip"

  def __init__(
    self,
    prompts_file: str = gin.REQUIRED,
    vocab: str = gin.REQUIRED,
    encoder: str = gin.REQUIRED,
    inception_weights: Optional[str] = None,
    ref: Optional[str] = None,
    clip_checkpoint: Optional[str] = None,
    num_prompts: Optional[int] = None,
    guidance_scale: float = 3.0,
    thresholding: str = "dynamic",
    num_steps: int = 25,
    sampler: str = "dpmpp_2m_sde",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
  ):
    if (inception_weights is None) != (ref is None):
      raise ConfigError("FidClipEvalHook: FID needs both inception_weights and ref")
    if inception_weights is None and clip_checkpoint is None:
      raise ConfigError(
        "FidClipEvalHook: give inception_weights + ref (FID), clip_checkpoint, or both"
      )
    sampling = dict(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale)
    super().__init__(
      vocab, encoder, dict(sampling, thresholding=thresholding), batch_size, seed, progress
    )
    self.prompts_file, self.num_prompts = prompts_file, num_prompts
    self.inception_weights, self.ref, self.clip_checkpoint = inception_weights, ref, clip_checkpoint

  def prompts(self) -> List[str]:
    from imagen_jax.files import read_prompts

    prompts = read_prompts(self.prompts_file)[: self.num_prompts]
    if self.inception_weights is not None and len(prompts) < 2:
      raise ConfigError("FidClipEvalHook: FID needs at least 2 prompts")
    return prompts

  def prepare(self, **kw) -> None:
    super().prepare(**kw)
    self.extractor = self.ref_stats = self.clip = None
    if self.inception_weights is not None:
      from imagen_jax.eval.metrics import fid
      from imagen_jax.eval.networks import inception

      weights = inception.load(self.inception_weights)
      self.extractor = inception.FeatureExtractor(weights, batch_size=self.batch_size)
      self.ref_stats = fid.reference_stats(self.ref, self.extractor, progress=False)
    if self.clip_checkpoint is not None:
      from imagen_jax.eval.networks import clip

      self.clip = clip.load(self.clip_checkpoint)
      self.text_emb = self.clip.embed_texts(self.captions)

  def score(self, images_uint8: np.ndarray) -> Dict[str, float]:
    out = {}
    if self.extractor is not None:
      from imagen_jax.eval.metrics import frechet

      stats = frechet.Stats.of(self.extractor(images_uint8))
      out["eval/fid"] = float(frechet.frechet_distance(stats, self.ref_stats))
    if self.clip is not None:
      from imagen_jax.eval.networks import clip

      img_emb = self.clip.embed_images(list(images_uint8))
      out["eval/clip"] = float(clip.clip_scores(img_emb, self.text_emb).mean())
    return out
