"""The Efficient U-Net of Imagen's super-resolution stages (Saharia et al. 2022, appendix B).

Differences from the base U-Net, all from the paper:
- parameters shifted to low resolutions: a number of residual blocks per level (64->256: 2/4/8/8 at
  channels 128/256/512/1024);
- skip connections scaled by 1/sqrt(2);
- a level's down-sampling (strided 3x3 conv) comes *before* its convolutions (DBlock) and its
  up-sampling (nearest, then 3x3 conv) *after* them (UBlock), so the blocks run at the lower
  resolution;
- the low-resolution conditioning image (given at the output size, or upsampled here) is
  concatenated to z; its noise-augmentation level is embedded like the time and added to the
  conditioning embedding;
- (this project's option, off in the paper-size configs) `lowres_skip`: the conditioning image, as
  the network is given it, is added to the output, so that with the x0 objective the network
  predicts only what the low-res image lacks (docs/findings.md);
- attention only where configured per level: self-attention with the text concatenated into its
  keys/values (64->256, lowest level), or explicit text cross-attention with no self-attention
  (256->1024). Everything else is convolutional, so a model trained on crops runs on whole images.
"""

from __future__ import annotations

import dataclasses
import math
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
class EfficientUNetConfig:
  image_size: int = 256  # training (crop) size of the output
  lowres_size: int = 64  # training size of the conditioning image
  in_channels: int = 3
  out_channels: int = 3
  init_channels: int = 128
  channels: Tuple[int, ...] = (128, 256, 512, 1024)
  num_res_blocks: Tuple[int, ...] = (2, 4, 8, 8)
  strides: Tuple[int, ...] = (2, 2, 2, 2)
  self_attention: Tuple[bool, ...] = (False, False, False, True)
  cross_attention: Tuple[bool, ...] = (False, False, False, True)
  num_heads: int = 8
  embed_dim: int = 512  # time / augmentation-level / pooled-text embedding width
  pool_heads: int = 8
  skip_scale: float = 1.0 / math.sqrt(2.0)
  dropout: float = 0.0
  norm_groups: int = 32
  text_embed_dim: int = 4096
  text_dim: int = 512  # width the text is projected to once
  max_text_length: int = 128
  lowres_resize: str = "bilinear"  # how the network upsamples the conditioning image
  # Add the (upsampled, noise-augmented) conditioning image to the output: the x0 objective then
  # learns the residual detail (needs objective 'x0'; not in the paper).
  lowres_skip: bool = False
  dtype: str = "float32"
  remat: str = "none"
  attention_impl: Optional[str] = None
  scan_layers: bool = False  # nn.scan over each level's residual blocks (all have the same shapes)

  def __post_init__(self):
    for name in ("channels", "num_res_blocks", "strides", "self_attention", "cross_attention"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    n = len(self.channels)
    for name in ("num_res_blocks", "strides", "self_attention", "cross_attention"):
      if len(getattr(self, name)) != n:
        raise ConfigError(
          f"EfficientUNetConfig.{name} needs one entry per level ({n}), got {getattr(self, name)}"
        )
    if any(s not in (1, 2) for s in self.strides):
      raise ConfigError(f"strides must be 1 or 2, got {self.strides}")
    layers.check_remat(self.remat)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def total_stride(self) -> int:
    return math.prod(self.strides)

  def scan_runs(self):
    """{scanned module name: [(residual block name, None), ...]} of the unscanned layout it
    replaces: every residual block of a level, down and up (attention follows the level's blocks,
    outside the scan); empty when scan_layers is off."""
    if not self.scan_layers:
      return {}
    return {
      f"{path}_{level}_layers": [(f"{path}_{level}_res_{i}", None) for i in range(n)]
      for path in ("down", "up")
      for level, n in enumerate(self.num_res_blocks)
    }


class EfficientUNet(nn.Module):
  """model(z, log_snr, cond, deterministic=True) -> prediction; cond holds text, lowres, aug
  level."""

  config: EfficientUNetConfig

  @nn.compact
  def __call__(self, z, log_snr, cond, deterministic: bool = True):
    cfg = self.config
    dt = cfg.compute_dtype
    b, hgt, wid, _ = z.shape
    if hgt % cfg.total_stride or wid % cfg.total_stride:
      raise ConfigError(
        f"image size {hgt}x{wid} must be divisible by the total stride {cfg.total_stride}"
      )
    lowres = cond[LOWRES].astype(jnp.float32)
    if lowres.shape[1:3] != (hgt, wid):  # noise-augmented at the input size: upsample here
      lowres = jax.image.resize(lowres, (b, hgt, wid, lowres.shape[-1]), method=cfg.lowres_resize)
    x = jnp.concatenate([z.astype(dt), lowres.astype(dt)], axis=-1)
    emb, text, mask = layers.TextConditioning(
      cfg.embed_dim, cfg.text_dim, cfg.pool_heads, dt, cfg.attention_impl, name="conditioning"
    )(log_snr, cond, (cond[LOWRES_AUG_LEVEL],))
    res_cls = layers.maybe_remat(layers.ResBlock, cfg.remat, static_argnums=(3,))
    attn_cls = layers.maybe_remat(layers.AttentionBlock, cfg.remat)
    res = lambda features, name: res_cls(
      features, None, cfg.dropout, cfg.norm_groups, dt, name=name
    )

    def attend(level, h, name):
      if not (cfg.self_attention[level] or cfg.cross_attention[level]):
        return h
      return attn_cls(
        cfg.num_heads,
        None,
        cfg.self_attention[level],
        cfg.cross_attention[level],
        cfg.norm_groups,
        dt,
        cfg.attention_impl,
        name=name,
      )(h, text, mask)

    h = layers.constrain_image(layers.Conv(cfg.init_channels, 3, dtype=dt, name="conv_in")(x))
    runs = cfg.scan_runs()

    def scan(path, level, h, skip):
      cls = layers.scanned(layers.LevelLayer, cfg.remat, cfg.num_res_blocks[level])
      return cls(
        cfg.channels[level],
        cfg.dropout,
        cfg.norm_groups,
        dt,
        deterministic,
        skip_scale=cfg.skip_scale,
        name=f"{path}_{level}_layers",
      )(h, skip, emb, text, mask)

    skips = []
    for level, features in enumerate(cfg.channels):
      # DBlock: down-sample first, then the level's residual blocks at the lower resolution; a skip
      # connection leaves after every block (the last one after the attention).
      if cfg.strides[level] > 1:
        h = layers.Conv(
          features, 3, strides=cfg.strides[level], dtype=dt, name=f"down_{level}_conv"
        )(h)
      if f"down_{level}_layers" in runs:
        h, ys = scan("down", level, h, None)
        skips.extend(ys[i] for i in range(ys.shape[0] - 1))
        h = attend(level, h, f"down_{level}_attn")
        skips.append(h)
      else:
        for i in range(cfg.num_res_blocks[level]):
          h = res(features, f"down_{level}_res_{i}")(h, emb, deterministic)
          if i == cfg.num_res_blocks[level] - 1:
            h = attend(level, h, f"down_{level}_attn")
          skips.append(h)
          self.sow("intermediates", f"skip_{level}_{i}", h)

    for level in reversed(range(len(cfg.channels))):
      features = cfg.channels[level]
      # UBlock: each residual block takes a skip connection scaled by skip_scale; up-sampling last.
      if f"up_{level}_layers" in runs:
        xs = jnp.stack([skips.pop() for _ in range(cfg.num_res_blocks[level])])
        h, _ = scan("up", level, h, xs)
      else:
        for i in range(cfg.num_res_blocks[level]):
          h = jnp.concatenate(
            [h, skips.pop().astype(h.dtype) * jnp.asarray(cfg.skip_scale, h.dtype)], axis=-1
          )
          self.sow("intermediates", f"up_{level}_input_{i}", h)
          h = res(features, f"up_{level}_res_{i}")(h, emb, deterministic)
      h = attend(level, h, f"up_{level}_attn")
      if cfg.strides[level] > 1:
        out_features = cfg.channels[level - 1] if level else cfg.init_channels
        h = layers.Conv(out_features, 3, dtype=dt, name=f"up_{level}_conv")(layers.upsample(h))

    h = nn.silu(layers.GroupNorm(cfg.norm_groups, dt, name="norm_out")(h))
    out = layers.Conv(cfg.out_channels, 3, dtype=dt, zero_init=True, name="conv_out")(h)
    out = out.astype(jnp.float32)
    return out + lowres if cfg.lowres_skip else out
