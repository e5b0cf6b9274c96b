"""A stage's sampling settings, their sweeps, and the command line's per-stage overrides.

`StageSettings` is one setting of one stage (sampler, steps, guidance weight, thresholding, SR
augmentation level). A sweep is a list of them: the cartesian product of the values given for each
field, in the order (guidance_scale, thresholding, aug_level, num_steps); the first is what the
stage passes on to the next.

Overrides (the command line's setting flags, docs/cli.md) give a field one value or a list (a
sweep), for one stage or for every stage.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

from imagen_jax.diffusion import samplers, thresholding
from imagen_jax.errors import ConfigError


class SettingsError(ConfigError):
  """A bad setting (unknown sampler or thresholding name, a step count below 1, ...): one line,
  exit code 2."""


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """One sampling setting of one stage: the one spelling of sampling settings (the sampler,
  `settings` sweeps, the gin stages and the command line all use these names). Defaults: the
  paper's base stage (docs/paper.md §2)."""

  sampler: str = "ddpm"  # ddpm (ancestral) | ddim | dpmpp_2m | dpmpp_3m | dpmpp_2m_sde
  num_steps: int = 256
  guidance_scale: float = 1.35  # w; 1 = unguided (one network call)
  thresholding: str = "dynamic"  # none | static | dynamic
  percentile: float = 99.5  # dynamic thresholding's percentile
  aug_level: float = 0.0  # SR stages: noise-conditioning augmentation level (0: best FID)
  ddim_eta: float = 0.0  # DDIM stochasticity (1: ancestral)
  # The step grid: uniform (in t) | logsnr | karras, or for a discrete schedule (DeepFloyd IF's)
  # diffusers' leading | trailing | linspace.
  spacing: str = "uniform"
  threshold_max: float = 0.0  # > 0: dynamic thresholding's s at most this (IF: 1.5 / 1.0)
  # A respaced step set of a discrete schedule (descending steps, 'n1,n2,...', e.g. IF's fast27):
  # replaces num_steps and spacing.
  timesteps: str = ""

  def __post_init__(self):
    if (
      isinstance(self.num_steps, bool)
      or int(self.num_steps) != self.num_steps
      or self.num_steps < 1
    ):
      raise SettingsError(f"the number of sampling steps must be >= 1, got {self.num_steps}")
    object.__setattr__(self, "num_steps", int(self.num_steps))
    for name in ("guidance_scale", "percentile", "aug_level", "ddim_eta"):
      object.__setattr__(self, name, float(getattr(self, name)))
    samplers.check_sampler(self.sampler)  # the one check of each kind of name (a ConfigError)
    thresholding.check_thresholding(self.thresholding)
    if self.spacing not in samplers.DISCRETE_SPACINGS:
      samplers.check_spacing(self.spacing)
    if self.timesteps:
      steps = samplers.parse_timesteps(self.timesteps)
      object.__setattr__(self, "timesteps", str(self.timesteps).replace(" ", ""))
      object.__setattr__(self, "num_steps", int(steps.size))
    object.__setattr__(self, "threshold_max", float(self.threshold_max))
    if self.threshold_max < 0:
      raise SettingsError(f"threshold_max must be >= 0 (0: unbounded), got {self.threshold_max}")
    if self.guidance_scale < 0:
      raise SettingsError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
    if not 0.0 < self.percentile <= 100.0:
      raise SettingsError(f"percentile must be in (0, 100], got {self.percentile}")
    if not 0.0 <= self.aug_level <= 1.0:
      raise SettingsError(f"aug_level must be in [0, 1], got {self.aug_level}")
    if not 0.0 <= self.ddim_eta <= 1.0:
      raise SettingsError(f"ddim_eta must be in [0, 1], got {self.ddim_eta}")

  def is_discrete(self) -> bool:
    """Whether the steps are a discrete schedule's (a step set or a diffusers spacing)."""
    return bool(self.timesteps) or self.spacing in samplers.DISCRETE_SPACINGS

  def discrete_steps(self, num_train_timesteps: int):
    """The discrete steps (descending) this setting walks on a num_train_timesteps schedule."""
    if self.timesteps:
      return samplers.parse_timesteps(self.timesteps, num_train_timesteps)
    return samplers.discrete_timesteps(self.spacing, self.num_steps, num_train_timesteps)

  def label(self, super_resolution: bool = False) -> str:
    if self.thresholding == "dynamic":
      thr = f"dynamic {self.percentile:g}"
      thr += f" max {self.threshold_max:g}" if self.threshold_max else ""
    else:
      thr = self.thresholding
    out = f"w={self.guidance_scale:g} {thr} {self.sampler} {self.num_steps} steps"
    out += "" if self.spacing == "uniform" else f" {self.spacing}"
    out += f" ({self.timesteps})" if self.timesteps in samplers.STEP_SETS else ""
    out += " (step set)" if self.timesteps and self.timesteps not in samplers.STEP_SETS else ""
    return out + (f" aug {self.aug_level:g}" if super_resolution else "")

  def slug(self, super_resolution: bool = False) -> str:
    """A folder name for a sweep row."""
    thr = f"dynamic{self.percentile:g}" if self.thresholding == "dynamic" else self.thresholding
    thr += (
      f"max{self.threshold_max:g}" if self.threshold_max and self.thresholding == "dynamic" else ""
    )
    out = f"w{self.guidance_scale:g}_{thr}_{self.sampler}{self.num_steps}"
    out += "" if self.spacing == "uniform" else f"_{self.spacing}"
    out += f"_{self.timesteps}" if self.timesteps in samplers.STEP_SETS else ""
    out += "_stepset" if self.timesteps and self.timesteps not in samplers.STEP_SETS else ""
    return out + (f"_aug{self.aug_level:g}" if super_resolution else "")


SWEEP_FIELDS = ("guidance_scale", "thresholding", "aug_level", "num_steps")


def parse_thresholding(value: str) -> Tuple[str, Optional[float]]:
  """'none' | 'static' | 'dynamic' | 'dynamic:99.9' -> (method, percentile or None)."""
  method, _, pct = str(value).partition(":")
  try:
    thresholding.check_thresholding(method)
  except ValueError as e:
    raise SettingsError(str(e)) from None
  if pct and method != "dynamic":
    raise SettingsError(f"only dynamic thresholding takes a percentile, got {value!r}")
  try:
    return method, (float(pct) if pct else None)
  except ValueError:
    raise SettingsError(f"bad thresholding percentile in {value!r}") from None


def _as_list(v) -> list:
  return list(v) if isinstance(v, (list, tuple)) else [v]


def expand(base: StageSettings, sweep: Dict[str, Sequence]) -> List[StageSettings]:
  """The settings of a sweep: `base` with each combination of the listed values (fields of
  SWEEP_FIELDS plus 'sampler' and 'spacing'; thresholding values may be 'dynamic:P')."""
  unknown = set(sweep) - set(SWEEP_FIELDS) - {"sampler", "spacing"}
  if unknown:
    raise SettingsError(
      f"cannot sweep {sorted(unknown)}; sweepable: {SWEEP_FIELDS + ('sampler', 'spacing')}"
    )
  fields = [f for f in ("sampler", "spacing") + SWEEP_FIELDS if f in sweep]
  out = []
  for combo in itertools.product(*(_as_list(sweep[f]) for f in fields)):
    values = {}
    for f, v in zip(fields, combo):
      if f == "thresholding":
        method, pct = parse_thresholding(v)
        values["thresholding"] = method
        if pct is not None:
          values["percentile"] = pct
      else:
        values[f] = v
    out.append(dataclasses.replace(base, **values))
  return out or [base]


def stage_sweeps(
  overrides: Sequence[Tuple[Optional[str], str, Sequence]], stage_names: Sequence[str]
) -> Dict[str, Dict[str, list]]:
  """Per-stage setting overrides -> {stage: {field: [values]}}.

  Args:
    overrides: (stage, or None for every stage; a StageSettings field; its values) triples, later
      ones replacing earlier ones.
    stage_names: the cascade's stages.

  Returns:
    {stage: {field: values}}.

  Raises:
    SettingsError: an override names no stage of the cascade.
  """
  out: Dict[str, Dict[str, list]] = {name: {} for name in stage_names}
  for stage, field, values in overrides:
    if stage is not None and stage not in stage_names:
      raise SettingsError(
        f"{field} {stage}={','.join(map(str, values))}: no stage {stage!r} (stages: "
        f"{', '.join(stage_names)})"
      )
    for name in [stage] if stage else stage_names:
      out[name][field] = list(values)
  return out


def apply_sweep(base: StageSettings, sweep: Dict[str, list]) -> List[StageSettings]:
  """Single values replace the stage's setting; lists of several values become the sweep."""
  if len(sweep.get("ddim_eta", ())) > 1:
    raise SettingsError("ddim_eta takes one value, not a sweep")
  single = {f: v[0] for f, v in sweep.items() if len(v) == 1 and f != "thresholding"}
  base = dataclasses.replace(base, **single) if single else base
  return expand(base, {f: v for f, v in sweep.items() if len(v) > 1 or f == "thresholding"})
