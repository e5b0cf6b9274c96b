"""Throughput of a stage on the local devices: the trainer's own step (`train.setup`) on a synthetic
in-memory batch, or the sampler's jitted loop with random parameters, and FID feature extraction.

Device-synchronised calls, the median after warm-up, FLOPs from XLA (the unrolled program where a
loop body would count once), MFU against the chip table's peak. Method and figures:
docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from imagen_jax import files, models, partitioning
from imagen_jax.errors import UserError
from imagen_jax.scale import flops as flops_lib


@dataclasses.dataclass
class BenchResult:
  what: str
  name: str
  device_kind: str
  devices: int
  mesh: Dict[str, int]
  batch: int
  seconds: List[float]
  seconds_median: float
  images_per_second: float
  flops_per_device: Optional[float]
  flops_source: str
  tflops_per_device: Optional[float]
  peak_flops: float
  peak_source: str
  mfu: Optional[float]
  compile_seconds: float
  unit: str = "step"  # what seconds are per: a train step, or a sampling step
  # images_per_second: train: batch / step time; sample: batch / (whole run of extra['num_steps']
  # steps)
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def check_counts(repeats: int, warmup: int) -> None:
  """Raises a `UserError` unless repeats >= 1 and warmup >= 0 (checked before minutes of
  compiling)."""
  if repeats < 1 or warmup < 0:
    raise UserError(f"repeats must be at least 1 and warmup at least 0, got {repeats} and {warmup}")


def timed_calls(call: Callable[[], Any], repeats: int, warmup: int) -> List[float]:
  """Seconds of `repeats` device-synchronised calls after `warmup` untimed ones."""
  import jax

  check_counts(repeats, warmup)
  for _ in range(warmup):
    jax.block_until_ready(call())
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    out.append(time.perf_counter() - t0)
  return out


def summarise(
  what: str,
  name: str,
  *,
  seconds: Sequence[float],
  batch: int,
  flops: Optional[float],
  flops_source: str,
  mesh,
  compile_seconds: float,
  unit: str = "step",
  per_call_units: int = 1,
  extra=None,
) -> BenchResult:
  """A result from per-call timings; a call may hold several units (a sampling run of N steps)."""
  import jax

  device = jax.local_devices()[0]
  peak, source = flops_lib.device_peak_flops(device)
  per_unit = [s / per_call_units for s in seconds]
  med = float(np.median(per_unit))
  tflops = flops / med / 1e12 if flops else None
  util = flops_lib.mfu(flops, med, peak) if flops else None
  return BenchResult(
    what=what,
    name=name,
    device_kind=device.device_kind,
    devices=jax.device_count(),
    mesh=dict(mesh.shape),
    batch=batch,
    seconds=per_unit,
    seconds_median=med,
    images_per_second=batch / med / (per_call_units if unit == "sampling step" else 1),
    flops_per_device=flops,
    flops_source=flops_source,
    tflops_per_device=tflops,
    peak_flops=peak,
    peak_source=source,
    mfu=util,
    compile_seconds=compile_seconds,
    unit=unit,
    extra=extra or {},
  )


def synthetic_batch(model_config, global_batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """Random in-memory training batch of the shapes and dtypes the trainer feeds (half the text
  masked)."""
  from imagen_jax.train.setup import batch_shapes

  rng = np.random.default_rng(seed)
  out = {}
  for k, s in batch_shapes(model_config, global_batch).items():
    if s.dtype == np.bool_:
      out[k] = np.arange(s.shape[1])[None, :] < rng.integers(1, s.shape[1] + 1, (s.shape[0], 1))
    else:
      out[k] = np.clip(rng.standard_normal(s.shape), -1, 1).astype(s.dtype)
  return out


def _name(cfg) -> str:
  millions = models.count_params(models.abstract_params(cfg)) / 1e6
  return f"{type(cfg).__name__} {cfg.image_size}px, {millions:.1f}M params"


def bench_train(run, *, repeats: int = 10, warmup: int = 2, seed: int = 0) -> BenchResult:
  """The train step of `run` (a `train.setup.RunSpec`) on the local devices."""
  import jax

  from imagen_jax.scale import compile_check
  from imagen_jax.train.setup import TrainSetup

  setup = TrainSetup(run, partitioning.create_mesh(*run.mesh_shape, devices=jax.local_devices()))
  mesh = setup.mesh
  state = setup.create_state(seed)
  host = synthetic_batch(run.model_config, run.global_batch, seed)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()}
  t0 = time.perf_counter()
  lowered, sig = setup.lower(shapes, state=state)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - t0
  batch = {k: jax.device_put(v, sig.in_shardings[1][k]) for k, v in host.items()}
  flops, source = flops_lib.compiled_flops(compiled), "XLA cost analysis of the compiled step"
  if run.model_config.scan_layers:
    unrolled = compile_check.unrolled_flops_per_chip(run, mesh.size, run.global_batch)
    if unrolled:
      flops, source = (
        unrolled,
        "the unscanned step's lowered HLO over the devices (a scan body counts once in XLA)",
      )
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], batch, None)
    return metrics

  seconds = timed_calls(call, repeats, warmup)
  cfg = run.model_config
  name = _name(cfg)
  try:  # the compiled step's buffers on the device (XLA's memory analysis), where it reports them
    analysed = compile_check.Memory.of(compiled)
    memory = dict(dataclasses.asdict(analysed), total=analysed.total)
  except (AttributeError, NotImplementedError, TypeError):
    memory = None
  return summarise(
    "train",
    name,
    seconds=seconds,
    batch=run.global_batch,
    flops=flops,
    flops_source=source,
    mesh=mesh,
    compile_seconds=compile_seconds,
    extra={
      "dtype": cfg.dtype,
      "remat": cfg.remat,
      "scan_layers": cfg.scan_layers,
      "memory_bytes": memory,
    },
  )


def bench_sample(
  run,
  *,
  batch_size: int = 8,
  num_steps: int = 16,
  guidance: float = 5.0,
  repeats: int = 3,
  warmup: int = 1,
  seed: int = 0,
) -> BenchResult:
  """The stage's sampling loop (guided, `num_steps` steps) with random parameters on the local
  devices."""
  import flax.linen as nn
  import jax

  from imagen_jax import models
  from imagen_jax.sample.settings import StageSettings
  from imagen_jax.sample.stage_sampler import StageSampler, image_keys, model_apply_fn

  cfg = run.model_config
  sr = models.is_super_resolution(cfg)
  sampler = StageSampler(
    model_apply_fn(models.build_model(cfg)),
    run.diffusion,
    cfg.image_size,
    super_resolution=sr,
    batch_size=batch_size,
  )
  n = sampler.batch_size
  params = sampler.place_params(nn.unbox(models.init_boxed_params(cfg, jax.random.PRNGKey(seed))))
  host = synthetic_batch(cfg, n, seed)
  from imagen_jax import batch_keys as K

  keys = image_keys(np.arange(n), 0)
  settings = StageSettings(num_steps=num_steps, guidance_scale=guidance)
  run_once = lambda: sampler.run(
    params,
    host[K.TEXT_EMB],
    host[K.TEXT_MASK],
    keys,
    settings,
    lowres=host.get(K.LOWRES),
    guided=True,
  )
  t0 = time.perf_counter()
  run_once()  # compiles
  compile_seconds = time.perf_counter() - t0
  seconds = timed_calls(run_once, repeats, warmup - 1 if warmup > 0 else 0)
  # One sampling step = one network evaluation on the doubled (conditional + unconditional) batch.
  unscanned = dataclasses.replace(cfg, scan_layers=False)
  model = models.build_model(unscanned)
  z, log_snr, cond = models.example_inputs(unscanned, 2 * n)
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  lowered = apply.lower(nn.unbox(models.abstract_params(unscanned)), z, log_snr, cond)
  flops = flops_lib.compiled_flops(lowered)
  flops = flops / sampler.mesh.size if flops else None
  name = _name(cfg)
  return summarise(
    "sample",
    name,
    seconds=seconds,
    batch=n,
    flops=flops,
    flops_source="one guided network evaluation (unscanned lowered HLO) per step",
    mesh=sampler.mesh,
    compile_seconds=compile_seconds,
    unit="sampling step",
    per_call_units=num_steps,
    extra={"num_steps": num_steps, "guidance": guidance},
  )


def bench_fid(
  *,
  batch_size: int = 64,
  image_size: int = 256,
  resize: str = "tf1",
  weights=None,
  repeats: int = 5,
  warmup: int = 1,
  seed: int = 0,
  json_path: Optional[str] = None,
) -> BenchResult:
  """FID feature extraction as `eval fid` runs it: uint8 host batches of `image_size` images
  through the jitted, data-sharded Inception (resize to 299 inside), features back on the host.
  Weights: a converted file, or random ones (the speed does not depend on them)."""
  import jax
  import jax.numpy as jnp

  from imagen_jax.eval.networks import inception

  check_counts(repeats, warmup)
  if image_size < 1 or batch_size < 1:
    raise UserError(
      f"image_size and batch_size must be positive, got {image_size} and {batch_size}"
    )
  if weights:
    variables = inception.load(weights)
  else:
    net = inception.FIDInceptionV3()
    variables = jax.jit(
      lambda k: net.init(k, jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
    )(jax.random.PRNGKey(seed))
  extractor = inception.FeatureExtractor(variables, batch_size=batch_size, resize=resize)
  n = extractor.batch_size
  images = np.random.default_rng(seed).integers(
    0, 256, (n, image_size, image_size, 3), dtype=np.uint8
  )
  t0 = time.perf_counter()
  extractor(images)  # compiles
  compile_seconds = time.perf_counter() - t0
  seconds = timed_calls(lambda: extractor(images), repeats, max(warmup - 1, 0))
  lowered = extractor._fn.lower(
    extractor.variables, jax.device_put(images, extractor._batch_sharding)
  )
  flops = flops_lib.compiled_flops(lowered)
  flops = flops / extractor.mesh.size if flops else None
  result = summarise(
    "fid",
    f"FID Inception-v3, {image_size}px inputs resized to 299 ({resize})",
    seconds=seconds,
    batch=n,
    flops=flops,
    flops_source="XLA cost analysis of the lowered extractor over the devices",
    mesh=extractor.mesh,
    compile_seconds=compile_seconds,
    unit="batch",
    extra={
      "image_size": image_size,
      "resize": resize,
      "random_weights": not weights,
      "includes": "host-to-device copy of uint8 images and the features back to the host",
    },
  )
  if json_path:
    files.write_json(json_path, result.to_json())
  return result


def format_table(r: BenchResult) -> str:
  rows = [
    ("what", f"{r.what} ({r.name})"),
    ("device", f"{r.devices} x {r.device_kind}, mesh {r.mesh}"),
    ("batch", str(r.batch)),
    (
      f"{r.unit} time",
      f"{1e3 * r.seconds_median:.2f} ms median of {len(r.seconds)} "
      f"(min {1e3 * min(r.seconds):.2f}, max {1e3 * max(r.seconds):.2f})",
    ),
    (
      "images/s",
      f"{r.images_per_second:,.2f}"
      + (f" ({r.extra['num_steps']}-step sampling runs)" if r.unit == "sampling step" else ""),
    ),
    (
      "FLOPs/device",
      f"{r.flops_per_device:.4g} ({r.flops_source})" if r.flops_per_device else "n/a",
    ),
    ("TFLOP/s/device", f"{r.tflops_per_device:.3f}" if r.tflops_per_device else "n/a"),
    ("peak", f"{r.peak_flops / 1e12:.2f} TFLOP/s ({r.peak_source})"),
    ("MFU", f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"),
    ("compile", f"{r.compile_seconds:.1f} s"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run(
  *,
  what: str,
  repeats: int = 10,
  warmup: int = 2,
  batch_size: int = 8,
  num_steps: int = 16,
  guidance: float = 5.0,
  json_path: Optional[str] = None,
) -> BenchResult:
  """The benchmark of the parsed gin config's stage.

  Args:
    what: 'train' (the train step at the config's batch) or 'sample' (guided sampling runs).
    repeats: timed calls (the median is reported).
    warmup: untimed calls after the compiling one.
    batch_size: sample: images per batch.
    num_steps: sample: sampling steps per run.
    guidance: sample: the guidance weight (the guided program).
    json_path: where to write the result as JSON (None: nowhere).

  Returns:
    The `BenchResult`.
  """
  from imagen_jax.train.setup import run_spec_from_gin

  check_counts(repeats, warmup)  # before minutes of compiling
  spec = run_spec_from_gin()
  if what == "train":
    result = bench_train(spec, repeats=repeats, warmup=warmup)
  else:
    result = bench_sample(
      spec,
      batch_size=batch_size,
      num_steps=num_steps,
      guidance=guidance,
      repeats=repeats,
      warmup=warmup,
    )
  if json_path:
    files.write_json(json_path, result.to_json())
  return result
