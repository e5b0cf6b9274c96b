"""The training loop of one cascade stage: `train(*, ...)`, gin-configured (`imagen-jax train`).

Start-up: check MODEL_DIR belongs to this network (run.json), resume from the latest complete
checkpoint or create the state directly sharded, write the gin config, compile the step once ahead
of time (FLOPs from its cost analysis), then loop: dispatch step N, then write step N-1's metrics
while N runs; metrics are summed on the device and fetched only at log steps. Checkpoints are
asynchronous, every `checkpoint_every` steps, at SIGTERM (preemption) and at the end; a non-finite
state is never saved, and `max_nonfinite_streak` non-finite steps in a row stop the run with the
last good checkpoint intact.

Imports without TensorFlow; the data pipeline (and TensorFlow) is loaded only for a seqio task
source.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from imagen_jax import batch_keys as K
from imagen_jax import models, partitioning
from imagen_jax.diffusion import DiffusionConfig
from imagen_jax.errors import ConfigError, UserError
from imagen_jax.gin_utils import require
from imagen_jax.scale import flops as perf
from imagen_jax.train import checkpoints as ckpt
from imagen_jax.train import optimizer as optim
from imagen_jax.train import setup as setup_lib
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib
from imagen_jax.train import writers as writers_lib


class TrainError(UserError):
  """A configuration that cannot train (reported in one line by the CLI, exit code 2)."""


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row: the run stopped; the last good checkpoint is intact."""


@dataclasses.dataclass
class TrainSummary:
  start_step: int
  final_step: int
  stopped: str  # 'done' | 'preempted' | 'nonfinite'
  history: List[Tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, mean loss)
  traces: int = 0  # times the step was traced (= compiled)
  flops_per_step: Optional[float] = None  # per device, from XLA's cost analysis
  step_time: Optional[float] = None  # median seconds per step over log intervals after the first
  nonfinite_total: int = 0
  checkpoints: List[int] = dataclasses.field(default_factory=list)
  compile_seconds: float = 0.0


def enable_compilation_cache(path: Optional[str]) -> None:
  """JAX's persistent compilation cache in `path` (None: off): a restart does not recompile."""
  if not path:
    return
  from jax.experimental.compilation_cache import compilation_cache as cc

  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()  # take effect even if something was compiled before


class _Preemption:
  """SIGTERM sets a flag the loop checks each step (single process); multi-host runs ask orbax,
  which agrees on a common step through JAX's preemption service."""

  def __init__(self):
    self.flag = threading.Event()
    self._old = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

  def reached(self, mgr, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(mgr.reached_preemption(step)) or self.flag.is_set()
    return self.flag.is_set()

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _needed_keys(model_config, on_the_fly: bool) -> Tuple[str, ...]:
  keys = [K.IMAGE, K.TEXT_MASK, K.TOKENS if on_the_fly else K.TEXT_EMB]
  if models.is_super_resolution(model_config):
    keys.append(K.LOWRES)
  return tuple(keys)


def _check_batch(batch: Dict[str, np.ndarray], keys, model_config, local_batch: int) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise TrainError(
      f"the data gives no {', '.join(missing)} (has {', '.join(sorted(batch))}); "
      + (
        "an SR stage needs StageDataConfig.lowres_size"
        if K.LOWRES in missing
        else "check StageDataConfig.embeddings"
      )
    )
  size = batch[K.IMAGE].shape[1]
  if size != model_config.image_size:
    raise TrainError(
      f"the data's images are {size}x{size} but the network trains at {model_config.image_size} "
      "(set StageDataConfig.image_size to match)"
    )
  if (
    models.is_super_resolution(model_config)
    and batch[K.LOWRES].shape[1] != model_config.lowres_size
  ):
    raise TrainError(
      f"the data's low-res images are {batch[K.LOWRES].shape[1]}px but the network expects "
      f"{model_config.lowres_size}px (StageDataConfig.lowres_size)"
    )
  if batch[K.IMAGE].shape[0] != local_batch:
    raise TrainError(f"a host batch has {batch[K.IMAGE].shape[0]} rows, expected {local_batch}")


def _global_batch(batch: Dict[str, np.ndarray], keys, shardings) -> Dict[str, jax.Array]:
  return {
    k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k])) for k in keys
  }


def _mesh(mesh_shape: Sequence[int], devices=None):
  try:
    return partitioning.create_mesh(*mesh_shape, devices=devices)
  except ConfigError as e:
    raise TrainError(f"mesh {tuple(mesh_shape)} (data, fsdp, tensor): {e}") from None


def _load_encoder(checkpoint: str, mesh):
  from imagen_jax.text import checkpoints as text_ckpt
  from imagen_jax.text.t5 import abstract_encoder_params

  config, params = text_ckpt.load_any(checkpoint)
  shardings = partitioning.mesh_shardings(abstract_encoder_params(config), mesh)
  return config, jax.device_put(params, shardings), shardings


def _data_source(batch_source, data_task: Optional[str], data_config):
  """(the source of host-local batches, the global batch size)."""
  if batch_source is not None:
    return batch_source, batch_source.batch_size
  if data_task is None:
    raise TrainError("no data: set train.data_task (e.g. @cached_task()) or pass batch_source")
  if data_config is None:
    from imagen_jax.data.pipeline import StageDataConfig

    data_config = StageDataConfig()
  return _task_source(data_task, data_config), data_config.batch_size


def _null_text(diffusion, data_task: Optional[str], encoder, first):
  """The empty prompt's (emb, mask) for a stage whose null condition it is (DeepFloyd IF): encoded
  here when the step embeds tokens itself, else read from the embedding cache; None otherwise."""
  if diffusion.null_text != "empty_prompt":
    return None
  from imagen_jax.data import tasks

  encoder_config, encoder_params, _ = encoder
  text_length = first[K.TOKENS if encoder_config is not None else K.TEXT_MASK].shape[1]
  if encoder_config is not None:
    from imagen_jax.text.encoder import encode_tokens

    emb, mask = jax.jit(functools.partial(encode_tokens, encoder_config))(
      encoder_params, jnp.asarray(tasks.empty_prompt_tokens(text_length))
    )
    return np.asarray(emb[0], np.float32), np.asarray(mask[0], bool)
  cache_dir = tasks.CACHE_DIRS.get(data_task) if data_task else None
  if cache_dir is None:
    raise TrainError(
      "null_text='empty_prompt' needs the empty prompt's embedding: train from an embedding "
      "cache (train.data_task = @cached_task()) or with a text encoder"
    )
  return tasks.read_null_text(cache_dir)


def _compile_step(setup, state, first, keys, encoder, summary: TrainSummary, null_text=None):
  """The train step compiled ahead of time for the first batch's shapes: (compiled, signature)."""
  global_batch = setup.spec.global_batch
  shapes = {
    k: jax.ShapeDtypeStruct((global_batch,) + first[k].shape[1:], first[k].dtype) for k in keys
  }

  def count_trace():
    summary.traces += 1

  encoder_config, encoder_params, encoder_shardings = encoder
  t0 = time.perf_counter()
  lowered, sig = setup.lower(
    shapes,
    state=state,
    encoder_params=encoder_params,
    encoder_config=encoder_config,
    encoder_shardings=encoder_shardings,
    trace_counter=count_trace,
    null_text=null_text,
  )
  compiled = lowered.compile()
  summary.compile_seconds = time.perf_counter() - t0
  summary.flops_per_step = perf.compiled_flops(compiled)
  return compiled, sig


def _restore_or_create(mgr, setup, batch_source, seed: int, announce: bool, init=None):
  """The latest complete checkpoint's state (and data position), or a new state created sharded;
  with `init` ({'run', 'step', 'params'}), a new state whose parameters (and EMA) are another run's,
  with a fresh optimizer at step 0."""
  latest = mgr.latest_step()
  if latest is None:
    state = setup.create_state(seed)
    if init is None:
      return state
    params = ckpt.restore_init_params(
      init["run"], init["step"], setup.abstract.params, setup.shardings.params, init["params"]
    )
    if announce:
      print(
        f"initialised from {init['run']} step {init['step']} ({init['params']} parameters); "
        "fresh optimizer, step 0",
        flush=True,
      )
    # the EMA starts at the same values in buffers of its own (the step donates both)
    ema = jax.jit(
      lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=setup.shardings.params
    )
    return state.replace(params=params, ema_params=ema(params))
  state = ckpt.restore(mgr, latest, setup.abstract, setup.shardings, iterator=batch_source)
  if announce:
    print(f"resumed from {epath.Path(mgr.directory) / str(latest)} (step {latest})", flush=True)
  return state


class _MetricLog:
  """Turns a logging interval's summed metrics into scalars, a console line and the run's
  history."""

  def __init__(
    self,
    summary: TrainSummary,
    writer: writers_lib.MetricWriter,
    *,
    start: int,
    num_steps: int,
    global_batch: int,
    opt_config: optim.OptimizerConfig,
    max_nonfinite_streak: int,
  ):
    self.summary = summary
    self.writer = writer
    self.num_steps = num_steps
    self.global_batch = global_batch
    self.opt_config = opt_config
    self.max_nonfinite_streak = max_nonfinite_streak
    self.schedule = optim.learning_rate_schedule(opt_config)
    self.peak, self.peak_source = perf.device_peak_flops()
    self.interval_times: List[float] = []
    self._t_last, self._step_last = time.perf_counter(), start

  def write(self, step: int, sums, latest_checkpoint: Optional[int]) -> None:
    """Writes the interval ending at `step`; raises NonFiniteError after too many non-finite
    steps."""
    sums = jax.device_get(sums)
    streak, total = int(sums["nonfinite_streak"]), int(sums["nonfinite_total"])
    now = time.perf_counter()
    dt = (now - self._t_last) / max(step - self._step_last, 1)
    self.interval_times.append(dt)
    self._t_last, self._step_last = now, step
    finite = float(sums["finite_steps"])
    loss = float(sums["loss_sum"]) / finite if finite else float("nan")
    gnorm = float(sums["grad_norm_sum"]) / finite if finite else float("nan")
    skipped = int(sums["nonfinite_steps"])
    lr = float(self.schedule(max(step - 1, 0) // self.opt_config.accumulate_steps))
    flops = self.summary.flops_per_step
    util = perf.mfu(flops, dt, self.peak)
    tflops = flops / dt / 1e12 if flops else float("nan")
    batch = self.global_batch
    scalars = {
      "learning/loss": loss,
      "learning/grad_norm": gnorm,
      "learning/lr": lr,
      "learning/skipped_steps": skipped,
      "learning/nonfinite_total": total,
      "perf/step_time": dt,
      "perf/steps_per_sec": 1.0 / dt,
      "perf/images_per_sec": batch / dt,
      "perf/tflops_per_device": tflops,
      "perf/mfu": util,
    }
    self.summary.history.append((step, loss))
    self.summary.nonfinite_total = total
    eta = (self.num_steps - step) * dt
    line = (
      f"step {step}/{self.num_steps} | loss {loss:.4f} | grad_norm {gnorm:.3f} | lr {lr:.2e} | "
      "skipped "
      f"{skipped} | {1.0 / dt:.2f} steps/s | {batch / dt:.1f} img/s | MFU {100 * util:.2f}% | eta "
      f"{eta:.0f}s"
    )
    self.writer.write(step, scalars, line)
    if streak >= self.max_nonfinite_streak:
      raise NonFiniteError(
        f"{streak} non-finite steps in a row (max_nonfinite_streak = "
        f"{self.max_nonfinite_streak}) at step {step}; stopped, the last checkpoint "
        f"(step {latest_checkpoint}) is intact"
      )

  def median_step_time(self) -> Optional[float]:
    later = self.interval_times[1:] if len(self.interval_times) > 1 else self.interval_times
    return float(np.median(later)) if later else None


class _Checkpointer:
  """Saves the state and the data position, never a non-finite state or one past the non-finite
  limit."""

  def __init__(
    self,
    mgr,
    batch_source,
    summary: TrainSummary,
    *,
    max_nonfinite_streak: int,
    announce: bool,
    lead: bool,
    async_save: bool,
  ):
    self.mgr = mgr
    self.batch_source = batch_source
    self.summary = summary
    self.max_nonfinite_streak = max_nonfinite_streak
    self.announce = announce
    self.lead = lead
    self.async_save = async_save
    self._finite = jax.jit(lambda s: state_lib.all_finite((s.params, s.ema_params)))

  def save(self, step: int, state) -> bool:
    if not bool(jax.device_get(self._finite(state))):
      if self.lead:
        print(f"step {step}: the state is not finite; checkpoint skipped", flush=True)
      return False
    if int(jax.device_get(state.nonfinite_streak)) >= self.max_nonfinite_streak:
      return False
    ckpt.save(self.mgr, step, state, self.batch_source)
    self.summary.checkpoints.append(step)
    if self.announce and self.lead:
      print(
        f"checkpoint: step {step} saving" + (" (asynchronously)" if self.async_save else ""),
        flush=True,
      )
    return True


def _print_start(
  record, setup, mesh, summary: TrainSummary, peak: Tuple[float, str], *, start: int, num_steps: int
) -> None:
  tensors, replicated = state_lib.replicated_by_divisibility(setup.boxed, mesh)
  print(
    f"train {record['network']} ({record['parameters'] / 1e6:.2f}M parameters) on mesh "
    f"{dict(mesh.shape)}, "
    f"{jax.device_count()} devices / {jax.process_count()} processes; global batch "
    f"{setup.spec.global_batch}; "
    f"steps {start} -> {num_steps}",
    flush=True,
  )
  print(
    f"sharding: {tensors} tensors ({replicated / 1e6:.3f}M parameters) left replicated along an "
    "axis "
    f"that does not divide them",
    flush=True,
  )
  flops = summary.flops_per_step
  print(
    f"step compiled in {summary.compile_seconds:.1f}s; "
    + (f"{flops / 1e9:.2f} GFLOP per step per device (XLA cost analysis); " if flops else "")
    + f"peak {peak[0] / 1e12:.2f} TFLOP/s ({peak[1]})",
    flush=True,
  )


def _loop(
  compiled,
  sig,
  state,
  first,
  keys,
  encoder_params,
  batch_source,
  *,
  summary: TrainSummary,
  start: int,
  num_steps: int,
  log_every: int,
  checkpoint_every: int,
  hooks,
  mesh,
  model_dir: str,
  writer: writers_lib.MetricWriter,
  preemption: _Preemption,
  mgr,
  log: _MetricLog,
  checkpointer: _Checkpointer,
  lead: bool,
) -> None:
  """Steps start -> num_steps: dispatch step N, then write step N-1's metrics while N runs;
  checkpoints every `checkpoint_every` steps, at preemption and at the end. `summary.final_step`
  follows."""
  acc = step_lib.zero_metrics()
  accumulate = jax.jit(step_lib.accumulate)
  pending = None  # (step, sums) of the last interval, written while the next step runs
  host_step = start
  batch = first
  wrote_operative = False
  try:
    while host_step < num_steps:
      if batch is None:
        batch = next(batch_source)
      state, metrics = compiled(
        state, _global_batch(batch, keys, sig.in_shardings[1]), encoder_params
      )
      batch = None
      host_step += 1
      acc = accumulate(acc, metrics)
      if pending is not None:
        p, pending = pending, None
        log.write(*p, latest_checkpoint=mgr.latest_step())
      if not wrote_operative and lead:
        ckpt.gin_file(model_dir, operative=True).write_text(gin.operative_config_str())
        wrote_operative = True
      if host_step % log_every == 0 or host_step == num_steps:
        pending = (host_step, acc)
        acc = step_lib.zero_metrics()
      for hook, every, write in hooks:  # write: the writer method the hook is handed
        if hook is not None and every and host_step % every == 0:
          with partitioning.mesh_context(mesh):
            hook(
              step=host_step, state=state, model_dir=model_dir, **{write: getattr(writer, write)}
            )
      if preemption.reached(mgr, host_step):
        checkpointer.save(host_step, state)
        summary.stopped = "preempted"
        if lead:
          print(f"preempted (SIGTERM) at step {host_step}: checkpoint saved, exiting", flush=True)
        break
      if host_step % checkpoint_every == 0 and host_step != num_steps:
        checkpointer.save(host_step, state)
    if pending is not None:
      log.write(*pending, latest_checkpoint=mgr.latest_step())
    if summary.stopped == "done" and (
      not summary.checkpoints or summary.checkpoints[-1] != host_step
    ):
      checkpointer.save(host_step, state)
  finally:
    summary.final_step = host_step


def _check_init_from(init_from, which: str, model_dir, model_config) -> Optional[dict]:
  """{'run', 'step', 'params'} of a new run's init_from, checked against the network before any
  data is opened or anything written; None when there is none or MODEL_DIR resumes its own."""
  if which not in ("ema", "params"):
    raise TrainError(f"init_from_params must be 'ema' or 'params', got {which!r}")
  if init_from is None or ckpt.latest_step(model_dir) is not None:
    return None
  shapes_only = ckpt.run_record(model_config, nn.unbox(models.abstract_params(model_config)))
  return dict(ckpt.check_init_from(init_from, shapes_only), params=which)


def _prepare_hooks(hooks, first, model_config, diffusion, mesh, null_text=None) -> None:
  for hook, every, _ in hooks:
    if hook is not None and every and hasattr(hook, "prepare"):
      extra = {} if null_text is None else {"null_text": null_text}  # IF: the empty prompt
      hook.prepare(batch=first, model_config=model_config, diffusion=diffusion, mesh=mesh, **extra)


@gin.configurable
def train(
  *,
  model_dir: str = gin.REQUIRED,
  num_steps: int = gin.REQUIRED,
  data_task: Optional[str] = None,
  batch_source=None,
  model_config=None,
  diffusion: Optional[DiffusionConfig] = None,
  optimizer: Optional[optim.OptimizerConfig] = None,
  data_config=None,
  mesh_shape: Sequence[int] = (-1, 1, 1),
  seed: int = 0,
  ema_decay: float = 0.9999,
  ema_warmup: bool = True,
  log_every: int = 50,
  checkpoint_every: int = 1000,
  keep_checkpoints: Optional[int] = 3,
  async_checkpoints: bool = True,
  max_nonfinite_streak: int = 10,
  compilation_cache_dir: Optional[str] = "~/.cache/imagen_jax/xla",
  text_encoder_checkpoint: Optional[str] = None,
  sample_every: int = 0,
  sample_hook: Optional[Callable[..., None]] = None,
  eval_every: int = 0,
  eval_hook: Optional[Callable[..., None]] = None,
  writers: Sequence[str] = ("tensorboard",),
  init_from: Optional[str] = None,
  init_from_params: str = "ema",
  progress: bool = True,
  devices=None,
) -> TrainSummary:
  """Trains one cascade stage (see the module docstring and `gin_configs/runs/train_*.gin`).

  Args:
    model_dir: the run directory (checkpoints, logs, gin config).
    num_steps: optimizer calls in all.
    data_task: a seqio task (normally `@cached_task()`), read through StageDataConfig
      (`data_config`).
    batch_source: (Python only) replaces `data_task` with any source of host-local batches
      (`train.data`).
    model_config: the network (None: the gin-configured one).
    diffusion: the diffusion settings (None: the gin-configured ones).
    optimizer: the optimizer settings (None: the gin-configured ones).
    data_config: the data settings (None: the gin-configured ones).
    mesh_shape: (data, fsdp, tensor); one entry may be -1.
    seed: the run's seed (initialisation and every step's key).
    ema_decay: the EMA decay of the parameters.
    ema_warmup: ramp the EMA decay up over the first steps.
    log_every: steps per metrics line.
    checkpoint_every: steps per checkpoint.
    keep_checkpoints: how many checkpoints to keep (None: all).
    async_checkpoints: write checkpoints in the background.
    max_nonfinite_streak: stop after this many non-finite steps in a row.
    compilation_cache_dir: JAX's persistent compilation cache (None: off).
    text_encoder_checkpoint: embed tokens on the fly (StageDataConfig.embeddings = 'on_the_fly').
    sample_every: steps per sample grid (0: none).
    sample_hook: called as sample_hook(step=, state=, model_dir=, write_images=) every
      `sample_every` steps (`imagen_jax.sample.grid_hook.SampleGridHook`; its `prepare` gets the
      first batch).
    eval_every: steps per evaluation (0: none).
    eval_hook: called as eval_hook(step=, state=, model_dir=, write_scalars=) every `eval_every`
      steps (`imagen_jax.eval.hook.ShapesEvalHook`; its `prepare` gets the first batch).
    writers: where metrics go: any of 'tensorboard', 'wandb' (`train.writers.WandbSettings`).
    init_from: 'RUN_DIR[@STEP]': a new run starts from that run's (shape-checked) parameters at
      step 0, fresh optimizer; in run.json. Ignored once MODEL_DIR has a checkpoint (resuming).
    init_from_params: 'ema' (the EMA parameters) or 'params' (the raw ones).
    progress: print progress lines.
    devices: (Python only) the mesh's devices (default: all).

  Returns:
    A `TrainSummary`.
  """
  require("train", model_dir=model_dir, num_steps=num_steps)
  model_dir = str(ckpt.absolute(model_dir))
  enable_compilation_cache(compilation_cache_dir)
  model_config = model_config if model_config is not None else models.model_config()
  diffusion = diffusion if diffusion is not None else DiffusionConfig()
  opt_config = optimizer if optimizer is not None else optim.OptimizerConfig()
  if num_steps < 1 or log_every < 1 or checkpoint_every < 1:
    raise TrainError(
      f"num_steps, log_every and checkpoint_every must be >= 1 (got {num_steps}, {log_every}, "
      f"{checkpoint_every})"
    )
  writers_lib.check_writers(writers)  # before anything is written
  mesh = _mesh(mesh_shape, devices)
  lead = jax.process_index() == 0
  init = _check_init_from(init_from, init_from_params, model_dir, model_config)

  # ------------------------------------------------------------------ what trains, and the data
  batch_source, global_batch = _data_source(batch_source, data_task, data_config)
  spec = setup_lib.RunSpec(
    model_config=model_config,
    diffusion=diffusion,
    optimizer=opt_config,
    global_batch=global_batch,
    mesh_shape=tuple(mesh.shape.values()),
    ema_decay=ema_decay,
    ema_warmup=ema_warmup,
  )
  setup = setup_lib.TrainSetup(spec, mesh)
  record = ckpt.run_record(model_config, setup.abstract.params, diffusion)
  record.update({"init_from": init} if init else {})
  ckpt.check_run_dir(model_dir, record)  # another network's MODEL_DIR: refused, nothing written
  local_batch = global_batch // jax.process_count()
  on_the_fly = text_encoder_checkpoint is not None
  keys = _needed_keys(model_config, on_the_fly)

  mgr = ckpt.manager(model_dir, max_to_keep=keep_checkpoints, async_save=async_checkpoints)
  preemption = _Preemption()
  writer = writers_lib.MetricWriter(model_dir, writers, enabled=lead, progress=progress)
  try:
    state = _restore_or_create(mgr, setup, batch_source, seed, progress and lead, init)
    start = int(jax.device_get(state.step))
    if lead:
      ckpt.gin_file(model_dir).write_text(gin.config_str())
    encoder = _load_encoder(text_encoder_checkpoint, mesh) if on_the_fly else (None, None, None)
    encoder_params = encoder[1]
    summary = TrainSummary(start_step=start, final_step=start, stopped="done")
    if start >= num_steps:
      if progress and lead:
        print(
          f"{model_dir}: already trained to step {start} (num_steps = {num_steps}); nothing to do",
          flush=True,
        )
      return summary

    # ---------------------------------------------------------------- the first batch, the step
    first = next(batch_source)
    _check_batch(first, keys, model_config, local_batch)
    hooks = ((sample_hook, sample_every, "write_images"), (eval_hook, eval_every, "write_scalars"))
    null_text = _null_text(diffusion, data_task, encoder, first)
    _prepare_hooks(hooks, first, model_config, diffusion, mesh, null_text)
    compiled, sig = _compile_step(setup, state, first, keys, encoder, summary, null_text)
    log = _MetricLog(
      summary,
      writer,
      start=start,
      num_steps=num_steps,
      global_batch=global_batch,
      opt_config=opt_config,
      max_nonfinite_streak=max_nonfinite_streak,
    )
    checkpointer = _Checkpointer(
      mgr,
      batch_source,
      summary,
      max_nonfinite_streak=max_nonfinite_streak,
      announce=progress,
      lead=lead,
      async_save=async_checkpoints,
    )
    if lead and progress:
      _print_start(
        record, setup, mesh, summary, (log.peak, log.peak_source), start=start, num_steps=num_steps
      )

    # ---------------------------------------------------------------- the loop
    try:
      _loop(
        compiled,
        sig,
        state,
        first,
        keys,
        encoder_params,
        batch_source,
        summary=summary,
        start=start,
        num_steps=num_steps,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        hooks=hooks,
        mesh=mesh,
        model_dir=model_dir,
        writer=writer,
        preemption=preemption,
        mgr=mgr,
        log=log,
        checkpointer=checkpointer,
        lead=lead,
      )
    except NonFiniteError:
      summary.stopped = "nonfinite"
      raise
    finally:
      mgr.wait_until_finished()
      summary.step_time = log.median_step_time()
    return summary
  finally:
    preemption.close()
    writer.close()
    mgr.close()


def _task_source(task_name: str, data_config):
  import seqio

  from imagen_jax.train.data import TaskSource

  try:
    seqio.get_mixture_or_task(task_name)
  except ValueError:
    raise TrainError(
      f"data task {task_name!r} is not registered (use train.data_task = @cached_task() with "
      "cached_task.cache_dir = ...)"
    ) from None
  return TaskSource(task_name, data_config)
