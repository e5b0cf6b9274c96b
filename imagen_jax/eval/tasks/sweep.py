"""Sweeps of one cascade stage's sampling settings (guidance weight x thresholding) through the
whole cascade.

For every setting of the swept stage (the base by default) the cascade runs from that stage to the
last with the other stages' configured settings, on the same image seeds, and a scoring function
sees every stage's images. The swept stage compiles its guided program once for the whole sweep (the
weight and the thresholding are traced arguments of the sampler), every other stage once:
`Sweep.programs` reports it. Used by `imagen-jax eval shapes` (alignment) and meant for the FID /
CLIP sweeps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from imagen_jax.sample.cascade import Cascade, EncodedPrompts, LoadedStage
from imagen_jax.sample.settings import SettingsError, parse_thresholding
from imagen_jax.sample.stage_sampler import RunStats


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  guidance: float
  thresholding: str  # none | static | dynamic
  percentile: float

  @property
  def name(self) -> str:
    thr = f"dynamic{self.percentile:g}" if self.thresholding == "dynamic" else self.thresholding
    return f"w{self.guidance:g}_{thr}"

  @property
  def label(self) -> str:
    return f"w={self.guidance:g} {self.thresholding}"


def sweep_points(
  guidance: Sequence[float], thresholding: Sequence[str], percentile: float
) -> List[SweepPoint]:
  """The cartesian product, thresholding outermost ('dynamic:P' sets the percentile)."""
  if not guidance or not thresholding:
    raise SettingsError("a sweep needs at least one guidance weight and one thresholding")
  out = []
  for thr in thresholding:
    method, pct = parse_thresholding(thr)
    for w in guidance:
      if w < 0:
        raise SettingsError(f"guidance weights must be >= 0, got {w}")
      out.append(SweepPoint(float(w), method, float(pct if pct is not None else percentile)))
  return out


def swept_stage(cascade: Cascade, sweep_stage: Optional[str] = None) -> LoadedStage:
  """The stage a sweep varies: the one named `sweep_stage`, or the first when None.

  Raises:
    SettingsError: no stage has that name.
  """
  names = [st.spec.name for st in cascade.stages]
  if sweep_stage is None:
    return cascade.stages[0]
  if sweep_stage not in names:
    raise SettingsError(
      f"sweep_stage {sweep_stage}: no stage of that name (stages: {', '.join(names)})"
    )
  return cascade.stages[names.index(sweep_stage)]


@dataclasses.dataclass
class Sweep:
  points: List[SweepPoint]
  rows: List[dict]  # one per (point, stage): {"setting", "stage", "metrics", ...}
  programs: Dict[str, int]  # compiled sampler programs per stage over the sweep
  seconds: float
  stats: Dict[str, RunStats]


def run_sweep(
  cascade: Cascade,
  text: EncodedPrompts,
  prompt_index: Sequence[int],
  seeds: Sequence[int],
  points: Sequence[SweepPoint],
  score: Callable[[str, np.ndarray], dict],
  *,
  sweep_stage: Optional[str] = None,
  on_images: Optional[Callable[[SweepPoint, str, np.ndarray], None]] = None,
  negative=None,
  log=print,
) -> Sweep:
  """Runs every point through the cascade; `score(stage_name, images)` -> metrics for each
  stage's images; `on_images(point, stage_name, images)` may write them; `negative`: per-prompt
  negative prompts (`Cascade.encode_negative`)."""
  stages = cascade.stages
  names = [st.spec.name for st in stages]
  swept = stages.index(swept_stage(cascade, sweep_stage))
  idx = np.asarray(prompt_index, np.int64)
  stats = {n: RunStats() for n in names}
  before = {st.spec.name: st.programs for st in stages}
  rows = []
  t0 = time.perf_counter()
  for k, point in enumerate(points):
    settings, guided = [], []
    for i, st in enumerate(stages):
      base = st.setting
      if i == swept:
        settings.append(
          dataclasses.replace(
            base,
            guidance_scale=point.guidance,
            thresholding=point.thresholding,
            percentile=point.percentile,
          )
        )
        guided.append(True)  # one compiled program for every weight, w = 1 included
      else:
        settings.append(base)
        guided.append(None)
    # Stages before the swept one do not change with the point; they run for every point all the
    # same (their
    # seeds and settings are fixed, so their images are identical), which keeps this loop simple.
    images = cascade.generate(
      text,
      idx,
      seeds,
      settings,
      guided=guided,
      stats=[stats[n] for n in names],
      negative=negative,
    )
    for name, im in zip(names, images):
      if on_images is not None:
        on_images(point, name, im)
      rows.append(
        {
          "setting": point.name,
          "guidance": point.guidance,
          "thresholding": point.thresholding,
          "percentile": point.percentile,
          "stage": name,
          "image_size": int(im.shape[1]),
          "metrics": score(name, im),
        }
      )
    log(
      f"sweep {k + 1}/{len(points)} {point.label}: "
      + ", ".join(f"{r['stage']} {_headline(r['metrics'])}" for r in rows[-len(names) :])
    )
  programs = {st.spec.name: st.programs - before[st.spec.name] for st in stages}
  return Sweep(
    points=list(points), rows=rows, programs=programs, seconds=time.perf_counter() - t0, stats=stats
  )


def _headline(metrics: dict) -> str:
  overall = metrics.get("overall", metrics)
  parts = [
    f"{k} {v:.3f}" for k, v in overall.items() if k in ("all", "fidelity") and isinstance(v, float)
  ]
  return " ".join(parts) or "scored"
