"""Loading T5 v1.1 encoder weights from Hugging Face and T5X checkpoints, and saving our own.

Our parameter tree uses T5X's names and kernel layouts (docs/paper.md §4):

  token_embedder/embedding                                (vocab, d_model)
  encoder/relpos_bias/rel_embedding                       (heads, buckets)
  encoder/layers_i/pre_attention_layer_norm/scale         (d_model,)
  encoder/layers_i/attention/{query,key,value}/kernel     (d_model, heads * d_kv)
  encoder/layers_i/attention/out/kernel                   (heads * d_kv, d_model)
  encoder/layers_i/pre_mlp_layer_norm/scale               (d_model,)
  encoder/layers_i/mlp/{wi_0,wi_1}/kernel                 (d_model, d_ff)
  encoder/layers_i/mlp/wo/kernel                          (d_ff, d_model)
  encoder/encoder_norm/scale                              (d_model,)

Hugging Face stores the transposes of the kernels and of the position table. Every loader checks
that each expected tensor is present with the right shape and fails with a `CheckpointError` naming
the tensor otherwise. Nothing here unpickles anything: Hugging Face weights are read from
safetensors only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from imagen_jax.errors import UserError
from imagen_jax.text.t5 import T5Config

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


class CheckpointError(UserError):
  """A checkpoint is missing, unreadable, or does not match the configuration."""


# ---------------------------------------------------------------------------------------------
# names


def expected_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """Every parameter of the encoder, by '/'-joined T5X path, with its shape."""
  d, inner, ff = config.d_model, config.inner_dim, config.d_ff
  shapes = {
    "token_embedder/embedding": (config.vocab_size, d),
    "encoder/relpos_bias/rel_embedding": (config.num_heads, config.relative_attention_num_buckets),
    "encoder/encoder_norm/scale": (d,),
  }
  for i in range(config.num_layers):
    p = f"encoder/layers_{i}"
    shapes.update(
      {
        f"{p}/pre_attention_layer_norm/scale": (d,),
        f"{p}/attention/query/kernel": (d, inner),
        f"{p}/attention/key/kernel": (d, inner),
        f"{p}/attention/value/kernel": (d, inner),
        f"{p}/attention/out/kernel": (inner, d),
        f"{p}/pre_mlp_layer_norm/scale": (d,),
        f"{p}/mlp/wi_0/kernel": (d, ff),
        f"{p}/mlp/wi_1/kernel": (d, ff),
        f"{p}/mlp/wo/kernel": (ff, d),
      }
    )
  return shapes


_HF_LAYER = {
  "pre_attention_layer_norm/scale": ("layer.0.layer_norm.weight", False),
  "attention/query/kernel": ("layer.0.SelfAttention.q.weight", True),
  "attention/key/kernel": ("layer.0.SelfAttention.k.weight", True),
  "attention/value/kernel": ("layer.0.SelfAttention.v.weight", True),
  "attention/out/kernel": ("layer.0.SelfAttention.o.weight", True),
  "pre_mlp_layer_norm/scale": ("layer.1.layer_norm.weight", False),
  "mlp/wi_0/kernel": ("layer.1.DenseReluDense.wi_0.weight", True),
  "mlp/wi_1/kernel": ("layer.1.DenseReluDense.wi_1.weight", True),
  "mlp/wo/kernel": ("layer.1.DenseReluDense.wo.weight", True),
}


def hf_names(path: str) -> Tuple[Tuple[str, ...], bool]:
  """Candidate Hugging Face names of a T5X path (the first present wins) and whether to
  transpose."""
  if path == "token_embedder/embedding":
    return ("shared.weight", "encoder.embed_tokens.weight"), False
  if path == "encoder/relpos_bias/rel_embedding":
    return ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), True
  if path == "encoder/encoder_norm/scale":
    return ("encoder.final_layer_norm.weight",), False
  m = re.fullmatch(r"encoder/layers_(\d+)/(.+)", path)
  if not m or m.group(2) not in _HF_LAYER:
    raise KeyError(path)
  name, transpose = _HF_LAYER[m.group(2)]
  return (f"encoder.block.{m.group(1)}.{name}",), transpose


def unflatten(flat: Dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def flatten(tree, prefix: str = "", is_leaf=lambda v: False) -> Dict[str, object]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict) and not is_leaf(value):
      out.update(flatten(value, path, is_leaf))
    else:
      out[path] = value
  return out


def _check(path: str, value, want: Tuple[int, ...], source: str) -> None:
  if tuple(value.shape) != tuple(want):
    raise CheckpointError(
      f"{source}: tensor {path} has shape {tuple(value.shape)}, the config expects {tuple(want)}"
    )


def _as_param(value, dtype) -> np.ndarray:
  return np.asarray(value).astype(jnp.dtype(dtype))


def cast_params(params, dtype) -> dict:
  """The nested params with every array cast to `dtype` (e.g. 'bfloat16')."""
  return unflatten({k: _as_param(v, dtype) for k, v in flatten(params).items()})


# ------------------------------------------------------------------------------------- Hugging Face


def config_from_hf(hf: dict, **overrides) -> T5Config:
  """A T5Config from a Hugging Face config.json (T5 v1.1: gated-GELU feed-forward)."""
  ff = hf.get("feed_forward_proj", "relu")
  if ff != "gated-gelu":
    raise CheckpointError(
      f"config.json: feed_forward_proj is {ff!r}; T5 v1.1 encoders use 'gated-gelu'"
    )
  try:
    kw = dict(
      vocab_size=hf["vocab_size"],
      d_model=hf["d_model"],
      num_heads=hf["num_heads"],
      d_kv=hf["d_kv"],
      d_ff=hf["d_ff"],
      num_layers=hf["num_layers"],
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
    )
  except KeyError as e:
    raise CheckpointError(f"config.json: missing field {e.args[0]!r}") from None
  kw.update(overrides)
  return T5Config(**kw)


def _check_config(found: T5Config, config: Optional[T5Config], source: str) -> T5Config:
  if config is None:
    return found
  fields = (
    "vocab_size",
    "d_model",
    "num_heads",
    "d_kv",
    "d_ff",
    "num_layers",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
  )
  diff = [
    f"{f}={getattr(found, f)} (config: {getattr(config, f)})"
    for f in fields
    if getattr(found, f) != getattr(config, f)
  ]
  if diff:
    raise CheckpointError(
      f"{source}: checkpoint does not match the configured encoder: " + ", ".join(diff)
    )
  return config


def safetensors_files(directory: Path, stem: str = "model", variant: Optional[str] = None):
  """tensor name -> file of a safetensors checkpoint in `directory`, as transformers and diffusers
  save them: `<stem>.safetensors`, a sharded `<stem>.safetensors.index.json`, or a variant
  (`<stem>.<variant>.safetensors`, `<stem>.safetensors.index.<variant>.json`, e.g. fp16).

  Args:
    directory: the folder.
    stem: 'model' (transformers) or 'diffusion_pytorch_model' (diffusers).
    variant: which variant to read; None: the plain files, else the only variant there is.

  Returns:
    {tensor name: path of the file holding it}.

  Raises:
    CheckpointError: no safetensors (pickles are never read), or several variants and none chosen.
  """
  from safetensors import safe_open

  directory = Path(directory)
  suffix = "" if variant is None else f".{variant}"
  index = directory / f"{stem}.safetensors.index{suffix}.json"
  single = directory / f"{stem}{suffix}.safetensors"
  if variant is None and not index.is_file() and not single.is_file():
    found = sorted(
      {
        p.name[len(f"{stem}.safetensors.index.") : -len(".json")]
        for p in directory.glob(f"{stem}.safetensors.index.*.json")
      }
      | {
        p.name[len(stem) + 1 : -len(".safetensors")]
        for p in directory.glob(f"{stem}.*.safetensors")
        if "-of-" not in p.name
      }
    )
    if len(found) > 1:
      raise CheckpointError(
        f"{directory}: several weight variants ({', '.join(found)}); choose one (variant=...)"
      )
    if found:
      return safetensors_files(directory, stem, found[0])
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: directory / fname for name, fname in weight_map.items()}
  if single.is_file():
    with safe_open(str(single), framework="numpy") as f:
      return {name: single for name in f.keys()}
  if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.ckpt")):
    raise CheckpointError(
      f"{directory}: only PyTorch pickle weights found; they are never loaded here. "
      "Convert them to safetensors (save_pretrained(safe_serialization=True))"
    )
  raise CheckpointError(f"{directory}: no {single.name} or {index.name}")


def read_safetensor(file: Path, name: str) -> np.ndarray:
  """One tensor as NumPy; bfloat16 tensors are read through the flax (JAX) backend on the host
  CPU."""
  from safetensors import safe_open

  try:
    with safe_open(str(file), framework="numpy") as f:
      return f.get_tensor(name)
  except TypeError:
    import jax

    with jax.default_device(jax.devices("cpu")[0]), safe_open(str(file), framework="flax") as f:
      return np.asarray(f.get_tensor(name))


def load_hf(directory, config: Optional[T5Config] = None) -> Tuple[T5Config, dict]:
  """Loads a Hugging Face T5EncoderModel / T5ForConditionalGeneration safetensors directory.

  Returns (config, params) with params a nested dict of NumPy arrays in `config.param_dtype`.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: not a directory")
  cfg_file = directory / "config.json"
  if cfg_file.is_file():
    overrides = (
      {}
      if config is None
      else dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat)
    )
    config = _check_config(
      config_from_hf(json.loads(cfg_file.read_text()), **overrides), config, str(directory)
    )
  elif config is None:
    raise CheckpointError(f"{directory}: no config.json, and no encoder config given")
  files = safetensors_files(directory)
  flat = {}
  for path, shape in expected_shapes(config).items():
    names, transpose = hf_names(path)
    name = next((n for n in names if n in files), None)
    if name is None:
      raise CheckpointError(f"{directory}: missing tensor {names[0]} (for {path})")
    value = read_safetensor(files[name], name)
    value = value.T if transpose else value
    _check(path, value, shape, f"{directory} [{name}]")
    flat[path] = _as_param(value, config.param_dtype)
  return config, unflatten(flat)


# --------------------------------------------------------------------------------------------- T5X


def _find_t5x_dir(path: Path) -> Path:
  """A `checkpoint_<step>` directory: the path itself, or the highest step under it."""
  if (
    (path / "checkpoint").exists()
    or (path / "_CHECKPOINT_METADATA").exists()
    or (path / "_METADATA").exists()
  ):
    return path
  steps = sorted(
    (int(m.group(1)), p)
    for p in path.glob("checkpoint_*")
    if (m := re.fullmatch(r"checkpoint_(\d+)", p.name))
  )
  if not steps:
    raise CheckpointError(
      f"{path}: not a T5X checkpoint (no 'checkpoint' file and no checkpoint_<step> directories)"
    )
  return steps[-1][1]


def _is_ts_spec(x) -> bool:
  return isinstance(x, dict) and "driver" in x and ("kvstore" in x or "path" in x)


def _read_tensorstore(spec: dict, ckpt_dir: Path) -> np.ndarray:
  """Reads an array that T5X wrote to its own TensorStore, its path relative to the checkpoint
  dir."""
  import tensorstore as ts

  spec = json.loads(json.dumps(spec))  # a deep copy of plain JSON
  kv = spec.get("kvstore")
  if isinstance(kv, dict):
    rel = kv.get("path", "")
    spec["kvstore"] = {"driver": "file", "path": str(ckpt_dir / rel)}
  else:
    spec["kvstore"] = {"driver": "file", "path": str(ckpt_dir / spec.pop("path"))}
  try:
    arr = ts.open(spec, open=True).result().read().result()
  except Exception as e:  # tensorstore raises ValueError / RuntimeError subclasses
    raise CheckpointError(
      f"{ckpt_dir}: cannot read tensorstore array {spec['kvstore']['path']}: {e}"
    ) from None
  return np.asarray(arr)


def _t5x_target(tree) -> dict:
  if "optimizer" in tree and isinstance(tree["optimizer"], dict) and "target" in tree["optimizer"]:
    return tree["optimizer"]["target"]
  if "target" in tree:
    return tree["target"]
  if "params" in tree:
    return tree["params"]
  raise CheckpointError("T5X checkpoint has no optimizer/target (or target, params) tree")


def load_t5x(path, config: T5Config) -> Tuple[T5Config, dict]:
  """Loads the encoder from a T5X checkpoint: msgpack + TensorStore (classic) or orbax (newer).

  `path` is a `checkpoint_<step>` directory or the directory holding them (the latest is used).
  Only the encoder's parameters are read; the decoder is ignored.
  """
  ckpt_dir = _find_t5x_dir(Path(path))
  msgpack_file = ckpt_dir / "checkpoint"
  if msgpack_file.is_file():
    from flax import serialization

    try:
      tree = serialization.msgpack_restore(msgpack_file.read_bytes())
    except Exception as e:
      raise CheckpointError(f"{msgpack_file}: not a readable msgpack checkpoint: {e}") from None
    target = flatten(_t5x_target(tree), is_leaf=_is_ts_spec)
    read = lambda v: _read_tensorstore(v, ckpt_dir) if _is_ts_spec(v) else np.asarray(v)
    source = str(msgpack_file)
  else:
    target = flatten(_t5x_target(_restore_orbax(ckpt_dir)))
    read = np.asarray
    source = str(ckpt_dir)
  flat = {}
  for p, shape in expected_shapes(config).items():
    if p not in target:
      raise CheckpointError(f"{source}: missing tensor {p}")
    value = read(target[p])
    if value.dtype == np.uint16:  # T5X checkpoint versions < 3 stored bfloat16 as uint16
      value = value.view(jnp.bfloat16)
    _check(p, value, shape, source)
    flat[p] = _as_param(value, config.param_dtype)
  return config, unflatten(flat)


def _restore_orbax(directory: Path):
  import orbax.checkpoint as ocp

  try:
    return ocp.PyTreeCheckpointer().restore(str(directory))
  except Exception as e:
    raise CheckpointError(f"{directory}: not a readable orbax checkpoint: {e}") from None


# ----------------------------------------------------------------------------------- our own format


def save_params(directory, config: T5Config, params) -> None:
  """Writes an orbax checkpoint (params under 'params') plus `t5_config.json` for fast loading."""
  import dataclasses

  import orbax.checkpoint as ocp

  directory = Path(directory).resolve()
  if directory.exists() and any(directory.iterdir()):
    raise CheckpointError(f"{directory}: exists and is not empty")
  directory.mkdir(parents=True, exist_ok=True)
  ocp.PyTreeCheckpointer().save(str(directory / "params"), {"params": params})
  (directory / "t5_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))


def load_params(directory, config: Optional[T5Config] = None) -> Tuple[T5Config, dict]:
  """Reads what `save_params` wrote, checking every tensor against the config."""
  directory = Path(directory).resolve()
  cfg_file = directory / "t5_config.json"
  if not cfg_file.is_file():
    raise CheckpointError(
      f"{directory}: no t5_config.json (not written by `imagen-jax t5 convert`)"
    )
  found = T5Config(**json.loads(cfg_file.read_text()))
  config = _check_config(found, config, str(directory))
  tree = _restore_orbax(directory / "params")["params"]
  flat = flatten(tree)
  out = {}
  for p, shape in expected_shapes(config).items():
    if p not in flat:
      raise CheckpointError(f"{directory}: missing tensor {p}")
    value = np.asarray(flat[p])
    _check(p, value, shape, str(directory))
    out[p] = _as_param(value, config.param_dtype)
  return config, unflatten(out)


def load_any(path, config: Optional[T5Config] = None) -> Tuple[T5Config, dict]:
  """Detects the format: ours (t5_config.json), Hugging Face (config.json / safetensors) or T5X."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such checkpoint")
  if (path / "t5_config.json").is_file():
    return load_params(path, config)
  if (
    (path / "config.json").is_file() or (path / HF_WEIGHTS).is_file() or (path / HF_INDEX).is_file()
  ):
    return load_hf(path, config)
  if config is None:
    raise CheckpointError(f"{path}: a T5X checkpoint needs the encoder size (size)")
  return load_t5x(path, config)


def convert(
  src, dst, *, size: Optional[str] = None, param_dtype: str = "float32"
) -> Tuple[T5Config, int, int]:
  """A Hugging Face / T5X / our checkpoint -> our orbax checkpoint in `param_dtype`.

  Args:
    src: the checkpoint to read (`load_any`).
    dst: the new output folder.
    size: the encoder size (required for T5X; checked against a Hugging Face config.json).
    param_dtype: 'float32' or 'bfloat16'.

  Returns:
    (the saved config, parameter count, bytes).
  """
  import dataclasses

  from imagen_jax.text import t5

  config = None if size is None else t5.t5_config(size, param_dtype=param_dtype)
  config, params = load_any(src, config)
  if config.param_dtype != param_dtype:
    config = dataclasses.replace(config, param_dtype=param_dtype)
    params = cast_params(params, param_dtype)
  save_params(dst, config, params)
  arrays = flatten(params).values()
  return config, sum(v.size for v in arrays), sum(v.nbytes for v in arrays)
