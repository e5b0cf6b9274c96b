"""Ahead-of-time compile check of a stage's train step (or the T5 encoder) for a TPU topology, on
any host.

libtpu's compile-only devices stand for the topology; the trainer's own step (`train.setup`) is
lowered on abstract sharded inputs and compiled by XLA's TPU compiler, which reports memory per
chip; FLOPs come from the unscanned step's HLO. Method, derivation and results: docs/scale.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from imagen_jax import files, models, partitioning
from imagen_jax.errors import ConfigError
from imagen_jax.scale import flops as flops_lib
from imagen_jax.scale import topology as topo
from imagen_jax.train.setup import RunSpec, TrainSetup, run_spec_from_gin

GOAL_HEADROOM = 0.20


@dataclasses.dataclass
class Memory:
  arguments: float
  outputs: float
  alias: float
  temporaries: float
  generated_code: float = 0.0

  @property
  def total(self) -> float:
    return self.arguments + self.outputs - self.alias + self.temporaries + self.generated_code

  @classmethod
  def of(cls, compiled) -> "Memory":
    m = compiled.memory_analysis()
    return cls(
      float(m.argument_size_in_bytes),
      float(m.output_size_in_bytes),
      float(m.alias_size_in_bytes),
      float(m.temp_size_in_bytes),
      float(getattr(m, "generated_code_size_in_bytes", 0)),
    )


@dataclasses.dataclass
class Report:
  what: str  # 'train' | 'encoder'
  name: str  # network or encoder, with its size
  parameters: int
  topology: str
  num_slices: int
  chips: int
  device_kind: str
  mesh: Dict[str, int]
  global_batch: int
  per_chip_batch: float
  remat: str
  scan_layers: bool
  fits: bool
  hbm_limit: float  # bytes per chip the compiler may use
  memory: Optional[Memory] = None
  flops_per_chip: Optional[float] = None
  flops_source: str = ""
  compiled_flops_per_chip: Optional[float] = (
    None  # the TPU executable's cost analysis (a loop body once)
  )
  peak_flops: float = float("nan")
  mfu: float = 0.5
  compile_seconds: float = 0.0
  lower_seconds: float = 0.0
  error: str = ""
  advice: Tuple[str, ...] = ()
  measured_on: Optional[dict] = (
    None  # per-chip-equivalent: what was compiled (topology, mesh, memory)
  )
  peak_host_rss: Optional[float] = None
  state_bytes_per_chip: Optional[float] = None

  @property
  def headroom(self) -> Optional[float]:
    if self.memory is None:
      return None
    return 1.0 - self.memory.total / self.hbm_limit

  def step_seconds(self, mfu: float) -> Optional[float]:
    if not self.flops_per_chip or not self.peak_flops:
      return None
    return self.flops_per_chip / (self.peak_flops * mfu)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    if self.memory is not None:
      out["memory"]["total"] = self.memory.total
    out["headroom"] = self.headroom
    out["step_seconds_at_100pct"] = self.step_seconds(1.0)
    out["step_seconds_at_mfu"] = self.step_seconds(self.mfu)
    for key, mfu in (("images_per_second_at_100pct", 1.0), ("images_per_second_at_mfu", self.mfu)):
      t = self.step_seconds(mfu)
      out[key] = self.global_batch / t if t else None
    return out


def _gib(x: Optional[float]) -> str:
  return "-" if x is None else f"{x / 2**30:.2f} GiB"


def format_report(r: Report) -> str:
  lines = [
    f"compile-check: {r.what} step of {r.name} ({r.parameters / 1e6:.1f}M parameters)",
    f"  topology {r.topology} x{r.num_slices} slice(s): {r.chips} chips ({r.device_kind}); mesh "
    f"{r.mesh}; "
    f"global batch {r.global_batch} ({r.per_chip_batch:g} per chip); remat {r.remat}; "
    f"scan_layers {r.scan_layers}",
  ]
  if r.measured_on and r.measured_on["memory"] is None:
    m = r.measured_on
    lines.append(
      f"  per-chip-equivalent compile on {m['topology']} (mesh {m['mesh']}, batch "
      f"{m['global_batch']}) "
      "ran out of memory (where the pod has more fsdp ways its chips hold less state, so it may "
      "still fit)"
    )
  elif r.measured_on:
    m = r.measured_on
    lines.append(
      f"  DERIVED from a per-chip-equivalent compile on {m['topology']} (mesh {m['mesh']}, batch "
      f"{m['global_batch']}): measured total {_gib(m['memory']['total'])} per chip there; state "
      "bytes "
      f"per chip {_gib(m['state_bytes_per_chip'])} there -> {_gib(r.state_bytes_per_chip)} here"
    )
  if r.memory is not None:
    m = r.memory
    lines.append(
      f"  memory per chip: arguments {_gib(m.arguments)}, outputs {_gib(m.outputs)}, aliased "
      f"{_gib(m.alias)}, temporaries {_gib(m.temporaries)}; total {_gib(m.total)} of "
      f"{_gib(r.hbm_limit)} "
      f"-> headroom {100 * r.headroom:.1f}%"
    )
  lines.append("  fits: " + ("YES" if r.fits else "NO") + (f" — {r.error}" if r.error else ""))
  if r.flops_per_chip:
    t100, tm = r.step_seconds(1.0), r.step_seconds(r.mfu)
    compiled = (
      f"; the TPU executable's own cost analysis, which counts a loop body once: "
      f"{r.compiled_flops_per_chip:.3e}"
      if r.compiled_flops_per_chip and r.compiled_flops_per_chip != r.flops_per_chip
      else ""
    )
    lines.append(
      f"  FLOPs per chip per step: {r.flops_per_chip:.3e} ({r.flops_source}{compiled}); peak "
      f"{r.peak_flops / 1e12:.0f} TFLOP/s bf16"
    )
    lines.append(
      f"  projected step: {1e3 * t100:.1f} ms at 100% MFU ({r.global_batch / t100:,.0f} img/s), "
      f"{1e3 * tm:.1f} ms at {100 * r.mfu:.0f}% MFU ({r.global_batch / tm:,.0f} img/s)"
    )
  lines.append(
    f"  lowered in {r.lower_seconds:.1f}s, compiled in {r.compile_seconds:.1f}s"
    + (f"; peak host RAM {_gib(r.peak_host_rss)}" if r.peak_host_rss else "")
  )
  for a in r.advice:
    lines.append(f"  advice: {a}")
  return "\n".join(lines)


def _out_of_memory_line(message: str) -> str:
  for line in message.splitlines():
    if "Ran out of memory" in line or "RESOURCE_EXHAUSTED" in line or "Exceeded" in line:
      return line.strip()[:400]
  return message.strip().splitlines()[0][:400] if message.strip() else "RESOURCE_EXHAUSTED"


def advise(
  *,
  fits: bool,
  headroom: Optional[float],
  remat: str,
  mesh: Dict[str, int],
  chips: int,
  per_chip_batch: float,
  what: str = "train",
  config_name: str = "UNetConfig",
) -> Tuple[str, ...]:
  """What to change when a step does not fit, or fits with less than the goal's headroom."""
  if fits and headroom is not None and headroom >= GOAL_HEADROOM:
    return ()
  out = []
  if what == "train" and remat == "none":
    out.append(
      f"rematerialise: --gin.{config_name}.remat=\"'full'\" recomputes each block's activations "
      "in the "
      "backward pass (about a third more FLOPs) instead of keeping them"
    )
  if mesh.get("fsdp", 1) * mesh.get("tensor", 1) < chips:
    out.append(
      f"shard the state wider: MESH with more fsdp ways (now {mesh.get('fsdp', 1)} of {chips} "
      "chips), e.g. "
      f'--gin.MESH="(-1, {min(chips, 2 * mesh.get("fsdp", 1))}, {mesh.get("tensor", 1)})"'
    )
  if per_chip_batch > 1:
    out.append(
      "micro-batch: --gin.BATCH_SIZE=<global/k> --gin.OptimizerConfig.accumulate_steps=<k> keeps "
      "the "
      "update's batch and divides per-chip activations by k"
    )
  return tuple(out)


def state_bytes_per_chip(abstract_tree, shardings) -> float:
  """Bytes one device holds of a sharded tree (exact, from each leaf's shard shape)."""
  total = 0
  for leaf, s in zip(
    jax.tree_util.tree_leaves(abstract_tree), jax.tree_util.tree_leaves(shardings)
  ):
    total += int(np.prod(s.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  return float(total)


def per_chip_slice(mesh_shape: Sequence[int], chips: int, small_chips: int) -> Tuple[int, int, int]:
  """(data, fsdp, tensor) of the slice: the same tensor ways, as many fsdp ways as fit, data for
  the rest."""
  data, fsdp, tensor = partitioning.resolve_mesh_shape(mesh_shape, chips)
  if small_chips % tensor:
    raise ConfigError(f"the slice's {small_chips} chips do not hold tensor={tensor} ways")
  fsdp_s = math.gcd(fsdp, small_chips // tensor)
  return small_chips // (fsdp_s * tensor), fsdp_s, tensor


# ------------------------------------------------------------------------------------------ the
# train step


def _lower_train(run: RunSpec, mesh, global_batch: int):
  """(lowered step, abstract state, state shardings): the trainer's own step on abstract inputs."""
  setup = TrainSetup(dataclasses.replace(run, global_batch=global_batch), mesh)
  lowered, _ = setup.lower()
  return lowered, setup.abstract, setup.shardings


def unrolled_flops_per_chip(run: RunSpec, chips: int, global_batch: int) -> Optional[float]:
  """FLOPs per chip of one step counting every block: the unscanned network's step, lowered (not
  compiled) for one CPU device at the global batch, its HLO's FLOPs over the chips. None where no
  cost analysis."""
  unscanned = dataclasses.replace(
    run, model_config=dataclasses.replace(run.model_config, scan_layers=False), mesh_shape=(1, 1, 1)
  )
  mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
  lowered, _, _ = _lower_train(unscanned, mesh, global_batch)
  flops = flops_lib.compiled_flops(lowered)
  return flops / chips if flops else None


def _compile(lowered) -> Tuple[Any, float, str]:
  """(compiled or None, seconds, out-of-memory line or '')."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except (
    Exception
  ) as e:  # XlaRuntimeError; only RESOURCE_EXHAUSTED is a result, the rest is re-raised
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
      return None, time.perf_counter() - t0, _out_of_memory_line(msg)
    raise
  return compiled, time.perf_counter() - t0, ""


def check_train(
  run: RunSpec,
  topology: str,
  *,
  num_slices: int = 1,
  mfu: float = 0.5,
  per_chip_equivalent: Optional[str] = None,
  count_flops: bool = True,
) -> Report:
  """Compiles the run's train step for a TPU topology on this host; see the module docstring.

  Args:
    run: the training run (`train.setup.run_spec_from_gin`).
    topology: e.g. 'v4:4x4x8'.
    num_slices: multi-slice: number of such slices.
    mfu: the MFU the projected step time is stated at.
    per_chip_equivalent: a smaller topology of the same generation: compile there and derive the
      full topology's figures.
    count_flops: count FLOPs on the unscanned step's HLO (a scan body counts once in XLA's
      analysis).

  Returns:
    The `Report`.
  """
  gen = topo.generation(topology)
  chip = topo.tpu_chip(topology)
  kind, hbm_limit, peak = chip.device_kinds[0], chip.hbm_limit, chip.peak_flops
  full_devices = topo.topology_devices(topology, num_slices)
  chips = len(full_devices)
  mesh_sizes = partitioning.resolve_mesh_shape(run.mesh_shape, chips)
  partitioning.check_batch_split(run.global_batch, dict(zip(partitioning.MESH_AXES, mesh_sizes)))
  full_mesh = partitioning.create_mesh(*mesh_sizes, devices=full_devices)
  per_chip_batch = run.global_batch / (mesh_sizes[0] * mesh_sizes[1])
  cfg = run.model_config
  name = f"{type(cfg).__name__} {cfg.image_size}px"
  n_params = models.count_params(models.abstract_params(cfg))

  compile_run, compile_mesh, compile_batch, measured_on = run, full_mesh, run.global_batch, None
  if per_chip_equivalent:
    if topo.generation(per_chip_equivalent) != gen:
      raise ConfigError(f"per_chip_equivalent {per_chip_equivalent} is not a {gen} slice")
    small = topo.topology_devices(per_chip_equivalent, 1)
    sizes = per_chip_slice(mesh_sizes, chips, len(small))
    compile_mesh = partitioning.create_mesh(*sizes, devices=small)
    compile_batch = int(per_chip_batch * sizes[0] * sizes[1])
    compile_run = dataclasses.replace(run, global_batch=compile_batch, mesh_shape=sizes)

  t0 = time.perf_counter()
  lowered, abstract, shardings = _lower_train(compile_run, compile_mesh, compile_batch)
  lower_seconds = time.perf_counter() - t0
  compiled, compile_seconds, oom = _compile(lowered)
  report = Report(
    what="train",
    name=name,
    parameters=n_params,
    topology=topology,
    num_slices=num_slices,
    chips=chips,
    device_kind=kind,
    mesh=dict(full_mesh.shape),
    global_batch=run.global_batch,
    per_chip_batch=per_chip_batch,
    remat=cfg.remat,
    scan_layers=cfg.scan_layers,
    fits=compiled is not None,
    hbm_limit=hbm_limit,
    peak_flops=peak,
    mfu=mfu,
    compile_seconds=compile_seconds,
    lower_seconds=lower_seconds,
    error=oom,
  )
  if per_chip_equivalent and compiled is None:
    report.measured_on = {
      "topology": per_chip_equivalent,
      "mesh": dict(compile_mesh.shape),
      "global_batch": compile_batch,
      "memory": None,
      "compile_seconds": compile_seconds,
    }
    report.error = f"on the {per_chip_equivalent} slice: {oom}"
  if compiled is not None:
    memory = Memory.of(compiled)
    flops = flops_lib.compiled_flops(compiled)
    report.flops_source = "XLA cost analysis of the compiled step"
    if per_chip_equivalent:
      full_shardings = TrainSetup(run, full_mesh).shardings
      slice_state = state_bytes_per_chip(abstract, shardings)
      full_state = state_bytes_per_chip(abstract, full_shardings)
      params_slice = state_bytes_per_chip(abstract.params, shardings.params)
      params_full = state_bytes_per_chip(abstract.params, full_shardings.params)
      measured_on = {
        "topology": per_chip_equivalent,
        "mesh": dict(compile_mesh.shape),
        "global_batch": compile_batch,
        "memory": {**dataclasses.asdict(memory), "total": memory.total},
        "state_bytes_per_chip": slice_state,
        "compile_seconds": compile_seconds,
      }
      delta = full_state - slice_state
      memory = Memory(
        arguments=memory.arguments + delta,
        outputs=memory.outputs + delta,
        alias=memory.alias + delta,
        temporaries=memory.temporaries + (params_full - params_slice),
        generated_code=memory.generated_code,
      )
      report.measured_on = measured_on
      report.state_bytes_per_chip = full_state
      report.fits = memory.total <= hbm_limit
      if not report.fits:
        report.error = (
          f"derived total {_gib(memory.total)} exceeds the {_gib(hbm_limit)} per chip the compiler "
          "allows"
        )
    else:
      report.state_bytes_per_chip = state_bytes_per_chip(abstract, shardings)
    report.memory = memory
    report.compiled_flops_per_chip = flops
    if count_flops:
      unrolled = unrolled_flops_per_chip(run, chips, run.global_batch)
      if unrolled:
        flops = unrolled
        report.flops_source = "the unscanned step's HLO over the chips"
    report.flops_per_chip = flops
  report.advice = advise(
    fits=report.fits,
    headroom=report.headroom,
    remat=cfg.remat,
    mesh=dict(full_mesh.shape),
    chips=chips,
    per_chip_batch=per_chip_batch,
    config_name=type(cfg).__name__,
  )
  return report


# ------------------------------------------------------------------------------------------ the
# text encoder


def check_encoder(
  size: str,
  topology: str,
  *,
  global_batch: int,
  mesh_shape=(-1, 1, 1),
  num_slices: int = 1,
  param_dtype: str = "bfloat16",
  dtype: str = "bfloat16",
  length: int = 128,
  mfu: float = 0.5,
) -> Report:
  """Compiles the frozen T5 encoder's batch embedding (`text.encoder.encode_tokens`) for a
  topology."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from imagen_jax.text.encoder import encode_tokens
  from imagen_jax.text.t5 import abstract_encoder_params, t5_config

  chip = topo.tpu_chip(topology)
  kind, hbm_limit, peak = chip.device_kinds[0], chip.hbm_limit, chip.peak_flops
  devices = topo.topology_devices(topology, num_slices)
  mesh = partitioning.create_mesh(*mesh_shape, devices=devices)
  sizes = tuple(mesh.shape.values())
  partitioning.check_batch_split(global_batch, mesh)
  config = t5_config(size, dtype=dtype, param_dtype=param_dtype)
  boxed = abstract_encoder_params(config)
  shardings = partitioning.mesh_shardings(boxed, mesh)
  params = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  tokens = jax.ShapeDtypeStruct(
    (global_batch, length), jnp.int32, sharding=partitioning.batch_sharding(mesh, 2)
  )
  fn = jax.jit(
    lambda p, t: encode_tokens(config, p, t, out_dtype=jnp.bfloat16),
    out_shardings=(partitioning.batch_sharding(mesh, 3), partitioning.batch_sharding(mesh, 2)),
  )
  t0 = time.perf_counter()
  with partitioning.mesh_context(mesh):
    lowered = fn.lower(params, tokens)
  lower_seconds = time.perf_counter() - t0
  compiled, compile_seconds, oom = _compile(lowered)
  report = Report(
    what="encoder",
    name=f"T5 v1.1 {size} encoder ({param_dtype} params)",
    parameters=models.count_params(boxed),
    topology=topology,
    num_slices=num_slices,
    chips=len(devices),
    device_kind=kind,
    mesh=dict(mesh.shape),
    global_batch=global_batch,
    per_chip_batch=global_batch / (sizes[0] * sizes[1]),
    remat="none",
    scan_layers=False,
    fits=compiled is not None,
    hbm_limit=hbm_limit,
    peak_flops=peak,
    mfu=mfu,
    compile_seconds=compile_seconds,
    lower_seconds=lower_seconds,
    error=oom,
  )
  if compiled is not None:
    report.memory = Memory.of(compiled)
    report.flops_per_chip = flops_lib.compiled_flops(compiled)
    report.flops_source = "XLA cost analysis of the compiled encoder"
    report.state_bytes_per_chip = state_bytes_per_chip(nn.unbox(boxed), shardings)
  report.advice = advise(
    fits=report.fits,
    headroom=report.headroom,
    remat="n/a",
    mesh=dict(mesh.shape),
    chips=len(devices),
    per_chip_batch=report.per_chip_batch,
    what="encoder",
  )
  return report


def run(
  *,
  what: str,
  topology: str,
  num_slices: int = 1,
  mfu: float = 0.5,
  per_chip_equivalent: Optional[str] = None,
  count_flops: bool = True,
  encoder_size: str = "xxl",
  json_path: Optional[str] = None,
) -> Report:
  """The compile check of the parsed gin config's run.

  Args:
    what: 'train' (the stage's train step) or 'encoder' (the T5 encoder, at the run's batch and mesh
      when the config defines a run, else batch 2048 on data parallelism).
    topology: e.g. 'v4:4x4x8'.
    num_slices: multi-slice: number of such slices.
    mfu: the MFU the projected step time is stated at.
    per_chip_equivalent: a smaller slice of the same generation to compile on ('auto': the
      smallest).
    count_flops: count FLOPs on the unscanned step's HLO.
    encoder_size: the T5 size for what = 'encoder'.
    json_path: where to write the report as JSON (None: nowhere).

  Returns:
    The `Report`.
  """
  if what == "encoder":
    try:
      spec = run_spec_from_gin()
    except ConfigError:
      spec = None
    report = check_encoder(
      encoder_size,
      topology,
      global_batch=spec.global_batch if spec else 2048,
      mesh_shape=spec.mesh_shape if spec else (-1, 1, 1),
      num_slices=num_slices,
      mfu=mfu,
    )
  else:
    pce = topo.small_slice(topology) if per_chip_equivalent == "auto" else per_chip_equivalent
    report = check_train(
      run_spec_from_gin(),
      topology,
      num_slices=num_slices,
      mfu=mfu,
      per_chip_equivalent=pce,
      count_flops=count_flops,
    )
  if json_path:
    files.write_json(json_path, report.to_json())
  return report
