"""DeepFloyd IF's pixel U-Net (IF-I base, IF-II super-resolution) as a Flax module family.

It computes what diffusers' `UNet2DConditionModel` computes for the IF configurations: residual
down/up blocks that resample inside a ResNet block (`ResnetDownsampleBlock2D`,
`ResnetUpsampleBlock2D`), levels whose every ResNet block is followed by attention in which the
projected text keys/values are prepended to the image's own (`SimpleCrossAttn*Block2D`,
`UNetMidBlock2DSimpleCrossAttn`, `AttnAddedKVProcessor`), scale-shift ResNet blocks, GELU, the
text projection (`encoder_hid_dim_type='text_proj'`), attention-pooled text added to the time
embedding (`addition_embed_type='text'`), the 6-channel output (eps and the learned-range variance
fraction) and, for IF-II, the low-res image concatenated to z and its noise level embedded like a
timestep (`class_embed_type='timestep'`). IF attends to all text positions, padding included:
the text mask is ignored, as IF does.

It is not the paper's Efficient U-Net. Parameters are named after diffusers' modules
(`down_blocks_0/resnets_1/conv1`, ...) so that `imagen_jax.models.if_convert` maps a diffusers
checkpoint onto them one tensor at a time. The network is called like the project's other
networks, `model(z, log_snr, cond, deterministic)`, and returns the 6 channels; log-SNR is mapped to
IF's discrete timestep through the 1000-step cosine schedule it was trained with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from imagen_jax.batch_keys import LOWRES, LOWRES_AUG_LEVEL, TEXT_EMB
from imagen_jax.errors import ConfigError
from imagen_jax.models import layers

DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DSimpleCrossAttn",)
ACTIVATIONS = {
  "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch.nn.GELU(): the exact erf form
  "silu": nn.silu,
  "swish": nn.silu,
  "relu": nn.relu,
}


def _per_level(value, n: int, name: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ConfigError(f"IFUNetConfig.{name} has {len(value)} entries for {n} levels")
    return tuple(value)
  return (value,) * n


@gin.configurable
@dataclasses.dataclass(frozen=True)
class IFUNetConfig:
  """The IF U-Net's configuration: diffusers' config.json fields under their own names, plus the
  project's (image_size, in_channels = the image's channels, lowres_size for IF-II, dtype, remat).

  `imagen_jax.models.if_convert.config_from_diffusers` builds one from a diffusers config.json.
  """

  image_size: int = 64
  in_channels: int = 3  # channels of z (IF-II's network input adds the low-res image's)
  out_channels: int = 6  # eps and the learned-range variance fraction
  block_out_channels: Tuple[int, ...] = (512, 1024, 1536, 2048)
  layers_per_block: Union[int, Tuple[int, ...]] = 3
  down_block_types: Tuple[str, ...] = (
    "ResnetDownsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
  )
  up_block_types: Tuple[str, ...] = (
    "SimpleCrossAttnUpBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "ResnetUpsampleBlock2D",
  )
  mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn"
  attention_head_dim: Union[int, Tuple[int, ...]] = 64
  cross_attention_dim: int = 4096
  encoder_hid_dim: Optional[int] = 4096  # the T5 width; None: the text enters unprojected
  addition_embed_type_num_heads: int = 64
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  act_fn: str = "gelu"
  resnet_time_scale_shift: str = "scale_shift"
  time_embedding_dim: Optional[int] = None  # default 4 * block_out_channels[0]
  time_embedding_act_fn: Optional[str] = None
  class_embed_type: Optional[str] = None  # 'timestep': IF-II's noise-level embedding
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  mid_block_scale_factor: float = 1.0
  only_cross_attention: Union[bool, Tuple[bool, ...]] = False
  mid_block_only_cross_attention: Optional[bool] = None
  cross_attention_norm: Optional[str] = "group_norm"
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  dropout: float = 0.0
  num_train_timesteps: int = 1000  # the discrete cosine schedule IF was trained with
  max_text_length: int = 77
  lowres_size: Optional[int] = None  # IF-II: the low-res image's size (64)
  dtype: str = "float32"  # compute dtype; parameters float32
  remat: str = "none"
  attention_impl: Optional[str] = None
  scan_layers: bool = False  # not supported for the IF U-Net (its blocks are unrolled)

  def __post_init__(self):
    n = len(self.block_out_channels)
    for name in ("block_out_channels", "down_block_types", "up_block_types"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("layers_per_block", "attention_head_dim", "only_cross_attention"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
      _per_level(value, n, name)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ConfigError(
        f"IFUNetConfig needs one down and one up block type per level ({n}), got "
        f"{len(self.down_block_types)} and {len(self.up_block_types)}"
      )
    for kind, names, known in (
      ("down", self.down_block_types, DOWN_BLOCKS),
      ("up", self.up_block_types, UP_BLOCKS),
      ("mid", (self.mid_block_type,), MID_BLOCKS),
    ):
      for b in names:
        if b not in known:
          raise ConfigError(f"unsupported {kind} block type {b!r}; the IF U-Net has {known}")
    for name in ("act_fn", "time_embedding_act_fn"):
      act = getattr(self, name)
      if act is not None and act not in ACTIVATIONS:
        raise ConfigError(f"unsupported {name} {act!r}; expected one of {sorted(ACTIVATIONS)}")
    if self.resnet_time_scale_shift not in ("default", "scale_shift"):
      raise ConfigError(f"unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}")
    if self.class_embed_type not in (None, "timestep"):
      raise ConfigError(f"unsupported class_embed_type {self.class_embed_type!r}")
    if self.cross_attention_norm not in (None, "group_norm", "layer_norm"):
      raise ConfigError(f"unsupported cross_attention_norm {self.cross_attention_norm!r}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ConfigError(f"{c} channels do not split into {self.norm_num_groups} groups")
    if self.image_size % 2 ** (n - 1):
      raise ConfigError(f"image_size {self.image_size} must be divisible by 2^(levels - 1)")
    if self.scan_layers:
      raise ConfigError("scan_layers is not supported by the IF U-Net")
    layers.check_remat(self.remat)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def text_embed_dim(self) -> int:
    """The width of the text embeddings the network takes (T5-XXL's 4096 for IF)."""
    return self.encoder_hid_dim or self.cross_attention_dim

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def levels(self):
    """Per level: (block type down, layers, head dim, only_cross_attention)."""
    n = len(self.block_out_channels)
    return list(
      zip(
        self.down_block_types,
        _per_level(self.layers_per_block, n, "layers_per_block"),
        _per_level(self.attention_head_dim, n, "attention_head_dim"),
        _per_level(self.only_cross_attention, n, "only_cross_attention"),
      )
    )


def timestep_from_log_snr(log_snr, num_timesteps: int = 1000):
  """IF's (fractional) discrete timestep at a log-SNR of its cosine schedule: step n (0-based) has
  alpha_bar after n + 1 steps, i.e. sits at t = (n + 1) / N of `DiscreteCosineSchedule`, so
  n = N t - 1 with t the schedule's inverse (exact at the steps)."""
  from imagen_jax.diffusion.schedules import DiscreteCosineSchedule

  schedule = DiscreteCosineSchedule(num_timesteps=num_timesteps)
  return schedule.time_from_log_snr(log_snr) * num_timesteps - 1.0


def _timestep_features(cfg: IFUNetConfig, timesteps):
  """diffusers' `get_timestep_embedding` of IF's raw (discrete) timesteps: width
  block_out_channels[0], frequencies 10000^(-i / (width/2 - freq_shift))."""
  return layers.sinusoidal_embedding(
    timesteps,
    cfg.block_out_channels[0],
    scale=1.0,
    freq_shift=cfg.freq_shift,
    flip_sin_to_cos=cfg.flip_sin_to_cos,
  )


def _group_norm(groups: int, eps: float, dtype, name: str):
  """torch.nn.GroupNorm as IF uses it: exact groups and eps, the two-pass variance."""
  return layers.GroupNorm(groups, dtype, eps, two_pass=True, name=name)


def _layer_norm(dtype, name: str):
  """torch.nn.LayerNorm (eps 1e-5) with the two-pass variance."""
  return layers.LayerNorm(dtype, two_pass=True, name=name)


class TimestepMLP(nn.Module):
  """diffusers' `TimestepEmbedding`: linear_1 -> act -> linear_2."""

  features: int
  act_fn: str
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.Dense(self.features, ("embed", "mlp"), self.dtype, name="linear_1")(x)
    h = ACTIVATIONS[self.act_fn](h)
    return layers.Dense(self.features, ("mlp", "embed"), self.dtype, name="linear_2")(h)


class AttentionPooling(nn.Module):
  """diffusers' `AttentionPooling`: one query, the mean token plus a learned position embedding,
  attending to that token and every text token (no mask, no output projection)."""

  num_heads: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    if d % self.num_heads:
      raise ConfigError(f"text width {d} does not split into {self.num_heads} pooling heads")
    dh = d // self.num_heads
    pos = self.param(
      "positional_embedding",
      layers._init(nn.initializers.normal(d**-0.5), (None, "text_embed")),
      (1, d),
      jnp.float32,
    )
    cls = jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True) + pos
    tokens = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
    proj = lambda name: layers.HeadsProjection(
      self.num_heads, dh, ("text_embed", "heads", "kv"), self.dtype, use_bias=True, name=name
    )
    q = proj("q_proj")(cls.astype(self.dtype))
    k, v = proj("k_proj")(tokens), proj("v_proj")(tokens)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    weights = jax.nn.softmax(logits / math.sqrt(dh), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(jnp.float32)).reshape(b, d)


class TextTimeEmbedding(nn.Module):
  """diffusers' `TextTimeEmbedding`: LayerNorm -> attention pooling -> linear -> LayerNorm."""

  features: int
  num_heads: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, text):
    x = _layer_norm(self.dtype, name="norm1")(text)
    pooled = AttentionPooling(self.num_heads, self.dtype, name="pool")(x)
    h = layers.Dense(self.features, ("text_embed", "embed"), self.dtype, name="proj")(
      pooled.astype(self.dtype)
    )
    return _layer_norm(self.dtype, name="norm2")(h)


class IFResnetBlock(nn.Module):
  """diffusers' `ResnetBlock2D` as IF configures it: GN -> act -> [resample] -> conv3x3 ->
  GN (* (1 + scale) + shift | + temb) -> act -> dropout -> conv3x3, plus the (resampled, 1x1
  projected when the width changes) input, divided by output_scale_factor. Resampling is 2x2
  average pooling ('down') or 2x nearest ('up') inside the block."""

  features: int
  groups: int
  eps: float
  act_fn: str
  time_scale_shift: str = "scale_shift"
  skip_time_act: bool = False
  output_scale_factor: float = 1.0
  resample: Optional[str] = None
  dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, deterministic: bool = True):
    act = ACTIVATIONS[self.act_fn]
    h = act(_group_norm(self.groups, self.eps, self.dtype, name="norm1")(x))
    if self.resample == "down":
      h, x = layers.downsample(h), layers.downsample(x)
    elif self.resample == "up":
      h, x = layers.upsample(h), layers.upsample(x)
    h = layers.Conv(self.features, 3, dtype=self.dtype, name="conv1")(h)
    t = temb if self.skip_time_act else act(temb)
    width = 2 * self.features if self.time_scale_shift == "scale_shift" else self.features
    t = layers.Dense(width, ("embed", "conv_out"), self.dtype, name="time_emb_proj")(t)
    t = t[:, None, None, :].astype(jnp.float32)
    if self.time_scale_shift == "scale_shift":
      scale, shift = jnp.split(t, 2, axis=-1)
      h = _group_norm(self.groups, self.eps, jnp.float32, name="norm2")(h)
      h = h * (1.0 + scale) + shift
    else:
      h = _group_norm(self.groups, self.eps, jnp.float32, name="norm2")(h.astype(jnp.float32) + t)
    h = act(h.astype(self.dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = layers.Conv(self.features, 3, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = layers.Conv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(x)
    out = x.astype(self.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / jnp.asarray(self.output_scale_factor, out.dtype)
    return layers.constrain_image(out)


class AddedKVAttention(nn.Module):
  """diffusers' `Attention` with `AttnAddedKVProcessor`: GroupNorm on the image tokens; the text
  (normed by `cross_attention_norm`) projected to extra keys/values placed before the image's own
  (or alone, with only_cross_attention); no mask; output projection plus the residual."""

  head_dim: int
  groups: int
  cross_attention_norm: Optional[str] = "group_norm"
  only_cross_attention: bool = False
  dtype: layers.Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x, text):
    b, hgt, wid, c = x.shape
    if c % self.head_dim:
      raise ConfigError(f"{c} channels do not split into heads of {self.head_dim}")
    heads = c // self.head_dim
    if self.cross_attention_norm == "group_norm":
      text = _group_norm(self.groups, 1e-5, self.dtype, name="norm_cross")(text)
    elif self.cross_attention_norm == "layer_norm":
      text = _layer_norm(self.dtype, name="norm_cross")(text)
    h = _group_norm(self.groups, 1e-5, self.dtype, name="group_norm")(x).reshape(b, hgt * wid, c)
    proj = lambda name: layers.HeadsProjection(
      heads, self.head_dim, dtype=self.dtype, use_bias=True, name=name
    )
    q = proj("to_q")(h)
    k, v = proj("add_k_proj")(text), proj("add_v_proj")(text)
    if not self.only_cross_attention:
      k = jnp.concatenate([k, proj("to_k")(h)], axis=1)
      v = jnp.concatenate([v, proj("to_v")(h)], axis=1)
    q = nn.with_logical_constraint(
      q, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    )
    mask = jnp.ones((b, k.shape[1]), bool)
    out = layers.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.attention_impl)
    out = layers.HeadsOutput(c, dtype=self.dtype, name="to_out_0")(out)
    return layers.constrain_image(x + out.reshape(b, hgt, wid, c).astype(x.dtype))


class IFBlock(nn.Module):
  """One level of the IF U-Net, named as diffusers names its children: `resnets_j` (each followed
  by `attentions_j` in a SimpleCrossAttn block), then `downsamplers_0` / `upsamplers_0` (a
  resampling ResNet block). On the way up each ResNet block first takes the last of `skips`
  (concatenated after the activation). The mid block (mid=True) is ResNet, attention, ResNet
  with mid_block_scale_factor. Returns (h, the activations the level leaves as skips)."""

  config: IFUNetConfig
  features: int
  num_layers: int
  attention: bool
  head_dim: int
  only_cross_attention: bool
  resample: Optional[str]
  mid: bool = False

  @nn.compact
  def __call__(self, h, emb, text, deterministic: bool = True, skips=None):
    cfg = self.config
    dt = cfg.compute_dtype
    res_cls = layers.maybe_remat(IFResnetBlock, cfg.remat, static_argnums=(3,))
    attn_cls = layers.maybe_remat(AddedKVAttention, cfg.remat)
    scale = cfg.mid_block_scale_factor if self.mid else cfg.resnet_out_scale_factor

    def res(name, resample=None):
      return res_cls(
        self.features,
        cfg.norm_num_groups,
        cfg.norm_eps,
        cfg.act_fn,
        cfg.resnet_time_scale_shift,
        cfg.resnet_skip_time_act,
        scale,
        resample,
        cfg.dropout,
        dt,
        name=name,
      )

    def attn(name):
      return attn_cls(
        self.head_dim,
        cfg.norm_num_groups,
        cfg.cross_attention_norm,
        self.only_cross_attention,
        dt,
        cfg.attention_impl,
        name=name,
      )

    outs = []
    if self.mid:
      h = res("resnets_0")(h, emb, deterministic)
      h = attn("attentions_0")(h, text)
      return res("resnets_1")(h, emb, deterministic), outs
    skips = list(skips) if skips is not None else None
    for j in range(self.num_layers):
      if skips is not None:
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = res(f"resnets_{j}")(h, emb, deterministic)
      if self.attention:
        h = attn(f"attentions_{j}")(h, text)
      outs.append(h)
    if self.resample is not None:
      name = "downsamplers_0" if self.resample == "down" else "upsamplers_0"
      h = res(name, self.resample)(h, emb, deterministic)
      outs.append(h)
    return h, outs


class IFUNet(nn.Module):
  """model(z, log_snr, cond, deterministic=True) -> (B, H, W, out_channels) float32.

  `timesteps` / `noise_level` (IF's discrete values, float) replace the ones derived from log_snr
  and cond[LOWRES_AUG_LEVEL] when given (the reference tests call the network as diffusers does).
  IF-II takes cond[LOWRES] at the output size (upsampled; `augmentation.upsample` with aligned
  corners, as IF does) or at lowres_size (then upsampled here the same way).
  """

  config: IFUNetConfig

  @nn.compact
  def __call__(
    self, z, log_snr, cond, deterministic: bool = True, timesteps=None, noise_level=None
  ):
    cfg = self.config
    dt = cfg.compute_dtype
    act = ACTIVATIONS[cfg.act_fn]
    n_levels = len(cfg.block_out_channels)
    if timesteps is None:
      timesteps = timestep_from_log_snr(log_snr, cfg.num_train_timesteps)
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (z.shape[0],))
    x = z.astype(jnp.float32)
    if cfg.lowres_size is not None:
      from imagen_jax.diffusion.augmentation import upsample

      lowres = upsample(cond[LOWRES], z.shape[1], align_corners=True)
      x = jnp.concatenate([x, lowres], axis=-1)
      if noise_level is None:
        noise_level = cond[LOWRES_AUG_LEVEL] * cfg.num_train_timesteps - 1.0
    text = layers.constrain_tokens(cond[TEXT_EMB].astype(jnp.float32))

    emb = TimestepMLP(cfg.time_embed_dim, cfg.act_fn, dt, name="time_embedding")(
      _timestep_features(cfg, timesteps).astype(dt)
    )
    if cfg.class_embed_type == "timestep":
      if noise_level is None:
        raise ConfigError("class_embed_type='timestep' needs a noise level (IF-II)")
      level = jnp.broadcast_to(jnp.asarray(noise_level, jnp.float32), (z.shape[0],))
      emb = emb + TimestepMLP(cfg.time_embed_dim, cfg.act_fn, dt, name="class_embedding")(
        _timestep_features(cfg, level).astype(dt)
      )
    emb = emb + TextTimeEmbedding(
      cfg.time_embed_dim, cfg.addition_embed_type_num_heads, dt, name="add_embedding"
    )(text.astype(dt))
    if cfg.time_embedding_act_fn is not None:
      emb = ACTIVATIONS[cfg.time_embedding_act_fn](emb)
    if cfg.encoder_hid_dim is not None:
      text = layers.Dense(
        cfg.cross_attention_dim, ("text_embed", "embed"), dt, name="encoder_hid_proj"
      )(text.astype(dt))
    text = layers.constrain_tokens(text.astype(dt))

    levels = cfg.levels()
    h = layers.constrain_image(
      layers.Conv(cfg.block_out_channels[0], 3, dtype=dt, name="conv_in")(x.astype(dt))
    )
    skips = [h]
    for i, (kind, n_layers, head_dim, only_cross) in enumerate(levels):
      h, outs = IFBlock(
        cfg,
        cfg.block_out_channels[i],
        n_layers,
        kind.startswith("SimpleCrossAttn"),
        head_dim,
        only_cross,
        "down" if i < n_levels - 1 else None,
        name=f"down_blocks_{i}",
      )(h, emb, text, deterministic)
      skips.extend(outs)

    mid_only = cfg.mid_block_only_cross_attention
    if mid_only is None:
      mid_only = cfg.only_cross_attention if isinstance(cfg.only_cross_attention, bool) else False
    h, _ = IFBlock(
      cfg,
      cfg.block_out_channels[-1],
      1,
      True,
      levels[-1][2],
      mid_only,
      None,
      mid=True,
      name="mid_block",
    )(h, emb, text, deterministic)

    for i, kind in enumerate(cfg.up_block_types):
      level = n_levels - 1 - i
      _, n_layers, head_dim, only_cross = levels[level]
      n_skips = n_layers + 1
      block_skips, skips = skips[-n_skips:], skips[:-n_skips]
      h, _ = IFBlock(
        cfg,
        cfg.block_out_channels[level],
        n_skips,
        kind.startswith("SimpleCrossAttn"),
        head_dim,
        only_cross,
        "up" if i < n_levels - 1 else None,
        name=f"up_blocks_{i}",
      )(h, emb, text, deterministic, block_skips)

    h = act(_group_norm(cfg.norm_num_groups, cfg.norm_eps, dt, name="conv_norm_out")(h))
    out = layers.Conv(cfg.out_channels, 3, dtype=dt, name="conv_out")(h)
    return out.astype(jnp.float32)
