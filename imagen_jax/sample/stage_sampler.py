"""One cascade stage's jitted batch sampler, sharded over the local devices on the data axis.

`StageSampler.run(params, text, keys, settings)` draws one image per row of `keys`:
- every image has its own PRNG key (`image_keys`: its seed folded with the stage's index), so an
  image is the same whatever the batch size, the padding and the number of devices;
- rows are cut into batches of `batch_size` (a multiple of the device count); the last batch is
  padded by repeating its first row, and the padding is dropped;
- the whole multi-step loop is one compiled program per (batch shape, guided or not, sampler
  family, img2img or not, inpainting or not, negative prompts or not): the step count, guidance
  weight, thresholding (method and percentile), step spacing, DPM-Solver++'s order and SDE flag,
  SR augmentation level, DDIM eta, img2img strength and RePaint's resampling count are traced
  arguments, and negative prompts are inputs, so a sweep over them compiles once. Without negative
  prompts the unconditional half is the null condition built inside the program. `trace_count`
  counts traces.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax import batch_keys as K
from imagen_jax import partitioning
from imagen_jax.diffusion import DiffusionConfig, guidance, process, samplers, thresholding
from imagen_jax.errors import UserError
from imagen_jax.sample.settings import SettingsError, StageSettings


def image_keys(seeds, stage_index: int) -> np.ndarray:
  """(N, 2) uint32 keys: fold_in(PRNGKey(seed), stage_index) per image seed."""
  seeds = np.asarray(seeds, np.int64)
  if seeds.size and (seeds.min() < 0 or seeds.max() >= 2**31):
    raise UserError(f"image seeds must lie in [0, 2^31), got [{seeds.min()}, {seeds.max()}]")
  fn = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), stage_index))
  return np.asarray(fn(jnp.asarray(seeds, jnp.int32)), np.uint32)


@dataclasses.dataclass
class RunStats:
  images: int = 0
  batches: int = 0
  steps: int = 0  # network evaluations of the loop summed over batches (per batch: num_steps;
  # inpainting with resampling R: (num_steps - 1) * R + 1)
  seconds: float = 0.0  # sampling, device-synchronised, compilation excluded
  compile_seconds: float = 0.0

  @property
  def images_per_second(self) -> float:
    return self.images / self.seconds if self.seconds else float("nan")

  @property
  def seconds_per_step(self) -> float:
    return self.seconds / self.steps if self.steps else float("nan")


class StageSampler:
  """The batch sampler of one stage: network `apply_fn(params, z, log_snr, cond)`, its
  DiffusionConfig (the trained objective and schedules), the output resolution, and a mesh
  (default: the local devices on data)."""

  def __init__(
    self,
    apply_fn: Callable[..., Any],
    diffusion: DiffusionConfig,
    image_size: int,
    *,
    super_resolution: bool,
    batch_size: int = 8,
    mesh=None,
    channels: int = 3,
    null_text=None,
  ):
    self.apply_fn = apply_fn
    # The empty prompt's (emb (L, D), mask (L,)) for stages whose null condition it is (DeepFloyd
    # IF): guidance's unconditional half wherever no negative prompt is given.
    self.null_text = null_text
    self.diffusion = diffusion
    self.image_size = image_size
    self.channels = channels
    self.super_resolution = super_resolution
    self.mesh = (
      mesh if mesh is not None else partitioning.create_mesh(-1, 1, 1, devices=jax.local_devices())
    )
    shards = partitioning.data_ways(self.mesh)
    self.batch_size = -(-max(batch_size, 1) // shards) * shards
    self.trace_count = 0
    self._jitted = jax.jit(
      self._run,
      static_argnames=("guided", "sampler", "has_init", "has_mask", "has_negative", "grid"),
    )
    self._compiled: Dict[Any, Any] = {}

  @property
  def programs(self) -> int:
    """How many programs (batch shape x guided x sampler family x img2img x inpainting x
    negative prompts) this stage has compiled."""
    return len(self._compiled)

  def place_params(self, params):
    """Parameters replicated on the mesh (use as they are when they already live on it, e.g. in
    training)."""
    return jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))

  def _run(self, params, data, scalars, *, guided, sampler, has_init, has_mask, has_negative, grid):
    self.trace_count += 1  # runs at trace time only
    keys, lowres = data["keys"], data[K.LOWRES]
    k_aug, k_sample = process.split_key(keys)
    cond = {K.TEXT_EMB: data[K.TEXT_EMB], K.TEXT_MASK: data[K.TEXT_MASK]}
    if self.super_resolution:
      low, level = self.diffusion.augment_lowres(
        lowres, k_aug, scalars["aug_level"], self.image_size
      )
      cond[K.LOWRES] = low
      cond[K.LOWRES_AUG_LEVEL] = level
    uncond = None
    if has_negative:  # otherwise the null condition, built inside the program
      uncond = guidance.negative_condition(cond, data["neg_emb"], data["neg_mask"])
    shape = (keys.shape[0], self.image_size, self.image_size, self.channels)
    return samplers.sample(
      functools.partial(self.apply_fn, params),
      k_sample,
      shape,
      cond,
      schedule=self.diffusion.schedule,
      num_steps=scalars["num_steps"],
      objective=self.diffusion.objective,
      sampler=sampler,
      ddim_eta=scalars["ddim_eta"],
      guidance_scale=scalars["guidance_scale"] if guided else 1.0,
      thresholding_method=scalars["thresholding"],
      percentile=scalars["percentile"],
      spacing=scalars["spacing"],
      solver_order=scalars["solver_order"],
      sde=scalars["sde"],
      uncond=uncond,
      known=data["known"] if has_mask else None,
      mask=data["mask"] if has_mask else None,
      resample=scalars["resample"],
      x_init=data["x_init"] if has_init else None,
      t_start=scalars["t_start"],
      t_grid=scalars["t_grid"] if grid else None,
      threshold_max=scalars["threshold_max"],
      learned_variance=self.diffusion.learned_variance,
    )

  def _grid(self, settings: StageSettings) -> np.ndarray:
    """The grid times of a discrete step setting (a step set or a diffusers spacing)."""
    steps = getattr(self.diffusion.schedule, "num_timesteps", None)
    if steps is None:
      raise SettingsError(
        f"discrete steps ({settings.timesteps or settings.spacing}) need a discrete schedule; "
        f"this stage trained with {type(self.diffusion.schedule).__name__}"
      )
    return samplers.timesteps_to_grid(settings.discrete_steps(steps), steps)

  def _scalars(self, settings: StageSettings, t_start: float, resample: int):
    grid = self._grid(settings) if settings.is_discrete() else np.zeros((1,), np.float32)
    spacing = "uniform" if settings.is_discrete() else settings.spacing
    return {
      "t_grid": grid,
      "threshold_max": np.float32(settings.threshold_max or np.inf),
      "spacing": np.int32(samplers.spacing_index(spacing)),
      "solver_order": np.int32(samplers.SOLVER_ORDER[settings.sampler]),
      "sde": np.float32(settings.sampler.endswith("_sde")),
      "resample": np.int32(resample),
      "num_steps": np.int32(settings.num_steps),
      "guidance_scale": np.float32(settings.guidance_scale),
      "thresholding": np.int32(thresholding.thresholding_index(settings.thresholding)),
      "percentile": np.float32(settings.percentile),
      "aug_level": np.float32(settings.aug_level),
      "ddim_eta": np.float32(settings.ddim_eta),
      "t_start": np.float32(t_start),
    }

  def run(
    self,
    params,
    text_emb: np.ndarray,
    text_mask: np.ndarray,
    keys: np.ndarray,
    settings: StageSettings,
    *,
    lowres: Optional[np.ndarray] = None,
    x_init: Optional[np.ndarray] = None,
    strength: float = 1.0,
    negative_emb: Optional[np.ndarray] = None,
    negative_mask: Optional[np.ndarray] = None,
    known: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    resample: int = 1,
    guided: Optional[bool] = None,
    stats: Optional[RunStats] = None,
    on_batch: Optional[Callable[[int, int], None]] = None,
  ) -> np.ndarray:
    """Images (N, S, S, C) float32 in the model's range, one per row of keys (N, 2).

    Args:
      params: the stage's parameters.
      text_emb, text_mask: (N, L, D) and (N, L): the prompts' encodings.
      keys: (N, 2) per-image keys (`image_keys`).
      settings: the sampling setting.
      lowres: (N, s, s, C) SR stages' conditioning images.
      x_init, strength: img2img: (N, S, S, C) and a strength in [0, 1].
      negative_emb, negative_mask: (N, L, D) and (N, L): the negative prompts' encodings, the
        unconditional half of guidance (rows of zeros and an all-False mask: the null condition,
        also the default).
      known, mask: inpainting: (N, S, S, C) known images and (N, S, S, 1) masks (1 = keep).
      resample: RePaint's resampling count when inpainting (1: none).
      guided: compile the guided program (doubled batch) even where w = 1, so that a sweep over w
        compiles once; default: guided unless w is 1.
      stats: accumulates timings.
      on_batch: called as on_batch(done, total) after each batch (progress bars).

    Returns:
      (N, S, S, C) float32 images.
    """
    n = keys.shape[0]
    if self.super_resolution and lowres is None:
      raise ValueError("a super-resolution stage needs its low-resolution images")
    if (known is None) != (mask is None):
      raise ValueError("inpainting needs both the known images and their masks")
    guided = (settings.guidance_scale != 1.0) if guided is None else guided
    has_init, has_mask = x_init is not None, mask is not None
    scalars = self._scalars(settings, strength if has_init else 1.0, resample)
    text_emb = np.asarray(text_emb, np.float32)
    text_mask = np.asarray(text_mask, bool)
    if self.null_text is not None and guided:
      negative_emb, negative_mask = self._with_null_text(
        negative_emb, negative_mask, text_emb.shape
      )
    placeholder = np.zeros((n, 1, 1, 1), np.float32)
    has_negative = negative_emb is not None and guided
    data = {
      K.TEXT_EMB: text_emb,
      K.TEXT_MASK: text_mask,
      "keys": np.asarray(keys, np.uint32),
      K.LOWRES: np.asarray(lowres, np.float32) if lowres is not None else placeholder,
      "x_init": np.asarray(x_init, np.float32) if has_init else placeholder,
      "neg_emb": np.asarray(negative_emb, np.float32) if has_negative else placeholder,
      "neg_mask": np.asarray(negative_mask, bool) if has_negative else placeholder[..., 0, 0],
      "known": np.asarray(known, np.float32) if has_mask else placeholder,
      "mask": np.asarray(mask, np.float32) if has_mask else placeholder,
    }
    if has_negative and (
      data["neg_emb"].shape != text_emb.shape or data["neg_mask"].shape != text_mask.shape
    ):
      raise ValueError(
        f"negative prompts' encodings {data['neg_emb'].shape} do not match the prompts' "
        f"{text_emb.shape}"
      )
    static = dict(
      guided=guided,
      sampler=samplers.FAMILY_SAMPLER[samplers.FAMILY[settings.sampler]],
      has_init=has_init,
      has_mask=has_mask,
      has_negative=has_negative,
      grid=settings.is_discrete(),
    )
    if settings.is_discrete() and (has_init or has_mask):
      raise SettingsError("discrete step sets do not support img2img or inpainting")

    def run_batch(rows):
      batch = {
        k: jax.device_put(v[rows], partitioning.batch_sharding(self.mesh, v.ndim))
        for k, v in data.items()
      }
      fn = self._compile(params, batch, scalars, static, stats)
      t0 = time.perf_counter()
      with partitioning.mesh_context(self.mesh):
        x = fn(params, batch, scalars)
      x = jax.block_until_ready(x)
      if not x.is_fully_addressable:  # a multi-host mesh (the trainer's sample hook)
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
      x = np.asarray(jax.device_get(x))
      if stats is not None:
        stats.seconds += time.perf_counter() - t0
        stats.batches += 1
        repeats = max(int(resample), 1) if has_mask else 1
        stats.steps += (settings.num_steps - 1) * repeats + 1
        stats.images += int(len(np.unique(rows)))
      return x

    out = partitioning.pad_shard_unpad(
      run_batch, n, self.batch_size, multiple=partitioning.data_ways(self.mesh), on_batch=on_batch
    )
    if out is None:
      return np.zeros((0, self.image_size, self.image_size, self.channels), np.float32)
    return out

  def _with_null_text(self, negative_emb, negative_mask, shape):
    """The negative prompts where given (a row with an all-False mask is none), the null text
    (`null_text`) in every other row."""
    e, m = (np.asarray(a) for a in self.null_text)
    if e.shape != tuple(shape[1:]):
      raise SettingsError(
        f"the empty prompt's embedding {e.shape} does not match the prompts' {tuple(shape[1:])}"
      )
    n = shape[0]
    emb = np.broadcast_to(e, (n,) + e.shape).astype(np.float32)
    mask = np.broadcast_to(m, (n,) + m.shape).astype(bool)
    if negative_emb is not None:
      given = np.asarray(negative_mask, bool).any(axis=1)
      emb[given], mask[given] = np.asarray(negative_emb)[given], np.asarray(negative_mask)[given]
    return emb, mask

  def _compile(self, params, batch, scalars, static, stats):
    key = (
      tuple((k, v.shape) for k, v in sorted(batch.items())),
      tuple(sorted(static.items())),
      scalars["t_grid"].shape,
    )
    if key not in self._compiled:
      t0 = time.perf_counter()
      with partitioning.mesh_context(self.mesh):
        self._compiled[key] = self._jitted.lower(params, batch, scalars, **static).compile()
      if stats is not None:
        stats.compile_seconds += time.perf_counter() - t0
    return self._compiled[key]


def model_apply_fn(model: nn.Module) -> Callable[..., Any]:
  """A Flax network as `apply_fn(params, z, log_snr, cond)`, deterministic (no dropout)."""

  def apply(params, z, log_snr, cond):
    return model.apply({"params": params}, z, log_snr, cond, deterministic=True)

  return apply
