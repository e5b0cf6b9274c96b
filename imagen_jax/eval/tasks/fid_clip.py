"""`imagen-jax eval fid-clip`: a guidance x thresholding sweep of a cascade scored with FID (against
reference statistics) and CLIP score (against the prompts), plotted as the paper's FID-against-CLIP
Pareto curves.

Each setting samples the same prompts with the same seeds through the whole cascade (the sweep
runner of `eval shapes`: one compiled program per stage); the last stage's images are scored. With
the paper's protocol (30k COCO captions, base w = 1.35 ... and SR w = 8, 256 px) this is the
guidance sweep of its Fig. A.11 in small; see the README for the COCO FID-30K recipe.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from imagen_jax import images as imio
from imagen_jax.eval.metrics import fid, frechet
from imagen_jax.eval.networks import clip, inception
from imagen_jax.eval.tasks import plots
from imagen_jax.eval.tasks.sweep import run_sweep, sweep_points, swept_stage
from imagen_jax.files import write_json
from imagen_jax.sample.cascade import Cascade, SampleError


def evaluate(
  cascade: Cascade,
  prompts: Sequence[str],
  out_dir,
  *,
  ref,
  inception_weights,
  clip_checkpoint,
  guidance: Sequence[float],
  thresholding: Sequence[str],
  batch_size: int = 8,
  seed: int = 0,
  sweep_stage: Optional[str] = None,
  label: str = "model",
  save_images: bool = False,
  command: Optional[List[str]] = None,
  negative_prompts: Optional[Sequence[str]] = None,
  log=print,
) -> dict:
  """FID and CLIP score of the cascade's last stage over a guidance x thresholding sweep.

  Args:
    cascade: the loaded cascade.
    prompts: the prompts (image k has seed + k).
    out_dir: where fid_clip.json, fid_vs_clip.png (and images) go.
    ref: reference statistics (.npz) or a folder of reference images.
    inception_weights: the converted FID Inception weights.
    clip_checkpoint: a Hugging Face CLIP folder.
    guidance: the swept stage's guidance weights.
    thresholding: the swept stage's thresholdings ('dynamic:P' allowed).
    batch_size: images per Inception call.
    seed: the first image's seed.
    sweep_stage: the swept stage (default the first).
    label: the model's name in outputs.
    save_images: write the last stage's images per setting.
    command: the command line, recorded.
    negative_prompts: one negative prompt for all prompts, or one per prompt.
    log: progress lines.

  Returns:
    The result written to fid_clip.json.
  """
  if len(prompts) < 2:
    raise SampleError("FID needs at least 2 prompts (images)")
  swept_stage(cascade, sweep_stage)  # an unknown stage fails before minutes of loading
  extractor = inception.FeatureExtractor(inception.load(inception_weights), batch_size=batch_size)
  ref = fid.reference_stats(ref, extractor)
  clip_model = clip.load(clip_checkpoint)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stages = cascade.stages
  names = [s.spec.name for s in stages]
  swept = swept_stage(cascade, sweep_stage)
  points = sweep_points(list(guidance), list(thresholding), swept.setting.percentile)
  text = cascade.encode(list(prompts))
  text_emb = clip_model.embed_texts(list(prompts))
  last = names[-1]

  def score(stage: str, ims: np.ndarray) -> dict:
    if stage != last:
      return {}
    feats = extractor(ims)
    img_emb = clip_model.embed_images(list(ims))
    clip_scores = clip.clip_scores(img_emb, text_emb)
    return {
      "overall": {
        "fid": frechet.frechet_distance(frechet.Stats.of(feats), ref),
        "clip": float(clip_scores.mean()),
        "n": float(len(ims)),
      }
    }

  def on_images(point, stage, ims):
    if save_images and stage == last:
      for k, im in enumerate(ims):
        imio.save_png(out / "images" / point.name / f"p{k:05d}.png", im)

  t0 = time.perf_counter()
  sweep = run_sweep(
    cascade,
    text,
    np.arange(len(prompts)),
    [seed + k for k in range(len(prompts))],
    points,
    score,
    sweep_stage=swept.spec.name,
    on_images=on_images,
    negative=(
      None
      if negative_prompts is None
      else cascade.encode_negative(negative_prompts, len(prompts), warn=log)
    ),
    log=log,
  )
  rows = [r for r in sweep.rows if r["stage"] == last]
  result = {
    "what": "fid-clip sweep",
    "label": label,
    "date": time.strftime("%Y-%m-%d"),
    "prompts": len(prompts),
    "reference_count": ref.count,
    "swept_stage": swept.spec.name,
    "scored_stage": last,
    "negative_prompts": None if negative_prompts is None else list(negative_prompts),
    "programs_compiled": sweep.programs,
    "rows": rows,
    "seconds": round(time.perf_counter() - t0, 2),
    "command": command,
  }
  write_json(out / "fid_clip.json", result)
  plots.alignment_vs_fidelity(
    out / "fid_vs_clip.png",
    result,
    last,
    alignment="fid",
    fidelity="clip",
    title=f"{label}: FID against CLIP score over the guidance sweep (labels: w)",
    fidelity_label="CLIP score (100 x cosine)",
    alignment_label="FID (lower is better)",
  )
  return result
