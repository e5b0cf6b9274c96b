"""Orbax checkpoints of a training run: asynchronous, atomic (a checkpoint cut short is never
listed), restorable onto any mesh; run.json says what trains in a run directory. Layout:
docs/outputs.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from imagen_jax.errors import UserError
from imagen_jax.files import write_json

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


class RunDirError(UserError):
  """MODEL_DIR holds something else than this run (another stage or size), or no checkpoint."""


# ------------------------------------------------------------------------------- the data iterator


@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  iterator: Any  # has .save(path_prefix) and .restore(path_prefix)


@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class IteratorHandler(ocp.CheckpointHandler):
  """Saves each process's data iterator position (synchronously: it is the position at save
  time)."""

  def save(self, directory: epath.Path, args: IteratorSave):
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(str(directory / f"process_{jax.process_index():05d}"))

  def restore(self, directory: epath.Path, args: IteratorRestore):
    args.iterator.restore(str(epath.Path(directory) / f"process_{jax.process_index():05d}"))
    return args.iterator


ocp.args.register_with_handler(IteratorHandler, for_save=True)(IteratorSave)
ocp.args.register_with_handler(IteratorHandler, for_restore=True)(IteratorRestore)


# ---------------------------------------------------------------------------------- the run record


def param_shapes(params) -> dict:
  """'/'-joined parameter path -> shape list (arrays or ShapeDtypeStructs)."""
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }


def run_record(model_config, params, diffusion=None) -> dict:
  """run.json: the network (config and parameter shapes) and, given the stage's DiffusionConfig,
  what sampling must reproduce of its training (objective, schedules)."""
  from imagen_jax import models

  fields = {
    k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model_config).items()
  }
  shapes = param_shapes(params)
  return {
    "network": type(model_config).__name__,
    "super_resolution": models.is_super_resolution(model_config),
    "parameters": int(sum(int(np.prod(s)) for s in shapes.values())),
    "config": fields,
    "param_shapes": shapes,
    **({"diffusion": diffusion.training_record()} if diffusion is not None else {}),
  }


def describe(record: dict) -> str:
  """A run's network in words, from its run.json record: kind, network, resolution, size, width."""
  cfg = record["config"]
  sr = record.get("super_resolution")
  low = f"{cfg.get('lowres_size')}->" if sr else ""
  width = cfg.get("model_channels", cfg.get("channels"))
  if width is None and cfg.get("block_out_channels"):  # DeepFloyd IF's U-Net
    width = cfg["block_out_channels"][0]
  return (
    f"{'super-resolution' if sr else 'base'} {record['network']} {low}{cfg.get('image_size')}px, "
    f"{record['parameters'] / 1e6:.2f}M parameters (width {width})"
  )


def check_run_dir(model_dir, record: dict) -> None:
  """Raises RunDirError when MODEL_DIR was made by a run of another network (stage, resolution or
  size); writes the record when it is new. Nothing else in MODEL_DIR is touched."""
  path = epath.Path(model_dir) / RUN_FILE
  if path.exists():
    old = json.loads(path.read_text())
    if old.get("param_shapes") != record["param_shapes"] or old.get("network") != record["network"]:
      diff = sorted(
        k
        for k in set(old.get("config", {})) | set(record["config"])
        if old.get("config", {}).get(k) != record["config"].get(k)
      )
      raise RunDirError(
        f"{model_dir} holds a run of {describe(old)}, not of the configured "
        f"{describe(record)} (differs in: {', '.join(diff[:6]) or 'parameter shapes'}); "
        "use another MODEL_DIR"
      )
    if "diffusion" in old and "diffusion" in record and old["diffusion"] != record["diffusion"]:
      diff = sorted(
        k for k in record["diffusion"] if old["diffusion"].get(k) != record["diffusion"][k]
      )
      raise RunDirError(
        f"{model_dir} holds a run trained with other diffusion settings ({', '.join(diff)}: "
        f"{', '.join(str(old['diffusion'].get(k)) for k in diff)}); use another MODEL_DIR"
      )
    return
  if epath.Path(model_dir, CHECKPOINTS).exists() and any(
    epath.Path(model_dir, CHECKPOINTS).iterdir()
  ):
    raise RunDirError(f"{model_dir} holds checkpoints but no {RUN_FILE}: not a run of this trainer")
  path.parent.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    write_json(path, record)


def read_run_record(model_dir) -> dict:
  path = epath.Path(model_dir) / RUN_FILE
  if not path.exists():
    raise RunDirError(f"{model_dir}: no {RUN_FILE}; not a training run directory")
  return json.loads(path.read_text())


# ---------------------------------------------------------------------------------- the manager


def absolute(path) -> epath.Path:
  """A local path made absolute (orbax requires it); URLs such as gs://... are kept."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(os.path.expanduser(path)))


def manager(
  model_dir, *, max_to_keep: Optional[int] = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  if read_only:  # a reader (sampling, evaluation, a run still training): never writes, never waits
    options = ocp.CheckpointManagerOptions(
      read_only=True,
      create=False,
      save_interval_steps=0,
      max_to_keep=None,
      enable_async_checkpointing=False,
    )
  else:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
    )
  return ocp.CheckpointManager(absolute(model_dir) / CHECKPOINTS, options=options)


def _split(state):
  """The state's 'state' item (everything but the EMA) and its 'ema_params' item."""
  return {
    "step": state.step,
    "params": state.params,
    "opt_state": state.opt_state,
    "rng": state.rng,
    "nonfinite_streak": state.nonfinite_streak,
    "nonfinite_total": state.nonfinite_total,
  }, state.ema_params


def save(mgr: ocp.CheckpointManager, step: int, state, iterator=None, force: bool = True) -> bool:
  """Starts an (asynchronous) save of `state` and the iterator position at `step`."""
  main, ema = _split(state)
  items = {"state": ocp.args.StandardSave(main), "ema_params": ocp.args.StandardSave(ema)}
  if iterator is not None:
    items["data"] = IteratorSave(iterator)
  return mgr.save(step, args=ocp.args.Composite(**items), force=force)


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state, shardings, iterator=None):
  """The state saved at `step`, placed with `shardings` (any mesh: orbax reshards on load); the
  iterator (if given) is moved to the saved position."""
  main, ema = _split(abstract_state)
  main_s, ema_s = _split(shardings)
  items = {
    "state": ocp.args.StandardRestore(_abstract(main, main_s)),
    "ema_params": ocp.args.StandardRestore(_abstract(ema, ema_s)),
  }
  if iterator is not None:
    items["data"] = IteratorRestore(iterator)
  out = mgr.restore(step, args=ocp.args.Composite(**items))
  m = out["state"]
  return abstract_state.replace(
    step=m["step"],
    params=m["params"],
    ema_params=out["ema_params"],
    opt_state=m["opt_state"],
    rng=m["rng"],
    nonfinite_streak=m["nonfinite_streak"],
    nonfinite_total=m["nonfinite_total"],
  )


def latest_step(model_dir) -> Optional[int]:
  """The latest complete checkpoint's step (None if there is none); never waits, never writes."""
  d = absolute(model_dir) / CHECKPOINTS
  if not d.exists():
    return None
  mgr = manager(model_dir, read_only=True)
  try:
    return mgr.latest_step()
  finally:
    mgr.close()


def restore_ema_params(model_dir, abstract_params, shardings=None, step: Optional[int] = None):
  """The EMA parameters of a run (latest complete checkpoint, or `step`) without reading the
  optimizer state. abstract_params: ShapeDtypeStructs of the parameters (e.g.
  nn.unbox(models.abstract_params(cfg))); shardings: where to place them (default: the first
  local device). Returns (params, step)."""
  mgr = manager(model_dir, read_only=True)
  try:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise RunDirError(f"{model_dir}: no complete checkpoint")
    if step not in mgr.all_steps():
      raise RunDirError(
        f"{model_dir}: no complete checkpoint at step {step} (have {mgr.all_steps()})"
      )
    if shardings is None:
      dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree_util.tree_map(lambda _: dev, abstract_params)
    out = mgr.restore(
      step,
      args=ocp.args.Composite(
        ema_params=ocp.args.StandardRestore(_abstract(abstract_params, shardings))
      ),
    )
    return out["ema_params"], step
  finally:
    mgr.close()


# ---------------------------------------------------------------------- starting from another run


def parse_init_from(spec: str):
  """'RUN_DIR' or 'RUN_DIR@STEP' -> (RUN_DIR, STEP or None)."""
  head, at, tail = str(spec).rpartition("@")
  if at and tail.isdigit():
    return head, int(tail)
  return str(spec), None


def check_init_from(spec: str, record: dict) -> dict:
  """Checks that the run `spec` names ('RUN_DIR[@STEP]') holds a checkpoint of the network `record`
  describes (every tensor present, no other, same shapes).

  Args:
    spec: the run to start from, optionally with a step.
    record: the configured network's run record (`run_record`).

  Returns:
    {'run': RUN_DIR, 'step': the step that will be read}.

  Raises:
    RunDirError: no run or checkpoint there, or a tensor missing, extra or of another shape (the
      first such tensor is named).
  """
  run_dir, step = parse_init_from(spec)
  try:
    other = read_run_record(run_dir)
  except RunDirError as e:
    raise RunDirError(f"init_from {e}") from None
  want, have = record["param_shapes"], other.get("param_shapes", {})
  for name in sorted(want):
    if name not in have:
      raise RunDirError(f"init_from {run_dir}: no tensor {name} there (it holds {describe(other)})")
    if list(have[name]) != list(want[name]):
      raise RunDirError(
        f"init_from {run_dir}: tensor {name} has shape {list(have[name])} there, "
        f"{list(want[name])} in the configured network"
      )
  extra = sorted(set(have) - set(want))
  if extra:
    raise RunDirError(f"init_from {run_dir}: tensor {extra[0]} is not in the configured network")
  mgr = manager(run_dir, read_only=True)
  try:
    steps = mgr.all_steps()
  finally:
    mgr.close()
  if not steps:
    raise RunDirError(f"init_from {run_dir}: no complete checkpoint")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise RunDirError(f"init_from {run_dir}: no checkpoint at step {step} (have {sorted(steps)})")
  return {"run": str(run_dir), "step": int(step)}


def restore_init_params(run_dir, step: int, abstract_params, shardings, which: str = "ema"):
  """The parameters a run saved at `step`: its EMA ('ema') or its raw parameters ('params'),
  placed with `shardings` (orbax reshards onto any mesh); the optimizer state is not read."""
  if which == "ema":
    return restore_ema_params(run_dir, abstract_params, shardings, step)[0]
  if which != "params":
    raise UserError(f"init_from_params must be 'ema' or 'params', got {which!r}")
  mgr = manager(run_dir, read_only=True)
  try:
    item = {"params": _abstract(abstract_params, shardings)}
    restore = ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    )
    out = mgr.restore(step, args=ocp.args.Composite(state=restore))
    return out["state"]["params"]
  finally:
    mgr.close()


def gin_file(model_dir, operative: bool = False) -> epath.Path:
  return epath.Path(model_dir) / ("operative_config.gin" if operative else "config.gin")
