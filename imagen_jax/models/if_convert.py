"""DeepFloyd IF U-Net checkpoints in diffusers' layout -> `IFUNet` parameters and a run directory.

A diffusers U-Net folder holds `config.json` and `diffusion_pytorch_model*.safetensors` (one file,
a sharded index, or a variant such as fp16). `config_from_diffusers` maps the config onto an
`IFUNetConfig` (refusing what the IF U-Net does not implement), `load_diffusers` reads every
tensor the network needs (each checked for presence and shape; a tensor the network does not use
is an error too) and `convert` writes a run directory that `sample` and `train` (through
`train.init_from`) take like any training run: run.json and an orbax checkpoint at step 0 holding
the weights as the run's EMA parameters. Pickled weights (`.bin`) are never read.

Name mapping: diffusers' module path with numbered children joined (`down_blocks.0.resnets.1.conv1`
-> `down_blocks_0/resnets_1/conv1`); Linear weights transposed (attention projections reshaped to
(in, heads, head_dim) / (heads, head_dim, out)); Conv2d weights (O, I, kh, kw) -> (kh, kw, I, O);
GroupNorm / LayerNorm weight -> scale.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from imagen_jax.errors import UserError
from imagen_jax.models.if_unet import IFUNetConfig

WEIGHTS_STEM = "diffusion_pytorch_model"
# diffusers config keys that do not change what the IF U-Net computes (bookkeeping, or options of
# blocks the IF configs do not use).
_IGNORED = {
  "_class_name",
  "_diffusers_version",
  "_name_or_path",
  "sample_size",
  "in_channels",
  "upcast_attention",
  "use_linear_projection",
  "transformer_layers_per_block",
  "reverse_transformer_layers_per_block",
  "downsample_padding",
  "dual_cross_attention",
  "attention_type",
  "num_attention_heads",
  "encoder_hid_dim_type",
  "addition_embed_type",
  "time_embedding_type",
  "conv_in_kernel",
  "conv_out_kernel",
  "center_input_sample",
  "class_embeddings_concat",
  "num_class_embeds",
  "projection_class_embeddings_input_dim",
  "timestep_post_act",
  "time_cond_proj_dim",
  "addition_time_embed_dim",
}
# What those keys must be for the IF U-Net to compute what diffusers computes.
_REQUIRED = {
  "encoder_hid_dim_type": (None, "text_proj"),
  "addition_embed_type": ("text",),
  "time_embedding_type": ("positional",),
  "conv_in_kernel": (3,),
  "conv_out_kernel": (3,),
  "center_input_sample": (False,),
  "class_embeddings_concat": (False,),
  "num_class_embeds": (None,),
  "timestep_post_act": (None,),
  "time_cond_proj_dim": (None,),
  "dual_cross_attention": (False,),
}
_MODULE_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")
_WRAPPERS = {"GroupNorm_0", "LayerNorm_0", "Dense_0", "Conv_0"}


class ConvertError(UserError):
  """A diffusers checkpoint the IF U-Net cannot take: a missing, unused or misshapen tensor, an
  unsupported block or option, pickled weights."""


def config_from_diffusers(
  cfg: dict, image_size: Optional[int] = None, lowres_size: Optional[int] = None, **overrides
) -> IFUNetConfig:
  """An `IFUNetConfig` from a diffusers UNet2DConditionModel config.json (as a dict).

  Args:
    cfg: the config.
    image_size: the output size (default the config's sample_size).
    lowres_size: IF-II's low-res size (default image_size // 4 when the network takes 6 input
      channels).
    **overrides: project fields (dtype, remat, attention_impl, max_text_length, ...).

  Returns:
    The config.

  Raises:
    ConvertError: an option the IF U-Net does not implement.
  """
  fields = {f.name for f in dataclasses.fields(IFUNetConfig)}
  for key, allowed in _REQUIRED.items():
    if key in cfg and cfg[key] not in allowed:
      raise ConvertError(f"unsupported {key}={cfg[key]!r} (the IF U-Net takes {allowed})")
  unknown = sorted(k for k in cfg if k not in fields and k not in _IGNORED)
  if unknown:
    raise ConvertError(f"unsupported U-Net config keys: {', '.join(unknown)}")
  kwargs = {k: v for k, v in cfg.items() if k in fields}
  for k, v in kwargs.items():
    if isinstance(v, list):
      kwargs[k] = tuple(v)
  size = int(image_size or cfg.get("sample_size") or 64)
  in_ch = int(cfg.get("in_channels", 3))
  out_ch = int(cfg.get("out_channels", 6))
  if in_ch == 2 * 3 or in_ch == 2 * (out_ch // 2):
    kwargs["in_channels"] = in_ch // 2
    kwargs["lowres_size"] = int(lowres_size or size // 4)
  else:
    kwargs["in_channels"] = in_ch
  kwargs["image_size"] = size
  kwargs.update(overrides)
  try:
    return IFUNetConfig(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConvertError(f"unsupported U-Net config: {str(e).splitlines()[0]}") from None


def diffusers_name(path: Tuple[str, ...]) -> Tuple[str, str]:
  """(diffusers tensor name, kind) of one of our parameter paths; kind says how to lay it out:
  conv, dense, heads_in, heads_bias, heads_out, vector."""
  parts = []
  for p in path[:-1]:
    if p in _WRAPPERS:
      continue
    m = re.fullmatch(r"(.*)_(\d+)", p)
    if m and m.group(1) in _MODULE_LISTS + ("to_out",):
      parts.extend(m.groups())
    else:
      parts.append(p)
  leaf = path[-1]
  wrapper = next((p for p in path if p in _WRAPPERS), None)
  if leaf == "positional_embedding":
    return ".".join(parts + [leaf]), "vector"
  name = ".".join(parts + ["bias" if leaf == "bias" else "weight"])
  if wrapper == "Conv_0":
    return name, "conv" if leaf == "kernel" else "vector"
  if wrapper == "Dense_0":
    return name, "dense" if leaf == "kernel" else "vector"
  if wrapper in ("GroupNorm_0", "LayerNorm_0"):
    return name, "vector"
  if parts[-1] == "to_out.0" or path[-2] == "to_out_0":
    return name, "heads_out" if leaf == "kernel" else "vector"
  return name, "heads_in" if leaf == "kernel" else "heads_bias"


def _layout(value: np.ndarray, kind: str, shape: Tuple[int, ...]) -> np.ndarray:
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if kind == "dense":
    return value.T
  if kind == "heads_in":  # (heads * head_dim, in) -> (in, heads, head_dim)
    return value.T.reshape(shape) if value.ndim == 2 else value
  if kind == "heads_out":  # (out, heads * head_dim) -> (heads, head_dim, out)
    return value.T.reshape(shape) if value.ndim == 2 else value
  if kind == "heads_bias":
    return value.reshape(shape) if value.ndim == 1 and value.size == int(np.prod(shape)) else value
  return value


def expected_params(config: IFUNetConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Our parameter path -> shape, for `config` (abstract: nothing allocated)."""
  import flax.linen as nn

  from imagen_jax import models

  shapes = nn.unbox(models.abstract_params(config))
  return {
    tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
  }


def load_diffusers(directory, variant: Optional[str] = None, **config_overrides):
  """(config, params) of a diffusers IF U-Net folder; params a nested dict of float32 NumPy arrays.

  Raises:
    ConvertError: no config.json, an unsupported option, or a tensor missing, unused or of another
      shape (named).
  """
  from imagen_jax.text.checkpoints import CheckpointError, read_safetensor, safetensors_files

  directory = Path(directory)
  if not directory.is_dir():
    raise ConvertError(f"{directory}: not a directory")
  cfg_file = directory / "config.json"
  if not cfg_file.is_file():
    raise ConvertError(f"{directory}: no config.json (a diffusers U-Net folder, e.g. IF's unet/)")
  config = config_from_diffusers(json.loads(cfg_file.read_text()), **config_overrides)
  try:
    files = safetensors_files(directory, WEIGHTS_STEM, variant)
  except CheckpointError as e:
    raise ConvertError(str(e)) from None
  flat, used = {}, set()
  for path, shape in expected_params(config).items():
    name, kind = diffusers_name(path)
    if name not in files:
      raise ConvertError(f"{directory}: missing tensor {name} (for {'/'.join(path)})")
    value = np.asarray(read_safetensor(files[name], name))
    value = _layout(value, kind, shape)
    if tuple(value.shape) != shape:
      raise ConvertError(
        f"{directory}: tensor {name} has shape {tuple(value.shape)} after layout, "
        f"the configured network needs {shape} (for {'/'.join(path)})"
      )
    flat[path] = value.astype(np.float32)
    used.add(name)
  extra = sorted(set(files) - used)
  if extra:
    raise ConvertError(
      f"{directory}: tensors the configured network does not use: {', '.join(extra[:5])}"
      + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    )
  params: dict = {}
  for path, value in flat.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return config, params


def if_diffusion_config(config: IFUNetConfig):
  """The diffusion settings IF was trained with: eps on the 1000-step discrete cosine schedule
  with a learned-range variance; IF-II's low-res image upsampled with aligned corners and noised on
  the same schedule at the output size; the empty prompt's embedding as the null condition."""
  from imagen_jax.diffusion.config import DiffusionConfig
  from imagen_jax.diffusion.schedules import DiscreteCosineSchedule

  schedule = DiscreteCosineSchedule(num_timesteps=config.num_train_timesteps)
  return DiffusionConfig(
    schedule=schedule,
    objective="eps",
    noise_aug_schedule=schedule,
    noise_aug_at="output",
    learned_variance=config.out_channels == 2 * config.in_channels,
    discrete_timesteps=config.num_train_timesteps,
    lowres_align_corners=True,
    null_text="empty_prompt",
  )


def convert(from_dir, to_dir, variant: Optional[str] = None, **config_overrides) -> dict:
  """Converts a diffusers IF U-Net folder into a run directory (run.json + an orbax checkpoint at
  step 0 whose EMA parameters are the weights). Nothing is written unless every tensor converts.

  Returns:
    The run record written to run.json.

  Raises:
    ConvertError: see `load_diffusers`; the target already holds a run.
  """
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from imagen_jax.files import write_json
  from imagen_jax.train import checkpoints

  config, params = load_diffusers(from_dir, variant, **config_overrides)
  to_dir = checkpoints.absolute(to_dir)
  if (to_dir / checkpoints.RUN_FILE).exists() or (to_dir / checkpoints.CHECKPOINTS).exists():
    raise ConvertError(f"{to_dir} already holds a run; convert into a new directory")
  record = checkpoints.run_record(config, params, if_diffusion_config(config))
  record["converted_from"] = {"format": "diffusers", "path": str(from_dir), "variant": variant}
  params = jax.tree_util.tree_map(jnp.asarray, params)
  to_dir.mkdir(parents=True, exist_ok=True)
  mgr = checkpoints.manager(to_dir, async_save=False)
  try:
    mgr.save(0, args=ocp.args.Composite(ema_params=ocp.args.StandardSave(params)), force=True)
    mgr.wait_until_finished()
  finally:
    mgr.close()
  write_json(to_dir / checkpoints.RUN_FILE, record)
  return record
