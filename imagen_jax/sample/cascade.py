"""Cascade sampling from training runs: stages (`stage()`, gin-scoped) read their runs, prompts are
encoded once, and the stages run in order, each SR stage conditioned on the previous stage's 8-bit
output (so an SR-only call on written PNGs reproduces the cascade). Any contiguous part runs. Output
layout and image seeds: docs/outputs.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from imagen_jax import files, models
from imagen_jax import images as imio
from imagen_jax.diffusion import DiffusionConfig
from imagen_jax.errors import UserError
from imagen_jax.gin_utils import require
from imagen_jax.sample.settings import StageSettings, apply_sweep, expand, stage_sweeps
from imagen_jax.sample.stage_sampler import RunStats, StageSampler, image_keys, model_apply_fn
from imagen_jax.text.encoder import EncodedPrompts, encode_prompts
from imagen_jax.train import checkpoints as ckpt


class SampleError(UserError):
  """Input that cannot be sampled (prompts, run directories, images, stage chain): one line, exit
  code 2."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One configured stage: where its run is, what it must be, and its default sampling setting
  (or sweep)."""

  name: str
  run_dir: str
  image_size: int
  step: Optional[int] = None
  expect: Any = None  # {network config field: value} the run must have (e.g. its width)
  settings: Sequence[StageSettings] = (StageSettings(),)


@gin.configurable
def stage(
  name: str = gin.REQUIRED,
  run_dir: str = gin.REQUIRED,
  image_size: int = gin.REQUIRED,
  step: Optional[int] = None,
  expect: Optional[Dict[str, Any]] = None,
  sampler=StageSettings.sampler,
  num_steps=StageSettings.num_steps,
  guidance_scale=StageSettings.guidance_scale,
  thresholding=StageSettings.thresholding,
  percentile: float = StageSettings.percentile,
  aug_level=StageSettings.aug_level,
  ddim_eta: float = StageSettings.ddim_eta,
  spacing=StageSettings.spacing,
  threshold_max: float = StageSettings.threshold_max,
  timesteps: str = StageSettings.timesteps,
) -> StageSpec:
  """A cascade stage, bound per stage with a gin scope (`base/stage.run_dir = %BASE_DIR`).
  image_size: the stage's output resolution. guidance_scale, thresholding ('dynamic:99.9'
  allowed), aug_level, num_steps, sampler and spacing may be lists: a sweep (their cartesian
  product; the first setting is passed on). threshold_max and timesteps (a respaced step set of a
  discrete schedule, 'n1,n2,...') are single values."""
  require("stage", name=name, run_dir=run_dir, image_size=image_size)
  fields = {
    "guidance_scale": guidance_scale,
    "thresholding": thresholding,
    "aug_level": aug_level,
    "num_steps": num_steps,
    "sampler": sampler,
    "spacing": spacing,
  }
  scalar = {
    k: v for k, v in fields.items() if not isinstance(v, (list, tuple)) and k != "thresholding"
  }
  base = StageSettings(
    percentile=percentile,
    ddim_eta=ddim_eta,
    threshold_max=threshold_max,
    timesteps=str(timesteps or ""),
    **scalar,
  )
  sweep = {k: v for k, v in fields.items() if isinstance(v, (list, tuple)) or k == "thresholding"}
  return StageSpec(
    name=name,
    run_dir=None if run_dir is None else str(run_dir),
    image_size=int(image_size),
    step=step,
    expect=dict(expect or {}),
    settings=tuple(expand(base, sweep)),
  )


@dataclasses.dataclass
class LoadedStage:
  spec: StageSpec
  index: int  # position in the configured cascade (part of every image key)
  model_config: Any
  diffusion: DiffusionConfig
  sampler: StageSampler
  params: Any
  checkpoint: Dict[str, Any]  # run_dir, path, step
  description: str

  @property
  def super_resolution(self) -> bool:
    return self.sampler.super_resolution

  @property
  def lowres_size(self) -> Optional[int]:
    if not self.super_resolution:
      return None
    cfg = self.model_config
    return self.spec.image_size * cfg.lowres_size // cfg.image_size

  @property
  def setting(self) -> StageSettings:
    """The stage's first setting: the one it passes on to the next stage."""
    return self.spec.settings[0]

  @property
  def batch_size(self) -> int:
    """Images per sampler call."""
    return self.sampler.batch_size

  @property
  def programs(self) -> int:
    """Sampler programs this stage has compiled so far."""
    return self.sampler.programs

  def images(
    self,
    emb: np.ndarray,
    mask: np.ndarray,
    seeds: Sequence[int],
    setting: StageSettings,
    *,
    lowres: Optional[np.ndarray] = None,
    init: Optional[np.ndarray] = None,
    strength: float = 1.0,
    negative: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    known: Optional[np.ndarray] = None,
    known_mask: Optional[np.ndarray] = None,
    resample: int = 1,
    guided: Optional[bool] = None,
    stats: Optional[RunStats] = None,
    on_batch=None,
  ) -> np.ndarray:
    """This stage's images (uint8 (N, S, S, 3)), one per image seed.

    Args:
      emb: (N, L, D) text embeddings, one row per image.
      mask: (N, L) text masks.
      seeds: the images' seeds (each image's key: fold_in(PRNGKey(seed), the stage's index)).
      setting: the sampling setting.
      lowres: SR stages: the previous stage's output in [-1, 1].
      init: img2img: images in [-1, 1] to start from at t = strength.
      strength: img2img strength.
      negative: the negative prompts' (emb, mask), one row per image: guidance's unconditional
        half (rows of zeros and False: the null condition).
      known, known_mask: inpainting: (N, S', S', 3) images in [-1, 1] and (N, S', S', 1) masks
        (1 = keep) of any square size, resized here to the stage's resolution.
      resample: RePaint's resampling count when inpainting.
      guided: compile the guided program even where w = 1 (a sweep over w compiles once).
      stats: timings to add to.
      on_batch: progress callback, on_batch(done, total).

    Returns:
      The 8-bit images (what the next stage and the PNGs see).
    """
    size = self.spec.image_size
    if self.diffusion.null_text == "empty_prompt" and self.sampler.null_text is None:
      raise SampleError(
        f"stage {self.spec.name} needs the empty prompt's embedding (null_text='empty_prompt')"
      )
    if known is not None:
      known = known if known.shape[1] == size else imio.downsample(known, size)
      known_mask = known_mask if known_mask.shape[1] == size else imio.resize_mask(known_mask, size)
    x = self.sampler.run(
      self.params,
      emb,
      mask,
      image_keys(seeds, self.index),
      setting,
      lowres=lowres if self.super_resolution else None,
      x_init=init,
      strength=strength,
      negative_emb=None if negative is None else negative[0],
      negative_mask=None if negative is None else negative[1],
      known=known,
      mask=known_mask,
      resample=resample,
      guided=guided,
      stats=stats,
      on_batch=on_batch,
    )
    return imio.to_uint8(x)


def load_stage(
  spec: StageSpec, index: int, *, batch_size: int = 8, mesh=None, warn=print
) -> LoadedStage:
  """Reads a stage's run: checks it is what the spec says, restores the EMA parameters
  (read-only: a run that is still training is fine; a checkpoint being written is not listed)."""
  if spec.run_dir is None:
    raise SampleError(
      f"stage {spec.name}: no run directory (bind its macro, e.g. --gin.BASE_DIR=\"'DIR'\", or "
      "give "
      f"its run_dirs entry)"
    )
  if not Path(spec.run_dir).is_dir() and "://" not in spec.run_dir:
    raise SampleError(f"stage {spec.name}: run directory not found: {spec.run_dir}")
  try:
    record = ckpt.read_run_record(spec.run_dir)
  except ckpt.RunDirError as e:
    raise SampleError(f"stage {spec.name}: {e}") from None
  config = models.model_config_from_record(record["network"], record["config"])
  for field, want in (spec.expect or {}).items():
    if not hasattr(config, field):
      raise SampleError(
        f"stage {spec.name}: {spec.run_dir} holds a {ckpt.describe(record)}, which has no "
        f"{field!r} "
        "(named in the stage's expect)"
      )
    have = getattr(config, field)
    if (tuple(want) if isinstance(want, list) else want) != have:
      raise SampleError(
        f"stage {spec.name}: {spec.run_dir} holds a {ckpt.describe(record)}, but the stage expects "
        f"{field} = {want!r} (the run has {have!r})"
      )
  sr = models.is_super_resolution(config)
  if not sr and spec.image_size != config.image_size:
    raise SampleError(
      f"stage {spec.name}: {spec.run_dir} holds a {ckpt.describe(record)}, but the stage is "
      "configured "
      f"for {spec.image_size}px"
    )
  if sr and (spec.image_size * config.lowres_size) % config.image_size:
    raise SampleError(
      f"stage {spec.name}: {spec.image_size}px is not a multiple of the network's upsampling "
      f"factor {config.image_size // config.lowres_size}"
    )
  if "diffusion" in record:
    diffusion = DiffusionConfig.from_training_record(record["diffusion"])
  else:
    diffusion = DiffusionConfig()
    warn(
      f"stage {spec.name}: run.json does not record the training objective and schedule (a run "
      "from before "
      f"they were recorded); assuming the defaults ({diffusion.objective}, "
      f"{type(diffusion.schedule).__name__})"
    )
  sampler = StageSampler(
    model_apply_fn(models.build_model(config)),
    diffusion,
    spec.image_size,
    super_resolution=sr,
    batch_size=batch_size,
    mesh=mesh,
    channels=models.image_channels(config),
  )
  abstract = nn.unbox(models.abstract_params(config))
  replicated = jax.sharding.NamedSharding(sampler.mesh, jax.sharding.PartitionSpec())
  try:
    params, step = ckpt.restore_ema_params(
      spec.run_dir, abstract, jax.tree_util.tree_map(lambda _: replicated, abstract), step=spec.step
    )
  except ckpt.RunDirError as e:
    raise SampleError(f"stage {spec.name}: {e}") from None
  path = str(ckpt.absolute(spec.run_dir) / ckpt.CHECKPOINTS / str(step))
  return LoadedStage(
    spec=spec,
    index=index,
    model_config=config,
    diffusion=diffusion,
    sampler=sampler,
    params=params,
    checkpoint={"run_dir": str(spec.run_dir), "path": path, "step": int(step)},
    description=ckpt.describe(record),
  )


def check_chain(stages: Sequence[LoadedStage], has_lowres_input: bool) -> None:
  """A contiguous cascade: a base stage first (or an SR stage given lowres_images), then SR
  stages, each taking the previous output's resolution."""
  first = stages[0]
  if first.super_resolution and not has_lowres_input:
    raise SampleError(
      f"stage {first.spec.name} is a super-resolution stage ({first.description}): give its "
      f"{first.lowres_size}px inputs with lowres_images, or start the cascade at a base stage"
    )
  if not first.super_resolution and has_lowres_input:
    raise SampleError(
      f"lowres_images: stage {first.spec.name} is a base stage ({first.description}); "
      "low-resolution inputs go to a super-resolution stage"
    )
  for prev, cur in zip(stages, stages[1:]):
    if not cur.super_resolution:
      raise SampleError(
        f"stage {cur.spec.name} follows {prev.spec.name} but holds a {cur.description}: "
        "only a super-resolution network can take a previous stage's output"
      )
    if cur.lowres_size != prev.spec.image_size:
      raise SampleError(
        f"stage {cur.spec.name} takes {cur.lowres_size}px inputs but {prev.spec.name} gives "
        f"{prev.spec.image_size}px"
      )


# -------------------------------------------------------------------------------------------
# prompts


# ----------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class StageResult:
  name: str
  settings: List[StageSettings]
  files: List[List[str]]  # [setting][job] relative paths
  stats: RunStats
  traces: int


@dataclasses.dataclass
class CascadeResult:
  out_dir: str
  stages: List[StageResult]
  jobs: List[Dict[str, int]]
  final: Optional[np.ndarray] = None  # the last stage's passed-on images (this process's share)


def _share(n: int) -> slice:
  """This process's contiguous share of n jobs."""
  p, count = jax.process_index(), jax.process_count()
  per = -(-n // count)
  return slice(min(p * per, n), min((p + 1) * per, n))


def _jobs(
  stages, text, seed, samples_per_prompt, lowres_images, init_images, strength, masks=None
) -> List[dict]:
  """Checks a cascade call's inputs; returns its images: [{input, prompt, sample, seed}]."""
  if samples_per_prompt < 1:
    raise SampleError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
  if not 0.0 <= strength <= 1.0:
    raise SampleError(f"strength must be in [0, 1], got {strength}")
  if not 0 <= seed < 2**31:
    raise SampleError(f"seed must be in [0, 2^31), got {seed}")
  check_chain(stages, lowres_images is not None)
  first = stages[0]
  n_in = None
  if masks is not None:
    if init_images is None:
      raise SampleError("inpainting: a mask needs the image(s) it applies to (init_images)")
    if len(masks) not in (1, len(init_images)):
      raise SampleError(
        f"inpainting: {len(masks)} masks for {len(init_images)} images; give one mask, or one "
        "per image"
      )
  for arr, what, size in (
    (lowres_images, "lowres_images", first.lowres_size),
    (init_images, "init_images", None if masks is not None else first.spec.image_size),
  ):
    if arr is None:
      continue
    if size is not None and arr.shape[1:3] != (size, size):
      raise SampleError(
        f"{what}: images are {arr.shape[2]}x{arr.shape[1]}, stage {first.spec.name} takes "
        f"{size}x{size}"
      )
    if n_in is not None and arr.shape[0] != n_in:
      raise SampleError(
        f"lowres_images and init_images: {n_in} and {arr.shape[0]} images; give as many of each"
      )
    n_in = arr.shape[0]
  prompt_of = (
    files.pair_prompts(n_in, len(text.texts), "input images")
    if n_in is not None
    else list(range(len(text.texts)))
  )
  s = samples_per_prompt
  jobs = [
    {"input": k, "prompt": prompt_of[k], "sample": j, "seed": seed + k * s + j}
    for k in range(len(prompt_of))
    for j in range(s)
  ]
  if jobs[-1]["seed"] >= 2**31:
    raise SampleError(f"seed {seed} leaves no room for {len(jobs)} image seeds below 2^31")
  return jobs


def run_cascade(
  stages: Sequence[LoadedStage],
  text: EncodedPrompts,
  out_dir,
  *,
  seed: int = 0,
  samples_per_prompt: int = 1,
  lowres_images: Optional[np.ndarray] = None,
  init_images: Optional[np.ndarray] = None,
  strength: float = 0.8,
  negative: Optional[Tuple[np.ndarray, np.ndarray]] = None,
  masks: Optional[np.ndarray] = None,
  resample: int = 1,
  progress: bool = True,
  record_extra: Optional[dict] = None,
  grids: bool = True,
  log=print,
) -> CascadeResult:
  """Samples the stages in order and writes everything (see the module docstring).

  lowres_images (N, s, s, 3) in [-1, 1] feed the first stage (SR). init_images (N, S, S, 3) start
  the first stage from the forward-noised image at t = strength (img2img); with masks (1 or N,
  S', S', 1; 1 = keep) they are instead the known images of inpainting, kept in every stage at
  its resolution (any square size; resized per stage). negative: per-prompt (emb, mask) of the
  negative prompts (`Cascade.encode_negative`), guidance's unconditional half in every stage.
  resample: RePaint's resampling count when inpainting.
  """
  jobs = _jobs(stages, text, seed, samples_per_prompt, lowres_images, init_images, strength, masks)
  first = stages[0]
  s = samples_per_prompt
  out_dir = epath.Path(out_dir)  # local or cloud
  if out_dir.exists() and any(out_dir.iterdir()):
    raise SampleError(f"out_dir {out_dir} is not empty; choose a new directory")

  lead = jax.process_index() == 0
  share = _share(len(jobs))
  mine = jobs[share]
  idx = np.array([j["prompt"] for j in mine], np.int64)
  emb, mask = text.emb[idx], text.mask[idx]
  inputs = np.array([j["input"] for j in mine], np.int64)
  prev = lowres_images[inputs] if lowres_images is not None else None
  init = init_images[inputs] if init_images is not None and masks is None else None
  known = known_mask = None
  if masks is not None:
    known = init_images[inputs]
    known_mask = masks[inputs] if len(masks) > 1 else np.repeat(masks, len(inputs), axis=0)
  neg = None if negative is None else (negative[0][idx], negative[1][idx])
  seeds = [j["seed"] for j in mine]
  results: List[StageResult] = []
  out_dir.mkdir(parents=True, exist_ok=True)
  for st in stages:
    settings = list(st.spec.settings)
    guided = any(x.guidance_scale != 1.0 for x in settings)
    stats = RunStats()
    traces0 = st.sampler.trace_count
    stage_files: List[List[str]] = []
    passed = None
    bar = tqdm(
      total=len(settings) * -(-len(mine) // st.sampler.batch_size),
      desc=f"sample {st.spec.name}",
      unit="batch",
      disable=not (progress and lead),
      leave=False,
      file=sys.stdout,
    )
    for r, setting in enumerate(settings):
      u8 = st.images(
        emb,
        mask,
        seeds,
        setting,
        lowres=prev,
        init=init if st is first else None,
        strength=strength,
        negative=neg,
        known=known,
        known_mask=known_mask,
        resample=resample,
        guided=guided,
        stats=stats,
        on_batch=lambda done, total: bar.update(1),
      )
      sub = (
        st.spec.name
        if len(settings) == 1
        else f"{st.spec.name}/{setting.slug(st.super_resolution)}"
      )
      names = [f"{sub}/p{j['input']:03d}_s{j['sample']:02d}_seed{j['seed']}.png" for j in jobs]
      for name, im in zip(names[share], u8):
        imio.save_png(out_dir / name, im)
      stage_files.append(names)
      if r == 0:
        passed = imio.from_uint8(u8)  # what the next stage sees: the 8-bit image, as written
    bar.close()
    prev = passed
    results.append(
      StageResult(
        name=st.spec.name,
        settings=settings,
        files=stage_files,
        stats=stats,
        traces=st.sampler.trace_count - traces0,
      )
    )
    if lead:
      log(
        f"stage {st.spec.name}: {stats.images} images {st.spec.image_size}x{st.spec.image_size} "
        f"in {stats.seconds:.2f}s = {stats.images_per_second:.2f} images/s, "
        f"{1000 * stats.seconds_per_step:.1f} ms "
        f"per sampler step (batch {st.sampler.batch_size}, {st.sampler.mesh.size} device(s)); "
        f"compiled {st.sampler.programs} program(s) in {stats.compile_seconds:.1f}s"
      )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("imagen_jax.sample: images written")
  if lead:
    if grids:
      _write_grids(out_dir, stages, results, jobs, text)
    _write_record(
      out_dir,
      stages,
      results,
      jobs,
      text,
      seed=seed,
      samples_per_prompt=s,
      strength=strength,
      init=init_images is not None and masks is None,
      extra={
        "negative_prompts": None if negative is None else list(negative[2]),
        "inpainting": None if masks is None else {"masks": len(masks), "resample": int(resample)},
        **(record_extra or {}),
      },
    )
  return CascadeResult(out_dir=str(out_dir), stages=results, jobs=jobs, final=prev)


def _write_grids(
  out_dir: epath.Path, stages, results: List[StageResult], jobs, text: EncodedPrompts
) -> None:
  n_in = max(j["input"] for j in jobs) + 1
  s = max(j["sample"] for j in jobs) + 1
  labels = [text.texts[next(j["prompt"] for j in jobs if j["input"] == k)] for k in range(n_in)]
  by = {(j["input"], j["sample"]): i for i, j in enumerate(jobs)}
  for st, res in zip(stages, results):

    def rows_of(files):
      return [[imio.read_image(out_dir / files[by[(k, j)]]) for k in range(n_in)] for j in range(s)]

    main = imio.grid(
      rows_of(res.files[0]),
      labels,
      [f"sample {j}" for j in range(s)] if s > 1 else (),
      title=f"{st.spec.name}: {res.settings[0].label(st.super_resolution)}",
    )
    imio.save_png(out_dir / st.spec.name / "grid.png", main)
    if len(res.settings) > 1:
      rows, row_labels = [], []
      for setting, files in zip(res.settings, res.files):
        for j, row in enumerate(rows_of(files)):
          rows.append(row)
          row_labels.append(setting.label(st.super_resolution) + (f" #{j}" if s > 1 else ""))
      imio.save_png(
        out_dir / st.spec.name / "sweep.png",
        imio.grid(
          rows, labels, row_labels, title=f"{st.spec.name}: sweep (same seeds in every row)"
        ),
      )
  last = stages[-1].spec.name
  if len(stages) == 1:
    imio.save_png(out_dir / "grid.png", imio.read_image(out_dir / last / "grid.png"))
    return
  # The cascade side by side: a row per stage (first setting, first sample of each input), every
  # image enlarged (nearest) to the last stage's size, so each SR output sits under its input.
  size = stages[-1].spec.image_size
  rows, row_labels = [], []
  for st, res in zip(stages, results):
    row = []
    for k in range(n_in):
      im = imio.read_image(out_dir / res.files[0][by[(k, 0)]])
      f = max(1, size // im.shape[0])
      row.append(im.repeat(f, axis=0).repeat(f, axis=1))
    rows.append(row)
    row_labels.append(f"{st.spec.name} {st.spec.image_size}px")
  imio.save_png(
    out_dir / "grid.png",
    imio.grid(rows, labels, row_labels, title="cascade: each stage's output (sample 0)"),
  )


def _write_record(
  out_dir: epath.Path,
  stages,
  results,
  jobs,
  text: EncodedPrompts,
  *,
  seed,
  samples_per_prompt,
  strength,
  init: bool,
  extra,
) -> None:
  record = {
    "seed": seed,
    "samples_per_prompt": samples_per_prompt,
    "key_rule": "fold_in(PRNGKey(image seed), stage index)",
    "prompts": [
      {"index": i, "text": t, "tokens": n, "truncated": c}
      for i, (t, n, c) in enumerate(zip(text.texts, text.lengths, text.truncated))
    ],
    "images": jobs,
    "img2img_strength": strength if init else None,
    "stages": [
      {
        "name": st.spec.name,
        "index": st.index,
        "network": st.description,
        "checkpoint": st.checkpoint,
        "image_size": st.spec.image_size,
        "objective": st.diffusion.objective,
        "schedule": st.diffusion.training_record()["schedule"],
        "settings": [dataclasses.asdict(x) for x in res.settings],
        "passed_on": 0,
        "files": res.files,
        "speed": {
          "images": res.stats.images,
          "seconds": round(res.stats.seconds, 4),
          "images_per_second": round(res.stats.images_per_second, 4),
          "seconds_per_step": round(res.stats.seconds_per_step, 6),
          "compile_seconds": round(res.stats.compile_seconds, 2),
          "traces": res.traces,
          "batch_size": st.sampler.batch_size,
          "devices": int(st.sampler.mesh.size),
        },
      }
      for st, res in zip(stages, results)
    ],
    **(extra or {}),
  }
  files.write_json(out_dir / "settings.json", record)


# --------------------------------------------------------------------------------- the gin entry
# point


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
  """What a sampling config describes: the stages (`stage()` specs) and the text encoder they
  take."""

  stages: Sequence[StageSpec]
  vocab: str
  encoder: str
  max_text_length: int = 128
  batch_size: int = 8


@gin.configurable
def cascade_config(
  *,
  stages: Sequence[StageSpec] = gin.REQUIRED,
  vocab: str = gin.REQUIRED,
  encoder: str = gin.REQUIRED,
  max_text_length: int = 128,
  batch_size: int = 8,
) -> CascadeConfig:
  """The cascade of a sampling gin config (`gin_configs/runs/sample_*.gin`).

  Args:
    stages: the stages in order (`@base/stage()`, ...).
    vocab: the sentencepiece model.
    encoder: the T5 encoder checkpoint (ours, Hugging Face or T5X).
    max_text_length: tokens per prompt.
    batch_size: images per sampler call.

  Returns:
    The `CascadeConfig`.
  """
  require("cascade_config", stages=stages, vocab=vocab, encoder=encoder)
  return CascadeConfig(
    stages=tuple(stages),
    vocab=str(vocab),
    encoder=str(encoder),
    max_text_length=int(max_text_length),
    batch_size=int(batch_size),
  )


@dataclasses.dataclass
class Cascade:
  """Loaded, checked stages plus the text encoder they take: what `sample` and the evaluations
  share."""

  stages: List[LoadedStage]
  vocab: str
  encoder: str
  max_text_length: int
  _encoder: Any = dataclasses.field(default=None, repr=False)  # (config, params), once read

  def encode(self, prompts: Sequence[str], warn=print) -> EncodedPrompts:
    """The prompts' T5 embeddings, checked against the stages' text width. The encoder checkpoint
    is read once per cascade (prompts and negative prompts share it)."""
    from imagen_jax.text import checkpoints as text_checkpoints

    if self._encoder is None:
      self._encoder = text_checkpoints.load_any(self.encoder, None)
    text = encode_prompts(
      prompts, self.vocab, self.encoder, self.max_text_length, warn=warn, loaded=self._encoder
    )
    for st in self.stages:
      if st.model_config.text_embed_dim != text.emb.shape[-1]:
        raise SampleError(
          f"stage {st.spec.name}: the network takes {st.model_config.text_embed_dim}-d text "
          f"embeddings, the text encoder gives {text.emb.shape[-1]}-d"
        )
    return text

  def generate(
    self,
    text: EncodedPrompts,
    prompt_index: Sequence[int],
    seeds: Sequence[int],
    settings: Sequence[StageSettings],
    *,
    guided: Sequence[Optional[bool]],
    stats: Optional[Sequence[RunStats]] = None,
    negative: Optional[Tuple[np.ndarray, np.ndarray, Sequence[str]]] = None,
  ) -> List[np.ndarray]:
    """Every stage's images (uint8, N x S x S x 3), one setting per stage; each SR stage sees the
    previous stage's 8-bit output (as `sample` passes it on).

    Args:
      text: the encoded prompts.
      prompt_index: each image's prompt.
      seeds: each image's seed.
      settings: one setting per stage.
      guided: per stage, compile the guided program even at w = 1 (None: guided unless w = 1).
      stats: per stage, timings to add to.
      negative: per-prompt negative prompts (`encode_negative`).

    Returns:
      One uint8 array per stage.
    """
    idx = np.asarray(prompt_index, np.int64)
    emb, mask = text.emb[idx], text.mask[idx]
    neg = None if negative is None else (negative[0][idx], negative[1][idx])
    prev, out = None, []
    for i, (st, setting) in enumerate(zip(self.stages, settings)):
      u8 = st.images(
        emb,
        mask,
        seeds,
        setting,
        lowres=prev,
        negative=neg,
        guided=guided[i],
        stats=stats[i] if stats is not None else None,
      )
      out.append(u8)
      prev = imio.from_uint8(u8)
    return out

  def attach_null_texts(self, warn=print) -> None:
    """Encodes the empty prompt once for the stages whose null condition it is (DeepFloyd IF's:
    guidance's unconditional half is T5("") over all positions, not the masked-out zeros)."""
    needed = [st for st in self.stages if st.diffusion.null_text == "empty_prompt"]
    if not needed:
      return
    enc = self.encode([""], warn=warn)
    for st in needed:
      st.sampler.null_text = (enc.emb[0], enc.mask[0])

  def encode_negative(
    self, negatives: Sequence[str], num_prompts: int, warn=print
  ) -> Optional[Tuple[np.ndarray, np.ndarray, List[str]]]:
    """Negative prompts, one for every prompt or one per prompt, as per-prompt (emb (P, L, D),
    mask (P, L), texts): an empty negative prompt is the null condition (zeros, all False), so it
    reproduces plain guidance exactly; None when every negative prompt is empty.

    Raises:
      SampleError: neither one nor num_prompts negative prompts.
    """
    negatives = [str(t) for t in negatives]
    if len(negatives) not in (1, num_prompts):
      raise SampleError(
        f"{len(negatives)} negative prompts for {num_prompts} prompts; give one, or one per prompt"
      )
    if len(negatives) == 1:
      negatives = negatives * num_prompts
    used = [t for t in negatives if t.strip()]
    if not used:
      return None
    enc = self.encode(used, warn=warn)
    emb = np.zeros((num_prompts,) + enc.emb.shape[1:], np.float32)
    mask = np.zeros((num_prompts,) + enc.mask.shape[1:], bool)
    rows = [i for i, t in enumerate(negatives) if t.strip()]
    emb[rows], mask[rows] = enc.emb, enc.mask
    return emb, mask, negatives


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def prepare(
  config: CascadeConfig,
  *,
  batch_size: Optional[int] = None,
  only: Optional[Sequence[str]] = None,
  overrides: Sequence = (),
  checkpoint_steps: Optional[Dict[str, int]] = None,
  run_dirs: Optional[Dict[str, str]] = None,
  has_lowres_input: bool = False,
  progress: bool = True,
  warn=_warn,
) -> Cascade:
  """Loads and checks a cascade's stages.

  Args:
    config: the cascade (`cascade_config()` of a sampling gin config).
    batch_size: images per sampler call (default the config's).
    only: the stages to load (contiguous; default all).
    overrides: per-stage settings [(stage or None, field, values)] (`settings.stage_sweeps`).
    checkpoint_steps: {stage: step} instead of the latest checkpoint.
    run_dirs: {stage: run directory} replacing the configured ones.
    has_lowres_input: the first stage is given low-resolution inputs (an SR stage).
    progress: print a line per stage.
    warn: called with warnings.

  Returns:
    The `Cascade`.
  """
  specs = list(config.stages)
  batch_size = config.batch_size if batch_size is None else batch_size
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise SampleError(f"stage names must differ, got {names}")
  chosen = list(only) if only else names
  unknown = [n for n in chosen if n not in names]
  if unknown:
    raise SampleError(f"no stage {unknown[0]!r} (stages: {', '.join(names)})")
  pos = sorted(names.index(n) for n in chosen)
  if pos != list(range(pos[0], pos[-1] + 1)):
    raise SampleError(
      f"the stages chosen (only) must be contiguous in the cascade ({' -> '.join(names)}), got "
      f"{', '.join(chosen)}"
    )
  for what, given in (("checkpoint_steps", checkpoint_steps), ("run_dirs", run_dirs)):
    for name, value in (given or {}).items():
      if name not in names:
        raise SampleError(f"{what} {name}={value}: no stage {name!r} (stages: {', '.join(names)})")
  sweeps = stage_sweeps(overrides, names)
  loaded = []
  for i in pos:
    spec = specs[i]
    sweep = sweeps.get(spec.name)
    if sweep:
      spec = dataclasses.replace(spec, settings=tuple(apply_sweep(spec.settings[0], sweep)))
    if checkpoint_steps and spec.name in checkpoint_steps:
      spec = dataclasses.replace(spec, step=int(checkpoint_steps[spec.name]))
    if run_dirs and spec.name in run_dirs:
      spec = dataclasses.replace(spec, run_dir=str(run_dirs[spec.name]))
    st = load_stage(spec, i, batch_size=batch_size, warn=warn)
    loaded.append(st)
    if progress and jax.process_index() == 0:
      print(
        f"stage {spec.name}: {st.description}, checkpoint {st.checkpoint['path']} (step "
        f"{st.checkpoint['step']}); "
        f"{len(spec.settings)} setting(s): "
        f"{'; '.join(x.label(st.super_resolution) for x in spec.settings)}",
        flush=True,
      )
  check_chain(loaded, has_lowres_input)
  cascade = Cascade(
    stages=loaded,
    vocab=config.vocab,
    encoder=config.encoder,
    max_text_length=config.max_text_length,
  )
  cascade.attach_null_texts(warn=warn)
  return cascade


def sample(
  config: CascadeConfig,
  *,
  prompts: Sequence[str],
  out_dir: str,
  seed: int = 0,
  samples_per_prompt: int = 1,
  batch_size: Optional[int] = None,
  only: Optional[Sequence[str]] = None,
  overrides: Sequence = (),
  checkpoint_steps: Optional[Dict[str, int]] = None,
  lowres_images: Optional[str] = None,
  init_images: Optional[str] = None,
  strength: float = 0.8,
  negative_prompts: Optional[Sequence[str]] = None,
  masks: Optional[str] = None,
  mask_keep: str = "white",
  resample: int = 1,
  progress: bool = True,
  record_extra: Optional[dict] = None,
  grids: bool = True,
) -> CascadeResult:
  """Loads, checks and samples a cascade (or the stages named in `only`) into `out_dir`.

  Args:
    config: the cascade (`cascade_config()` of a sampling gin config).
    prompts: the prompts.
    out_dir: the output folder (new or empty; layout in docs/guide.md).
    seed: image (k, j) has seed + k * samples_per_prompt + j.
    samples_per_prompt: images per prompt (or per input image).
    batch_size: images per sampler call (default the config's).
    only: contiguous stages to run (default all).
    overrides: per-stage settings [(stage or None, field, values)] (`settings.stage_sweeps`).
    checkpoint_steps: {stage: step}.
    lowres_images: a folder of low-resolution inputs for a cascade that starts at an SR stage.
    init_images: img2img: a folder of images the first stage starts from; with masks, the known
      images of inpainting (a file or a folder; any square size).
    strength: img2img strength.
    negative_prompts: one negative prompt for all prompts, or one per prompt ('' = none).
    masks: inpainting: a mask file or folder (one per init image, or one for all).
    mask_keep: 'white' (white pixels are kept) or 'black'.
    resample: RePaint's resampling count when inpainting (1: none).
    progress: progress bars and lines.
    record_extra: more fields for settings.json.
    grids: write grid images.

  Returns:
    The `CascadeResult`.
  """
  if not prompts:
    raise SampleError("no prompts")
  out = epath.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise SampleError(f"out_dir {out} is not empty; choose a new directory")
  if resample < 1:
    raise SampleError(f"resample must be >= 1, got {resample}")
  init = mask_arr = None
  if masks is not None:  # any size: read (and checked) before the stages are loaded
    if init_images is None:
      raise SampleError("inpainting: masks need the image(s) to inpaint (init_images)")
    try:
      init, _ = imio.read_square_images(init_images, "init_images image")
      mask_arr = imio.read_masks(masks, mask_keep)
    except imio.ImageError as e:
      raise SampleError(str(e)) from None
  cascade = prepare(
    config,
    batch_size=batch_size,
    only=only,
    overrides=overrides,
    checkpoint_steps=checkpoint_steps,
    has_lowres_input=lowres_images is not None,
    progress=progress,
  )
  loaded = cascade.stages
  text = cascade.encode(prompts, warn=_warn)
  negative = None
  if negative_prompts is not None:
    negative = cascade.encode_negative(negative_prompts, len(prompts), warn=_warn)
  low = None
  try:
    if lowres_images is not None:
      low, _ = imio.read_folder(lowres_images, loaded[0].lowres_size, "lowres_images image")
    if masks is None and init_images is not None:
      init, _ = imio.read_folder(init_images, loaded[0].spec.image_size, "init_images image")
  except imio.ImageError as e:
    raise SampleError(str(e)) from None
  return run_cascade(
    loaded,
    text,
    out,
    seed=seed,
    samples_per_prompt=samples_per_prompt,
    lowres_images=low,
    init_images=init,
    strength=strength,
    negative=negative,
    masks=mask_arr,
    resample=resample,
    progress=progress,
    record_extra=record_extra,
    grids=grids,
  )
