"""CLIP image and text encoders in Flax, loading Hugging Face CLIP checkpoints (safetensors), with
CLIP's own preprocessing and tokenizer, and the CLIP score.

A checkpoint is a folder as `CLIPModel.save_pretrained` writes it (or as downloaded from the Hub,
e.g. openai/clip-vit-base-patch32 or openai/clip-vit-large-patch14): config.json, model.safetensors,
tokenizer.json (the BPE tokenizer, read with the `tokenizers` library) and optionally
preprocessor_config.json. Nothing else is read, and never a pickle.

- Text: token + position embeddings, pre-LN transformer layers with causal (and padding) masks,
  final layer norm, the state at the end-of-text token (the first `eos_token_id`, or the largest id
  for old configs whose eos_token_id is 2, as transformers does), then `text_projection`.
- Image: the shortest side resized to the model's size with PIL's bicubic filter, centre crop,
  scaled to [0, 1] and normalised with CLIP's mean and std; patch embedding, class token, position
  embeddings, pre-LN, transformer, post-LN of the class token, `visual_projection`.
- CLIP score (per image and prompt) = 100 * max(cos(image embedding, text embedding), 0);
  `clip_score` averages it over pairs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HIGHEST = jax.lax.Precision.HIGHEST


class ClipError(UserError):
  """A missing or malformed CLIP checkpoint, or bad input: one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  num_hidden_layers: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  text: TowerConfig
  vision: TowerConfig
  projection_dim: int
  vocab_size: int
  max_position_embeddings: int
  eos_token_id: int
  image_size: int
  patch_size: int
  num_channels: int = 3

  @staticmethod
  def from_hf(cfg: dict) -> "ClipConfig":
    try:
      t, v = cfg["text_config"], cfg["vision_config"]

      def tower(c):
        return TowerConfig(
          c["hidden_size"],
          c["intermediate_size"],
          c["num_attention_heads"],
          c["num_hidden_layers"],
          c.get("hidden_act", "quick_gelu"),
          c.get("layer_norm_eps", 1e-5),
        )

      return ClipConfig(
        text=tower(t),
        vision=tower(v),
        projection_dim=cfg.get("projection_dim", 512),
        vocab_size=t["vocab_size"],
        max_position_embeddings=t.get("max_position_embeddings", 77),
        eos_token_id=t.get("eos_token_id", 2),
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        num_channels=v.get("num_channels", 3),
      )
    except KeyError as e:
      raise ClipError(f"config.json is not a CLIP config (missing {e})") from None


def _act(name: str, x):
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return jax.nn.gelu(x, approximate=True)
  raise ClipError(f"unsupported CLIP activation {name!r}")


class _Dense(nn.Module):
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, use_bias=self.use_bias, precision=HIGHEST, name="linear")(x)


class Attention(nn.Module):
  config: TowerConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    b, n, d = x.shape
    h = c.num_attention_heads
    hd = d // h
    q = _Dense(d, name="q_proj")(x) * hd**-0.5
    k = _Dense(d, name="k_proj")(x)
    v = _Dense(d, name="v_proj")(x)
    q, k, v = (t.reshape(b, n, h, hd) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST)
    if bias is not None:
      logits = logits + bias
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, v, precision=HIGHEST).reshape(b, n, d)
    return _Dense(d, name="out_proj")(out)


class ClipEncoderLayer(nn.Module):
  config: TowerConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    x = x + Attention(c, name="self_attn")(
      nn.LayerNorm(c.layer_norm_eps, name="layer_norm1")(x), bias
    )
    y = nn.LayerNorm(c.layer_norm_eps, name="layer_norm2")(x)
    y = _Dense(c.intermediate_size, name="fc1")(y)
    y = _Dense(c.hidden_size, name="fc2")(_act(c.hidden_act, y))
    return x + y


class Encoder(nn.Module):
  config: TowerConfig

  @nn.compact
  def __call__(self, x, bias):
    for i in range(self.config.num_hidden_layers):
      x = ClipEncoderLayer(self.config, name=f"layers_{i}")(x, bias)
    return x


class ClipTextEncoder(nn.Module):
  """input_ids, attention_mask (B, L) -> projected text embeddings (B, projection_dim)."""

  config: ClipConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    c = self.config
    n = input_ids.shape[1]
    x = nn.Embed(c.vocab_size, c.text.hidden_size, name="token_embedding")(input_ids)
    x = (
      x
      + nn.Embed(c.max_position_embeddings, c.text.hidden_size, name="position_embedding")(
        jnp.arange(n)
      )[None]
    )
    causal = jnp.tril(jnp.ones((n, n), bool))
    allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    x = Encoder(c.text, name="encoder")(x, bias)
    x = nn.LayerNorm(c.text.layer_norm_eps, name="final_layer_norm")(x)
    if c.eos_token_id == 2:  # old configs: the end-of-text token has the largest id
      pos = jnp.argmax(input_ids, axis=-1)
    else:
      pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    pooled = x[jnp.arange(x.shape[0]), pos]
    return _Dense(c.projection_dim, use_bias=False, name="text_projection")(pooled)


class VisionEncoder(nn.Module):
  """pixel values (B, S, S, 3), normalised -> projected image embeddings (B, projection_dim)."""

  config: ClipConfig

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    d = c.vision.hidden_size
    p = c.patch_size
    x = nn.Conv(
      d,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=False,
      precision=HIGHEST,
      name="patch_embedding",
    )(pixels)
    b = x.shape[0]
    x = x.reshape(b, -1, d)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    x = x + nn.Embed(x.shape[1], d, name="position_embedding")(jnp.arange(x.shape[1]))[None]
    x = nn.LayerNorm(c.vision.layer_norm_eps, name="pre_layrnorm")(x)
    x = Encoder(c.vision, name="encoder")(x, None)
    pooled = nn.LayerNorm(c.vision.layer_norm_eps, name="post_layernorm")(x[:, 0])
    return _Dense(c.projection_dim, use_bias=False, name="visual_projection")(pooled)


# ------------------------------------------------------------------------------------------ loading


def _hf_to_tree(state: Dict[str, np.ndarray], prefix: str, extra: Dict[str, str]) -> Dict:
  """HF names under `prefix` (plus the top-level names in `extra`: name -> our module) -> our
  Flax tree."""
  from flax import traverse_util

  flat: Dict[Tuple[str, ...], np.ndarray] = {}

  def put(path: List[str], value):
    flat[tuple(path)] = value

  for name, value in state.items():
    if name in extra:
      parts = [extra[name], "linear", "kernel"]
      put(parts, np.ascontiguousarray(value.T))
      continue
    if not name.startswith(prefix):
      continue
    parts = name[len(prefix) :].split(".")
    parts = [p for p in parts if p != "embeddings"]
    if "layers" in parts:  # encoder.layers.3.x -> encoder.layers_3.x; mlp.fc1 -> fc1
      i = parts.index("layers")
      parts[i : i + 2] = [f"layers_{parts[i + 1]}"]
    parts = [p for p in parts if p != "mlp"]
    leaf = parts[-1]
    owner = parts[-2] if len(parts) > 1 else ""
    if parts == ["class_embedding"]:
      put(parts, value)
    elif owner in ("token_embedding", "position_embedding"):
      put(parts[:-1] + ["embedding"], value)
    elif owner == "patch_embedding":
      put(parts[:-1] + ["kernel"], np.ascontiguousarray(value.transpose(2, 3, 1, 0)))
    elif "norm" in owner or owner.endswith("layrnorm"):
      put(parts[:-1] + [{"weight": "scale", "bias": "bias"}[leaf]], value)
    elif leaf in ("weight", "bias"):
      put(
        parts[:-1] + ["linear", "kernel" if leaf == "weight" else "bias"],
        np.ascontiguousarray(value.T) if leaf == "weight" else value,
      )
    else:
      raise ClipError(f"unexpected tensor {name!r} in the CLIP checkpoint")
  return traverse_util.unflatten_dict(flat)


def _check(tree, abstract, what: str) -> None:
  want = {
    jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)
  }
  have = {
    jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    raise ClipError(
      f"CLIP {what}: {len(missing)} tensor(s) missing (e.g. {missing[:2]}), {len(extra)} "
      "unexpected "
      f"(e.g. {extra[:2]})"
    )
  for k, shape in want.items():
    if tuple(have[k]) != tuple(shape):
      raise ClipError(f"CLIP {what}: {k} has shape {tuple(have[k])}, expected {tuple(shape)}")


@dataclasses.dataclass
class Clip:
  config: ClipConfig
  text_params: Dict
  vision_params: Dict
  tokenizer: "ClipTokenizer"
  preprocess: "Preprocess"

  def __post_init__(self):
    self._text = jax.jit(
      lambda p, ids, m: ClipTextEncoder(self.config).apply({"params": p}, ids, m)
    )
    self._image = jax.jit(lambda p, x: VisionEncoder(self.config).apply({"params": p}, x))

  def text_embeddings(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(
      self._text(self.text_params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    )

  def image_embeddings(self, pixels: np.ndarray) -> np.ndarray:
    return np.asarray(self._image(self.vision_params, jnp.asarray(pixels, jnp.float32)))

  def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    def embed(chunk):
      ids, mask = self.tokenizer(list(chunk))
      return self.text_embeddings(ids, mask)

    return _batched(embed, list(texts), batch_size)

  def embed_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
    """images: uint8 (H, W, 3) arrays, or image files read one batch at a time (30k need not fit
    in memory)."""
    from imagen_jax import images as imio

    def pixels(im):
      return self.preprocess(imio.read_image(im) if isinstance(im, (str, Path)) else im)

    return _batched(
      lambda chunk: self.image_embeddings(np.stack([pixels(im) for im in chunk])),
      list(images),
      batch_size,
    )


def _batched(embed, items: list, batch_size: int) -> np.ndarray:
  """embed() over batches of at most `batch_size` items, one shape for all
  (`partitioning.pad_shard_unpad`)."""
  from imagen_jax import partitioning

  return partitioning.pad_shard_unpad(
    lambda rows: embed([items[r] for r in rows]), len(items), batch_size
  )


def load(directory) -> Clip:
  """A Hugging Face CLIP checkpoint folder (see the module doc)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  d = Path(directory)
  if not (d / "config.json").is_file():
    raise ClipError(
      f"{directory}: no config.json (a Hugging Face CLIP checkpoint folder is expected)"
    )
  config = ClipConfig.from_hf(json.loads((d / "config.json").read_text()))
  weights = d / "model.safetensors"
  if not weights.is_file():
    raise ClipError(
      f"{directory}: no model.safetensors (pickled pytorch_model.bin files are not read; save "
      "the model with safe_serialization=True)"
    )
  try:
    state = load_file(str(weights))
  except (SafetensorError, OSError, ValueError) as e:
    raise ClipError(f"{weights}: not a safetensors file ({e})") from None
  text = _hf_to_tree(state, "text_model.", {"text_projection.weight": "text_projection"})
  vision = _hf_to_tree(state, "vision_model.", {"visual_projection.weight": "visual_projection"})
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  _check(
    text,
    jax.eval_shape(lambda: ClipTextEncoder(config).init(jax.random.PRNGKey(0), ids, ids))["params"],
    "text",
  )
  px = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
  _check(
    vision,
    jax.eval_shape(lambda: VisionEncoder(config).init(jax.random.PRNGKey(0), px))["params"],
    "vision",
  )
  tokenizer = ClipTokenizer(d, config.max_position_embeddings)
  return Clip(
    config,
    jax.tree_util.tree_map(jnp.asarray, text),
    jax.tree_util.tree_map(jnp.asarray, vision),
    tokenizer,
    Preprocess.from_dir(d, config.image_size),
  )


# ------------------------------------------------------------------------------ tokenizer, pixels


class ClipTokenizer:
  """CLIP's BPE from the checkpoint's tokenizer.json: start and end tokens, truncation to the
  context length (the end token kept), padding with the pad token (CLIP's is the end token) and a
  mask."""

  def __init__(self, directory, context_length: int = 77):
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
      raise ClipError(
        f"{directory}: no tokenizer.json (CLIP's BPE tokenizer, as save_pretrained writes it)"
      )
    self.tok = HFTokenizer.from_file(str(path))
    self.context_length = context_length
    pad = None
    cfg = Path(directory) / "tokenizer_config.json"
    if cfg.is_file():
      pad = json.loads(cfg.read_text()).get("pad_token")
      pad = pad.get("content") if isinstance(pad, dict) else pad
    self.pad_id = self.tok.token_to_id(pad or "<|endoftext|>")
    if self.pad_id is None:
      raise ClipError(f"{directory}: the tokenizer has no pad token {pad or '<|endoftext|>'!r}")
    self.tok.enable_truncation(context_length)
    self.tok.no_padding()

  def __call__(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), self.context_length), np.int32)
    for i, enc in enumerate(self.tok.encode_batch(list(texts))):
      n = len(enc.ids)
      ids[i, :n] = enc.ids
      mask[i, :n] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class Preprocess:
  size: int
  crop: int
  mean: Tuple[float, float, float] = CLIP_MEAN
  std: Tuple[float, float, float] = CLIP_STD

  @staticmethod
  def from_dir(directory, image_size: int) -> "Preprocess":
    p = Path(directory) / "preprocessor_config.json"
    if not p.is_file():
      return Preprocess(image_size, image_size)
    cfg = json.loads(p.read_text())
    size = cfg.get("size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = cfg.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    return Preprocess(
      int(size),
      int(crop),
      tuple(cfg.get("image_mean", CLIP_MEAN)),
      tuple(cfg.get("image_std", CLIP_STD)),
    )

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (crop, crop, 3), normalised."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image, np.uint8))
    w, h = im.size
    s = self.size
    nw, nh = (s, max(1, int(s * h / w))) if w <= h else (max(1, int(s * w / h)), s)
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = int(round((nh - self.crop) / 2.0)), int(round((nw - self.crop) / 2.0))
    x = np.asarray(im, np.float32)[top : top + self.crop, left : left + self.crop] / 255.0
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
  """Per pair: 100 * max(cosine, 0)."""
  a = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
  b = text_emb / np.linalg.norm(text_emb, axis=-1, keepdims=True)
  return 100.0 * np.maximum((a * b).sum(-1), 0.0)


def clip_score(
  model: Clip,
  images: Sequence,
  prompts: Sequence[str],
  batch_size: int = 64,
) -> Tuple[float, np.ndarray]:
  """Mean CLIP score over (image, prompt) pairs, and the per-pair scores; images as in
  `Clip.embed_images`."""
  if len(images) != len(prompts):
    raise ClipError(f"{len(images)} images but {len(prompts)} prompts")
  scores = clip_scores(
    model.embed_images(images, batch_size), model.embed_texts(prompts, batch_size)
  )
  return float(scores.mean()), scores


def score_folder(
  samples, prompts_file, checkpoint, *, batch_size: int = 64, json_path=None
) -> dict:
  """CLIP score of a folder of images (sorted by name) against a prompts file.

  Args:
    samples: the image folder.
    prompts_file: one prompt per image, or per equal run of consecutive images.
    checkpoint: a Hugging Face CLIP folder.
    batch_size: images (and prompts) per call.
    json_path: write the result as JSON here.

  Returns:
    {'clip_score', 'pairs', 'images_per_prompt', 'per_prompt', 'checkpoint', 'samples',
    'pairs_per_second'}.
  """
  import time

  from imagen_jax import files
  from imagen_jax import images as imio

  paths = imio.image_files(samples)
  prompts = files.read_prompts(prompts_file)
  pairing = files.pair_prompts(len(paths), len(prompts), f"{samples}")
  pair_prompts = [prompts[k] for k in pairing]
  model = load(checkpoint)
  t0 = time.perf_counter()
  mean, scores = clip_score(
    model, paths, pair_prompts, batch_size=batch_size
  )  # images read batch by batch
  seconds = time.perf_counter() - t0
  per_prompt = {
    p: float(np.mean([s for s, q in zip(scores, pair_prompts) if q == p]))
    for p in dict.fromkeys(prompts)
  }
  result = {
    "clip_score": mean,
    "pairs": len(paths),
    "images_per_prompt": len(paths) // len(prompts),
    "per_prompt": per_prompt,
    "checkpoint": str(checkpoint),
    "samples": str(samples),
    "pairs_per_second": len(paths) / seconds,
  }
  if json_path:
    files.write_json(json_path, result)
  return result
