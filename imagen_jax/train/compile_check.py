"""Ahead-of-time compile check of a stage's train step (or the text encoder) for a TPU topology, on any host.

`imagen-jax compile-check --gin_file=runs/train_base_64.gin --topology=v4:4x4x8`: JAX with `libtpu` gives
compile-only devices of a TPU topology on a machine without TPUs (jax.experimental.topologies). The run's
mesh is built over them, and the very step the trainer jits (`train.step.step_signature`: same function,
same shardings, same donation) is lowered on abstract inputs (ShapeDtypeStructs carrying shardings: no
array is allocated) and compiled by XLA's TPU compiler. The report gives:

- per-chip memory from the executable's memory analysis: arguments, outputs, aliased (donated) bytes,
  temporaries and their total, against the chip's HBM (the compiler's limit, a little under nominal), and
  the headroom;
- FLOPs per chip per step: the *unscanned* network's step lowered for one CPU device at the global batch,
  its HLO's FLOPs over the chips (every block counted, remat recomputation included: hardware FLOPs). The
  TPU executable's own cost analysis is reported beside it: it counts a scan body once, and the TPU
  compiler's rewrites (padding, convolution algorithms) change small-channel counts;
- the step time and images/s the chip's peak would give at 100% and at a stated MFU;
- when it does not fit, the compiler's RESOURCE_EXHAUSTED line and what to change.

`--per_chip_equivalent` compiles the same per-chip program on a small slice of the same generation (same
per-chip batch, same tensor ways, fewer fsdp ways) and derives the full-pod figures by stated arithmetic:
argument, output and alias bytes change by the exact per-chip state bytes of the full mesh's shardings
(computed from the shardings, not estimated); temporaries change by one gradient-sized buffer (the
reduce-scattered gradient, sharded like the parameters); per-chip activations and FLOPs are unchanged.

Host RAM: the CLI compiles in a child process and watches its resident memory; before the kernel would kill
it, it stops with one line that gives the RAM needed so far and the ways to need less.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

GiB = 2 ** 30
# Per chip. The memory limit is the one XLA's TPU compiler enforces, read from its RESOURCE_EXHAUSTED
# messages (docs/scale.md), a little under the nominal HBM.
# name prefix -> (device kind, nominal HBM GiB, compiler limit bytes, chip config, peak bf16 FLOP/s)
GENERATIONS = {
    "v4": ("TPU v4", 32, 30.75 * GiB, "megacore", 275e12),
    "v5e": ("TPU v5 lite", 16, 15.75 * GiB, "default", 197e12),
    "v5p": ("TPU v5p", 95, 95.74 * GiB, "megacore", 459e12),
    "v5": ("TPU v5p", 95, 95.74 * GiB, "megacore", 459e12),
    "v6e": ("TPU v6 lite", 32, 31.25 * GiB, "default", 918e12),
}
# The smallest slice of each generation a per-chip-equivalent compile uses by default.
SMALL_SLICES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v5": "v5:2x2x1", "v6e": "v6e:2x2"}
GOAL_HEADROOM = 0.20


class CompileCheckError(ValueError):
  """Bad input to the compile check (one line, CLI exit code 2)."""


def generation(topology: str) -> str:
  gen = topology.split(":")[0]
  if gen not in GENERATIONS or ":" not in topology:
    raise CompileCheckError(f"topology {topology!r}: expected <generation>:<AxB[xC]> with generation one of "
                            f"{sorted(GENERATIONS)} (e.g. v4:4x4x8 = 128 v4 chips, v5e:16x16)")
  return gen


def topology_devices(topology: str, num_slices: int = 1):
  """The compile-only TPU devices of a topology (libtpu needed; no TPU needed)."""
  gen = generation(topology)
  # libtpu looks for a TPU VM's metadata at start-up and prints warnings on a machine without one; these
  # settings keep it quiet without changing what it compiles for.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only use needs no exclusive TPU access: let several processes (tests, parallel checks) load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise CompileCheckError("compile-check needs libtpu: pip install 'imagen-jax[tpu]'") from None
  from jax.experimental import topologies
  dims = topology.split(":")[1].split("x")
  bounds = (2, 2, 1) if len(dims) == 3 else (min(2, int(dims[0])), min(2, int(dims[1])), 1)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name=GENERATIONS[gen][3], chips_per_host_bounds=bounds,
                                        num_slices=num_slices)
  except Exception as e:   # libtpu's own message names what it did not like
    raise CompileCheckError(f"topology {topology!r}: {str(e).splitlines()[0]}") from None
  return list(desc.devices)


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
    return cls(float(m.argument_size_in_bytes), float(m.output_size_in_bytes), float(m.alias_size_in_bytes),
               float(m.temp_size_in_bytes), float(getattr(m, "generated_code_size_in_bytes", 0)))


@dataclasses.dataclass
class Report:
  what: str                        # 'train' | 'encoder'
  name: str                        # network or encoder, with its size
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
  hbm_limit: float                 # bytes per chip the compiler may use
  memory: Optional[Memory] = None
  flops_per_chip: Optional[float] = None
  flops_source: str = ""
  compiled_flops_per_chip: Optional[float] = None   # the TPU executable's cost analysis (a loop body once)
  peak_flops: float = float("nan")
  mfu: float = 0.5
  compile_seconds: float = 0.0
  lower_seconds: float = 0.0
  error: str = ""
  advice: Tuple[str, ...] = ()
  measured_on: Optional[dict] = None   # per-chip-equivalent: what was compiled (topology, mesh, memory)
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
  return "-" if x is None else f"{x / 2 ** 30:.2f} GiB"


def format_report(r: Report) -> str:
  lines = [f"compile-check: {r.what} step of {r.name} ({r.parameters / 1e6:.1f}M parameters)",
           f"  topology {r.topology} x{r.num_slices} slice(s): {r.chips} chips ({r.device_kind}); mesh {r.mesh}; "
           f"global batch {r.global_batch} ({r.per_chip_batch:g} per chip); remat {r.remat}; "
           f"scan_layers {r.scan_layers}"]
  if r.measured_on and r.measured_on["memory"] is None:
    m = r.measured_on
    lines.append(f"  per-chip-equivalent compile on {m['topology']} (mesh {m['mesh']}, batch {m['global_batch']}) "
                 "ran out of memory (where the pod has more fsdp ways its chips hold less state, so it may still fit)")
  elif r.measured_on:
    m = r.measured_on
    lines.append(f"  DERIVED from a per-chip-equivalent compile on {m['topology']} (mesh {m['mesh']}, batch "
                 f"{m['global_batch']}): measured total {_gib(m['memory']['total'])} per chip there; state bytes "
                 f"per chip {_gib(m['state_bytes_per_chip'])} there -> {_gib(r.state_bytes_per_chip)} here")
  if r.memory is not None:
    m = r.memory
    lines.append(f"  memory per chip: arguments {_gib(m.arguments)}, outputs {_gib(m.outputs)}, aliased "
                 f"{_gib(m.alias)}, temporaries {_gib(m.temporaries)}; total {_gib(m.total)} of {_gib(r.hbm_limit)} "
                 f"-> headroom {100 * r.headroom:.1f}%")
  lines.append("  fits: " + ("YES" if r.fits else "NO") + (f" — {r.error}" if r.error else ""))
  if r.flops_per_chip:
    t100, tm = r.step_seconds(1.0), r.step_seconds(r.mfu)
    compiled = (f"; the TPU executable's own cost analysis, which counts a loop body once: "
                f"{r.compiled_flops_per_chip:.3e}" if r.compiled_flops_per_chip and r.compiled_flops_per_chip != r.flops_per_chip
                else "")
    lines.append(f"  FLOPs per chip per step: {r.flops_per_chip:.3e} ({r.flops_source}{compiled}); peak "
                 f"{r.peak_flops / 1e12:.0f} TFLOP/s bf16")
    lines.append(f"  projected step: {1e3 * t100:.1f} ms at 100% MFU ({r.global_batch / t100:,.0f} img/s), "
                 f"{1e3 * tm:.1f} ms at {100 * r.mfu:.0f}% MFU ({r.global_batch / tm:,.0f} img/s)")
  lines.append(f"  lowered in {r.lower_seconds:.1f}s, compiled in {r.compile_seconds:.1f}s"
               + (f"; peak host RAM {_gib(r.peak_host_rss)}" if r.peak_host_rss else ""))
  for a in r.advice:
    lines.append(f"  advice: {a}")
  return "\n".join(lines)


def _out_of_memory_line(message: str) -> str:
  for line in message.splitlines():
    if "Ran out of memory" in line or "RESOURCE_EXHAUSTED" in line or "Exceeded" in line:
      return line.strip()[:400]
  return message.strip().splitlines()[0][:400] if message.strip() else "RESOURCE_EXHAUSTED"


def advise(*, fits: bool, headroom: Optional[float], remat: str, mesh: Dict[str, int], chips: int,
           per_chip_batch: float, what: str = "train", config_name: str = "UNetConfig") -> Tuple[str, ...]:
  """What to change when a step does not fit, or fits with less than the goal's headroom."""
  if fits and headroom is not None and headroom >= GOAL_HEADROOM:
    return ()
  out = []
  if what == "train" and remat == "none":
    out.append(f"rematerialise: --gin.{config_name}.remat=\"'full'\" recomputes each block's activations in the "
               "backward pass (about a third more FLOPs) instead of keeping them")
  if mesh.get("fsdp", 1) * mesh.get("tensor", 1) < chips:
    out.append(f"shard the state wider: MESH with more fsdp ways (now {mesh.get('fsdp', 1)} of {chips} chips), e.g. "
               f"--gin.MESH=\"(-1, {min(chips, 2 * mesh.get('fsdp', 1))}, {mesh.get('tensor', 1)})\"")
  if per_chip_batch > 1:
    out.append("micro-batch: --gin.BATCH_SIZE=<global/k> --gin.OptimizerConfig.accumulate_steps=<k> keeps the "
               "update's batch and divides per-chip activations by k")
  return tuple(out)


def state_bytes_per_chip(abstract_tree, shardings) -> float:
  """Bytes one device holds of a sharded tree (exact, from each leaf's shard shape)."""
  total = 0
  for leaf, s in zip(jax_leaves(abstract_tree), jax_leaves(shardings)):
    total += int(np.prod(s.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  return float(total)


def jax_leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def per_chip_slice(mesh_shape: Sequence[int], chips: int, small_chips: int) -> Tuple[int, int, int]:
  """(data, fsdp, tensor) of the slice: the same tensor ways, as many fsdp ways as fit, data for the rest."""
  data, fsdp, tensor = _resolve_mesh(mesh_shape, chips)
  if small_chips % tensor:
    raise CompileCheckError(f"the slice's {small_chips} chips do not hold tensor={tensor} ways")
  fsdp_s = math.gcd(fsdp, small_chips // tensor)
  return small_chips // (fsdp_s * tensor), fsdp_s, tensor


def _resolve_mesh(mesh_shape: Sequence[int], chips: int) -> Tuple[int, int, int]:
  sizes = list(mesh_shape)
  if len(sizes) != 3:
    raise CompileCheckError(f"MESH must be (data, fsdp, tensor), got {tuple(mesh_shape)}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or chips % known:
    raise CompileCheckError(f"mesh {tuple(mesh_shape)} does not fit {chips} chips")
  if -1 in sizes:
    sizes[sizes.index(-1)] = chips // known
  if int(np.prod(sizes)) != chips:
    raise CompileCheckError(f"mesh {tuple(mesh_shape)} needs {int(np.prod(sizes))} chips, the topology has {chips}")
  return tuple(sizes)


# ------------------------------------------------------------------------------------------ the train step

@dataclasses.dataclass(frozen=True)
class TrainRun:
  """What the compile check needs of a training run (from its gin config)."""
  model_config: Any
  diffusion: Any
  optimizer: Any
  global_batch: int
  mesh_shape: Tuple[int, int, int]
  ema_decay: float = 0.9999


def train_run_from_gin() -> TrainRun:
  """The run the parsed gin config describes, without calling train() (MODEL_DIR / TRAIN_DATA not needed)."""
  import gin
  from imagen_jax import models
  from imagen_jax.diffusion import DiffusionConfig
  from imagen_jax.train.optimizer import OptimizerConfig

  def macro(name, default):
    try:
      return gin.query_parameter(f"%{name}")
    except (ValueError, KeyError):
      return default

  try:
    model_config = models.model_config()
  except Exception as e:
    raise CompileCheckError(f"the gin config defines no network ({str(e).splitlines()[0]}); pass a run or model "
                            "gin file") from None
  return TrainRun(model_config=model_config, diffusion=DiffusionConfig(), optimizer=OptimizerConfig(),
                  global_batch=int(macro("BATCH_SIZE", 2048)), mesh_shape=tuple(macro("MESH", (-1, 1, 1))))


def _batch_shapes(model_config, global_batch: int) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from imagen_jax import batch_keys as K
  from imagen_jax import models
  size, length = model_config.image_size, model_config.max_text_length
  shapes = {K.IMAGE: jax.ShapeDtypeStruct((global_batch, size, size, model_config.in_channels), jnp.float32),
            K.TEXT_EMB: jax.ShapeDtypeStruct((global_batch, length, model_config.text_embed_dim), jnp.float32),
            K.TEXT_MASK: jax.ShapeDtypeStruct((global_batch, length), jnp.bool_)}
  if models.is_super_resolution(model_config):
    low = model_config.lowres_size
    shapes[K.LOWRES] = jax.ShapeDtypeStruct((global_batch, low, low, model_config.in_channels), jnp.float32)
  return shapes


def _lower_train(run: TrainRun, mesh, global_batch: int):
  """(lowered step, abstract state, state shardings): the trainer's own step signature, abstract inputs."""
  import flax.linen as nn
  import jax
  from imagen_jax import partitioning
  from imagen_jax.train import optimizer as optim
  from imagen_jax.train import state as state_lib
  from imagen_jax.train import step as step_lib
  tx = optim.make_optimizer(run.optimizer)
  abstract, boxed = state_lib.abstract_state(run.model_config, tx)
  shardings = state_lib.state_shardings(abstract, boxed, mesh)
  batch_shapes = _batch_shapes(run.model_config, global_batch)
  sig = step_lib.step_signature(model_config=run.model_config, diffusion=run.diffusion, tx=tx,
                                state_shardings=shardings, batch_shapes=batch_shapes, mesh=mesh,
                                ema_decay=run.ema_decay)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.AXIS_RULES):
    state_in = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                      shardings)
    batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sig.in_shardings[1][k])
                for k, v in batch_shapes.items()}
    lowered = sig.jit().lower(state_in, batch_in, None)
  return lowered, abstract, shardings


def unrolled_flops_per_chip(run: TrainRun, chips: int, global_batch: int) -> Optional[float]:
  """FLOPs per chip of one step counting every block: the unscanned network's step, lowered (not compiled)
  for one CPU device at the global batch, its HLO's FLOPs over the chips. None where no cost analysis."""
  import jax
  from imagen_jax import partitioning, perf
  unscanned = dataclasses.replace(run, model_config=dataclasses.replace(run.model_config, scan_layers=False),
                                  mesh_shape=(1, 1, 1))
  mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
  lowered, _, _ = _lower_train(unscanned, mesh, global_batch)
  flops = perf.compiled_flops(lowered)
  return flops / chips if flops else None


def _compile(lowered) -> Tuple[Any, float, str]:
  """(compiled or None, seconds, out-of-memory line or '')."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:   # XlaRuntimeError; only RESOURCE_EXHAUSTED is a result, the rest is re-raised
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
      return None, time.perf_counter() - t0, _out_of_memory_line(msg)
    raise
  return compiled, time.perf_counter() - t0, ""


def check_train(run: TrainRun, topology: str, *, num_slices: int = 1, mfu: float = 0.5,
                per_chip_equivalent: Optional[str] = None, count_flops: bool = True) -> Report:
  """Compiles the run's train step for `topology` (or, with per_chip_equivalent = a smaller topology name of
  the same generation, on that slice, and derives the full figures); see the module docstring."""
  import jax
  from imagen_jax import models, partitioning
  gen = generation(topology)
  kind, _, hbm_limit, _, peak = GENERATIONS[gen]
  full_devices = topology_devices(topology, num_slices)
  chips = len(full_devices)
  mesh_sizes = _resolve_mesh(run.mesh_shape, chips)
  if run.global_batch % (mesh_sizes[0] * mesh_sizes[1]):
    raise CompileCheckError(f"global batch {run.global_batch} does not split over data x fsdp = "
                            f"{mesh_sizes[0] * mesh_sizes[1]} chips")
  full_mesh = partitioning.create_mesh(*mesh_sizes, devices=full_devices)
  per_chip_batch = run.global_batch / (mesh_sizes[0] * mesh_sizes[1])
  cfg = run.model_config
  name = f"{type(cfg).__name__} {cfg.image_size}px"
  n_params = models.count_params(models.abstract_params(cfg))

  compile_run, compile_mesh, compile_batch, measured_on = run, full_mesh, run.global_batch, None
  if per_chip_equivalent:
    if generation(per_chip_equivalent) != gen:
      raise CompileCheckError(f"--per_chip_equivalent {per_chip_equivalent} is not a {gen} slice")
    small = topology_devices(per_chip_equivalent, 1)
    sizes = per_chip_slice(mesh_sizes, chips, len(small))
    compile_mesh = partitioning.create_mesh(*sizes, devices=small)
    compile_batch = int(per_chip_batch * sizes[0] * sizes[1])
    compile_run = dataclasses.replace(run, global_batch=compile_batch, mesh_shape=sizes)

  t0 = time.perf_counter()
  lowered, abstract, shardings = _lower_train(compile_run, compile_mesh, compile_batch)
  lower_seconds = time.perf_counter() - t0
  compiled, compile_seconds, oom = _compile(lowered)
  report = Report(what="train", name=name, parameters=n_params, topology=topology, num_slices=num_slices,
                  chips=chips, device_kind=kind, mesh=dict(full_mesh.shape), global_batch=run.global_batch,
                  per_chip_batch=per_chip_batch, remat=cfg.remat, scan_layers=cfg.scan_layers, fits=compiled is not None,
                  hbm_limit=hbm_limit, peak_flops=peak, mfu=mfu, compile_seconds=compile_seconds,
                  lower_seconds=lower_seconds, error=oom)
  if per_chip_equivalent and compiled is None:
    report.measured_on = {"topology": per_chip_equivalent, "mesh": dict(compile_mesh.shape),
                          "global_batch": compile_batch, "memory": None, "compile_seconds": compile_seconds}
    report.error = f"on the {per_chip_equivalent} slice: {oom}"
  if compiled is not None:
    memory = Memory.of(compiled)
    from imagen_jax import perf
    flops = perf.compiled_flops(compiled)
    report.flops_source = "XLA cost analysis of the compiled step"
    if per_chip_equivalent:
      _, _, full_shardings = _lower_train_shardings(run, full_mesh)
      slice_state = state_bytes_per_chip(abstract, shardings)
      full_state = state_bytes_per_chip(abstract, full_shardings)
      params_slice = state_bytes_per_chip(abstract.params, shardings.params)
      params_full = state_bytes_per_chip(abstract.params, full_shardings.params)
      measured_on = {"topology": per_chip_equivalent, "mesh": dict(compile_mesh.shape), "global_batch": compile_batch,
                     "memory": {**dataclasses.asdict(memory), "total": memory.total},
                     "state_bytes_per_chip": slice_state, "compile_seconds": compile_seconds}
      delta = full_state - slice_state
      memory = Memory(arguments=memory.arguments + delta, outputs=memory.outputs + delta, alias=memory.alias + delta,
                      temporaries=memory.temporaries + (params_full - params_slice),
                      generated_code=memory.generated_code)
      report.measured_on = measured_on
      report.state_bytes_per_chip = full_state
      report.fits = memory.total <= hbm_limit
      if not report.fits:
        report.error = (f"derived total {_gib(memory.total)} exceeds the {_gib(hbm_limit)} per chip the compiler "
                        "allows")
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
  report.advice = advise(fits=report.fits, headroom=report.headroom, remat=cfg.remat, mesh=dict(full_mesh.shape),
                         chips=chips, per_chip_batch=per_chip_batch, config_name=type(cfg).__name__)
  return report


def _lower_train_shardings(run: TrainRun, mesh):
  from imagen_jax.train import optimizer as optim
  from imagen_jax.train import state as state_lib
  tx = optim.make_optimizer(run.optimizer)
  abstract, boxed = state_lib.abstract_state(run.model_config, tx)
  return abstract, boxed, state_lib.state_shardings(abstract, boxed, mesh)


# ------------------------------------------------------------------------------------------ the text encoder

def check_encoder(size: str, topology: str, *, global_batch: int, mesh_shape=(-1, 1, 1), num_slices: int = 1,
                  param_dtype: str = "bfloat16", dtype: str = "bfloat16", length: int = 128, mfu: float = 0.5) -> Report:
  """Compiles the frozen T5 encoder's batch embedding (`text.encoder.encode_tokens`) for a topology."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from imagen_jax import models, partitioning, perf
  from imagen_jax.text.encoder import encode_tokens
  from imagen_jax.text.t5 import abstract_encoder_params, t5_config
  gen = generation(topology)
  kind, _, hbm_limit, _, peak = GENERATIONS[gen]
  devices = topology_devices(topology, num_slices)
  sizes = _resolve_mesh(mesh_shape, len(devices))
  mesh = partitioning.create_mesh(*sizes, devices=devices)
  if global_batch % (sizes[0] * sizes[1]):
    raise CompileCheckError(f"batch {global_batch} does not split over data x fsdp = {sizes[0] * sizes[1]} chips")
  config = t5_config(size, dtype=dtype, param_dtype=param_dtype)
  boxed = abstract_encoder_params(config)
  shardings = partitioning.mesh_shardings(boxed, mesh)
  params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                                  shardings)
  tokens = jax.ShapeDtypeStruct((global_batch, length), jnp.int32, sharding=partitioning.batch_sharding(mesh, 2))
  fn = jax.jit(lambda p, t: encode_tokens(config, p, t, out_dtype=jnp.bfloat16),
               out_shardings=(partitioning.batch_sharding(mesh, 3), partitioning.batch_sharding(mesh, 2)))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.AXIS_RULES):
    lowered = fn.lower(params, tokens)
  lower_seconds = time.perf_counter() - t0
  compiled, compile_seconds, oom = _compile(lowered)
  report = Report(what="encoder", name=f"T5 v1.1 {size} encoder ({param_dtype} params)",
                  parameters=models.count_params(boxed), topology=topology, num_slices=num_slices,
                  chips=len(devices), device_kind=kind, mesh=dict(mesh.shape), global_batch=global_batch,
                  per_chip_batch=global_batch / (sizes[0] * sizes[1]), remat="none", scan_layers=False,
                  fits=compiled is not None, hbm_limit=hbm_limit, peak_flops=peak, mfu=mfu,
                  compile_seconds=compile_seconds, lower_seconds=lower_seconds, error=oom)
  if compiled is not None:
    report.memory = Memory.of(compiled)
    report.flops_per_chip = perf.compiled_flops(compiled)
    report.flops_source = "XLA cost analysis of the compiled encoder"
    report.state_bytes_per_chip = state_bytes_per_chip(nn.unbox(boxed), shardings)
  report.advice = advise(fits=report.fits, headroom=report.headroom, remat="n/a", mesh=dict(mesh.shape),
                         chips=len(devices), per_chip_batch=report.per_chip_batch, what="encoder")
  return report


# ------------------------------------------------------------------------------------------ host RAM

def rss_bytes(pid: int) -> Optional[float]:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return float(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def available_bytes() -> Optional[float]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def out_of_host_ram_line(used: float, limit: float, per_chip_equivalent: bool = False) -> str:
  head = (f"compile-check stopped: the compile needed {used / 2 ** 30:.1f} GiB of host RAM so far, over the "
          f"{limit / 2 ** 30:.1f} GiB this machine can give it; ")
  if per_chip_equivalent:     # already the smallest program of this per-chip batch
    return head + ("shrink the per-chip program (SCAN_LAYERS = True, a smaller per-chip batch) or run on a host "
                   "with more RAM (a TPU VM)")
  return head + ("compile on a smaller slice and derive the pod's figures (--per_chip_equivalent), or shrink the "
                 "program (SCAN_LAYERS = True), or run on a host with more RAM (a TPU VM)")


