"""`eval shapes`: compositional alignment of a cascade on held-out synthetic captions (a scene seed
the training data never used), swept over guidance weight x thresholding. Outputs: docs/outputs.md.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from imagen_jax import images as imio
from imagen_jax.data import synthetic
from imagen_jax.eval.metrics import shapes
from imagen_jax.eval.tasks import plots
from imagen_jax.eval.tasks.sweep import SweepPoint, run_sweep, sweep_points, swept_stage
from imagen_jax.files import write_json
from imagen_jax.sample.cascade import Cascade, SampleError

DEFAULT_GUIDANCE = (1.0, 2.0, 3.0, 5.0, 8.0)
DEFAULT_THRESHOLDING = ("none", "static", "dynamic")
PLOT_METRICS = ("all", "color", "count", "shape", "relation")


def held_out_scenes(seed: int, start: int, num: int) -> List[synthetic.Scene]:
  return [synthetic.make_scene(seed, i) for i in range(start, start + num)]


def training_captions(seed: int, num: int) -> set:
  return {synthetic.make_scene(seed, i).caption for i in range(num)}


def score_images(
  images: np.ndarray, captions: Sequence[str], unseen: Optional[Sequence[bool]] = None
) -> dict:
  """The scorer's aggregate over a batch of images and their captions (plus 'unseen': the
  captions not in training, when known)."""
  scores = [shapes.score(im, c) for im, c in zip(images, captions)]
  out = shapes.aggregate(scores)
  if unseen is not None and any(unseen):
    out["unseen"] = shapes.aggregate([s for s, u in zip(scores, unseen) if u])["overall"]
  return out


def evaluate(
  cascade: Cascade,
  out_dir,
  *,
  num_prompts: int = 64,
  seed: int = 1000,
  start: int = 0,
  guidance: Sequence[float] = DEFAULT_GUIDANCE,
  thresholding: Sequence[str] = DEFAULT_THRESHOLDING,
  percentile: Optional[float] = None,
  sweep_stage: Optional[str] = None,
  label: str = "model",
  train_seed: int = 0,
  train_examples: int = 0,
  baselines: Sequence[dict] = (),
  save_images: bool = True,
  command: Optional[List[str]] = None,
  negative_prompts: Optional[Sequence[str]] = None,
  log=print,
) -> dict:
  if num_prompts < 1:
    raise SampleError(f"num_prompts must be >= 1, got {num_prompts}")
  if train_examples and seed == train_seed:
    raise SampleError(f"seed {seed} is the training seed: held-out captions need another seed")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stages = cascade.stages
  swept = swept_stage(cascade, sweep_stage)
  pct = swept.setting.percentile if percentile is None else percentile
  points = sweep_points(list(guidance), list(thresholding), pct)
  scenes = held_out_scenes(seed, start, num_prompts)
  captions = [s.caption for s in scenes]
  seen = training_captions(train_seed, train_examples) if train_examples else None
  unseen = [c not in seen for c in captions] if seen is not None else None
  text = cascade.encode(captions)
  image_seeds = list(range(seed * 100_000 + start, seed * 100_000 + start + num_prompts))
  first8 = min(8, num_prompts)
  sweep_rows: Dict[str, List[List[np.ndarray]]] = {s.spec.name: [] for s in stages}

  def on_images(point: SweepPoint, stage: str, ims: np.ndarray) -> None:
    sweep_rows[stage].append(list(ims[:first8]))
    if save_images:
      for k, im in enumerate(ims):
        imio.save_png(out / "images" / point.name / stage / f"p{start + k:04d}.png", im)

  log(
    f"eval shapes: {num_prompts} held-out captions (scene seed {seed}, indices "
    f"{start}..{start + num_prompts - 1}), "
    f"{len(points)} settings of stage {swept.spec.name}: guidance {list(guidance)} x thresholding "
    f"{list(thresholding)}"
    + (f"; {sum(unseen)} captions unseen in training" if unseen is not None else "")
  )
  t0 = time.perf_counter()
  sweep = run_sweep(
    cascade,
    text,
    np.arange(num_prompts),
    image_seeds,
    points,
    lambda stage, ims: score_images(ims, captions, unseen),
    sweep_stage=swept.spec.name,
    on_images=on_images,
    negative=(
      None
      if negative_prompts is None
      else cascade.encode_negative(negative_prompts, num_prompts, warn=log)
    ),
    log=log,
  )
  result = {
    "what": "shapes alignment sweep",
    "label": label,
    "date": time.strftime("%Y-%m-%d"),
    "held_out": {
      "seed": seed,
      "start": start,
      "num_prompts": num_prompts,
      "train_seed": train_seed,
      "train_examples": train_examples,
      "unseen_captions": sum(unseen) if unseen is not None else None,
    },
    "swept_stage": swept.spec.name,
    "negative_prompts": None if negative_prompts is None else list(negative_prompts),
    "stages": [
      {
        "name": st.spec.name,
        "network": st.description,
        "checkpoint": st.checkpoint,
        "image_size": st.spec.image_size,
        "setting": vars(st.setting),
        "programs_compiled": sweep.programs[st.spec.name],
        "sampling_seconds": round(sweep.stats[st.spec.name].seconds, 3),
        "compile_seconds": round(sweep.stats[st.spec.name].compile_seconds, 3),
        "images": sweep.stats[st.spec.name].images,
      }
      for st in stages
    ],
    "guidance": [float(w) for w in guidance],
    "thresholding": list(thresholding),
    "percentile": pct,
    "rows": sweep.rows,
    "seconds": round(time.perf_counter() - t0, 2),
    "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.node()})",
    "scorer": "imagen_jax.eval.metrics.shapes (palette blends, connected components, moments; "
    "module doc)",
    "command": command,
  }
  result["best"] = best_settings(result)
  write_json(out / "shapes.json", result)
  for st in stages:
    name = st.spec.name
    suffix = "" if st is stages[-1] else f"_{name}"
    plots.alignment_vs_guidance(
      out / f"alignment_vs_guidance{suffix}.png",
      result,
      name,
      PLOT_METRICS,
      baselines=baselines,
      title=f"{label}, stage {name} ({st.spec.image_size} px): "
      f"alignment on {num_prompts} held-out captions",
    )
    plots.alignment_vs_fidelity(
      out / f"alignment_vs_fidelity{suffix}.png",
      result,
      name,
      baselines=baselines,
      title=f"{label}, stage {name}: alignment against fidelity (labels: w)",
    )
    imio.save_png(
      out / f"sweep_{name}.png",
      imio.grid(
        sweep_rows[name],
        captions[:first8],
        [p.label for p in points],
        title=f"{name}: same seeds in every row",
      ),
    )
  return result


def best_settings(result: dict) -> Dict[str, dict]:
  """Per stage: the setting with the highest overall all-correct rate. Ties (an undertrained
  model scores 0 in every setting) go to the higher mean of the partial metrics (colour, count,
  shape, left/right), then to the higher fidelity, then to the lower w."""

  def key(r):
    m = r["metrics"]["overall"]
    partial = [
      m[k] for k in ("color", "count", "shape", "relation") if m[k] == m[k]
    ]  # NaN: no caption of that kind
    return (m["all"], sum(partial) / max(len(partial), 1), m["fidelity"], -r["guidance"])

  out = {}
  for stage in {r["stage"] for r in result["rows"]}:
    rows = [r for r in result["rows"] if r["stage"] == stage]
    best = max(rows, key=key)
    out[stage] = {
      "setting": best["setting"],
      "guidance": best["guidance"],
      "thresholding": best["thresholding"],
      **{
        k: best["metrics"]["overall"][k]
        for k in ("all", "color", "count", "shape", "relation", "fidelity")
      },
    }
  return out


def read_result(path) -> dict:
  """A shapes.json written by `evaluate` (a baseline)."""
  p = Path(path)
  if p.is_dir():
    p = p / "shapes.json"
  try:
    result = json.loads(p.read_text())
  except (OSError, ValueError) as e:
    raise SampleError(f"baseline {path}: cannot read a shapes.json: {e}") from None
  if result.get("what") != "shapes alignment sweep" or "rows" not in result:
    raise SampleError(f"baseline {path}: not a shapes.json of `imagen-jax eval shapes`")
  return result


def summary_table(result: dict, baselines: Sequence[dict] = ()) -> str:
  """A Markdown table of the last stage: every setting's overall metrics (and the baselines'
  best)."""
  stage = result["stages"][-1]["name"]
  head = (
    "| model | setting | all correct | colour | count | shape | left/right | fidelity |\n"
    "|---|---|---|---|---|---|---|---|"
  )
  lines = [head]
  for res in [result] + list(baselines):
    for r in (x for x in res["rows"] if x["stage"] == stage):
      m = r["metrics"]["overall"]
      lines.append(
        f"| {res['label']} | w={r['guidance']:g} {r['thresholding']} | {m['all']:.3f} | "
        f"{m['color']:.3f} | "
        f"{m['count']:.3f} | {m['shape']:.3f} | {m['relation']:.3f} | {m['fidelity']:.3f} |"
      )
  return "\n".join(lines)
