"""The Imagen base text-to-image U-Net (Improved-DDPM U-Net with BigGAN-style blocks and text).

Paper configuration (docs/paper.md §3): 64x64, width 512, channel_mult (1, 2, 3, 4), 3 residual
blocks per level, 64 channels per attention head, self-attention with text concatenated into the
keys/values at resolutions 32, 16, 8, attention-pooled text added to the timestep embedding,
dropout 0.

With `lowres_size` set the same U-Net is a super-resolution network (the paper's baseline for the
Efficient U-Net, docs/findings.md): the conditioning image, upsampled to the output size, is
concatenated to z and its augmentation level embedded and added to the conditioning embedding, as
the Efficient U-Net does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from imagen_jax.batch_keys import LOWRES, LOWRES_AUG_LEVEL
from imagen_jax.errors import ConfigError
from imagen_jax.models import layers


@gin.configurable
@dataclasses.dataclass(frozen=True)
class UNetConfig:
  image_size: int = 64
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int = 512
  channel_mult: Tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attention_resolutions: Tuple[int, ...] = (32, 16, 8)
  # The attention layers also attend to the text sequence (its keys/values concatenated to the
  # image's: the paper). False: the text reaches the network only as the attention-pooled vector
  # added to the time embedding (the paper's ablation, docs/findings.md).
  text_attention: bool = True
  head_dim: Optional[int] = 64
  num_heads: Optional[int] = None
  embed_mult: int = 4  # time/text embedding width = embed_mult * model_channels
  pool_heads: int = 8  # heads of the text attention pooling
  dropout: float = 0.0
  norm_groups: int = 32
  text_embed_dim: int = 4096  # T5-XXL
  text_dim: Optional[int] = None  # width the text is projected to once (default model_channels)
  max_text_length: int = 128
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat: str = "none"  # none | full | dots | dots_no_batch
  attention_impl: Optional[str] = None  # None (cuDNN where it applies) | 'xla' | 'cudnn'
  scan_layers: bool = False  # nn.scan over each level's repeated blocks (1 .. num_res_blocks-1)
  # Super-resolution: the training size of the conditioning image (None: a text-to-image base).
  lowres_size: Optional[int] = None
  lowres_resize: str = "bilinear"  # how the network upsamples the conditioning image
  lowres_skip: bool = False  # SR: add the conditioning image to the output (EfficientUNetConfig's)

  def __post_init__(self):
    for name in ("channel_mult", "attention_resolutions"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.image_size % 2 ** (len(self.channel_mult) - 1):
      raise ConfigError(f"image_size {self.image_size} must be divisible by 2^(levels - 1)")
    layers.check_remat(self.remat)
    if self.lowres_skip and self.lowres_size is None:
      raise ConfigError("lowres_skip needs a super-resolution U-Net (set lowres_size)")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def attention_levels(self):
    return {
      l
      for l in range(len(self.channel_mult))
      if self.image_size // 2**l in self.attention_resolutions
    }

  def scan_runs(self):
    """{scanned module name: [(residual block name, attention block name or None), ...]} of the
    unscanned layout it replaces. A level's blocks 1 .. num_res_blocks-1 have the same shapes on
    the way down and on the way up (block 0 changes width, the last up block takes the lower
    level's skip); empty when scan_layers is off."""
    if not self.scan_layers or self.num_res_blocks < 2:
      return {}
    attn = self.attention_levels()
    runs = {}
    for path in ("down", "up"):
      for level in range(len(self.channel_mult)):
        runs[f"{path}_{level}_layers"] = [
          (f"{path}_{level}_res_{i}", f"{path}_{level}_attn_{i}" if level in attn else None)
          for i in range(1, self.num_res_blocks)
        ]
    return runs


class UNet(nn.Module):
  """model(z, log_snr, cond, deterministic=True) -> prediction, float32, shape of z."""

  config: UNetConfig

  @nn.compact
  def __call__(self, z, log_snr, cond, deterministic: bool = True):
    cfg = self.config
    dt = cfg.compute_dtype
    ch = cfg.model_channels
    extra_levels, lowres = (), None
    if cfg.lowres_size is not None:
      b, hgt, wid, _ = z.shape
      lowres = cond[LOWRES].astype(jnp.float32)
      if lowres.shape[1:3] != (hgt, wid):  # noise-augmented at the input size: upsample here
        lowres = jax.image.resize(lowres, (b, hgt, wid, lowres.shape[-1]), cfg.lowres_resize)
      z = jnp.concatenate([z, lowres.astype(z.dtype)], axis=-1)
      extra_levels = (cond[LOWRES_AUG_LEVEL],)
    emb, text, mask = layers.TextConditioning(
      ch * cfg.embed_mult,
      cfg.text_dim or ch,
      cfg.pool_heads,
      dt,
      cfg.attention_impl,
      name="conditioning",
    )(log_snr, cond, extra_levels)
    res_cls = layers.maybe_remat(layers.ResBlock, cfg.remat, static_argnums=(3,))
    attn_cls = layers.maybe_remat(layers.AttentionBlock, cfg.remat)
    res = lambda features, resample, name: res_cls(
      features, resample, cfg.dropout, cfg.norm_groups, dt, name=name
    )
    attn = lambda name: attn_cls(
      cfg.num_heads,
      cfg.head_dim,
      True,
      cfg.text_attention,
      cfg.norm_groups,
      dt,
      cfg.attention_impl,
      name=name,
    )
    attn_levels = cfg.attention_levels()
    last = len(cfg.channel_mult) - 1

    runs = cfg.scan_runs()

    def scan(path, level, h, skip):
      """Blocks 1 .. n-1 of a level as one scan: (h, their skips stacked) on the way down."""
      n = cfg.num_res_blocks - 1
      cls = layers.scanned(layers.LevelLayer, cfg.remat, n)
      has_attn = level in attn_levels
      return cls(
        cfg.channel_mult[level] * ch,
        cfg.dropout,
        cfg.norm_groups,
        dt,
        deterministic,
        self_attention=has_attn,
        text_attention=has_attn and cfg.text_attention,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        attention_impl=cfg.attention_impl,
        name=f"{path}_{level}_layers",
      )(h, skip, emb, text, mask)

    h = layers.constrain_image(layers.Conv(ch, 3, dtype=dt, name="conv_in")(z.astype(dt)))
    skips = [h]
    for level, mult in enumerate(cfg.channel_mult):
      for i in range(cfg.num_res_blocks):
        if f"down_{level}_layers" in runs and i >= 1:
          if i == 1:
            h, ys = scan("down", level, h, None)
            skips.extend(ys[j] for j in range(ys.shape[0]))
          continue
        h = res(mult * ch, None, f"down_{level}_res_{i}")(h, emb, deterministic)
        if level in attn_levels:
          h = attn(f"down_{level}_attn_{i}")(h, text, mask)
        skips.append(h)
      if level != last:
        h = res(mult * ch, "down", f"down_{level}_downsample")(h, emb, deterministic)
        skips.append(h)

    h = res(cfg.channel_mult[-1] * ch, None, "mid_res_0")(h, emb, deterministic)
    h = attn("mid_attn")(h, text, mask)
    h = res(cfg.channel_mult[-1] * ch, None, "mid_res_1")(h, emb, deterministic)

    for level in reversed(range(len(cfg.channel_mult))):
      mult = cfg.channel_mult[level]
      for i in range(cfg.num_res_blocks + 1):
        if f"up_{level}_layers" in runs and 1 <= i < cfg.num_res_blocks:
          if i == 1:
            xs = jnp.stack([skips.pop() for _ in range(1, cfg.num_res_blocks)])
            h, _ = scan("up", level, h, xs)
          continue
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res(mult * ch, None, f"up_{level}_res_{i}")(h, emb, deterministic)
        if level in attn_levels:
          h = attn(f"up_{level}_attn_{i}")(h, text, mask)
      if level != 0:
        h = res(mult * ch, "up", f"up_{level}_upsample")(h, emb, deterministic)

    h = nn.silu(layers.GroupNorm(cfg.norm_groups, dt, name="norm_out")(h))
    out = layers.Conv(cfg.out_channels, 3, dtype=dt, zero_init=True, name="conv_out")(h)
    out = out.astype(jnp.float32)
    return out + lowres if cfg.lowres_skip else out
