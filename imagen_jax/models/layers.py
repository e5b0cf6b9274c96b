"""Building blocks shared by the base U-Net and the Efficient U-Net (Flax linen).

Dtype policy: parameters float32; matmuls and convolutions in `dtype` (bfloat16 on accelerators);
GroupNorm / LayerNorm and the attention softmax in float32. Every parameter carries logical axis
names (see `imagen_jax.partitioning.AXIS_RULES`); activations get logical sharding constraints at
block boundaries.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.batch_keys import TEXT_EMB, TEXT_MASK
from imagen_jax.errors import ConfigError

Dtype = Any

IMAGE_AXES = ("activation_batch", "activation_height", "activation_width", "activation_embed")
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")

REMAT_POLICIES = {
  "none": None,
  "full": "full",  # save nothing but the block inputs
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def constrain_image(x):
  return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_tokens(x):
  return nn.with_logical_constraint(x, TOKEN_AXES)


def _init(init, axes):
  return nn.with_logical_partitioning(init, axes)


def check_remat(remat: str) -> str:
  """The one validation of a remat policy name (the U-Net configs and `maybe_remat` call it)."""
  if remat not in REMAT_POLICIES:
    raise ConfigError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
  return remat


def maybe_remat(module_cls, remat: str, static_argnums=()):
  """`nn.remat` of a module class under a named policy ('none' returns the class unchanged)."""
  policy = REMAT_POLICIES[check_remat(remat)]
  if policy is None:
    return module_cls
  return nn.remat(
    module_cls, static_argnums=static_argnums, policy=None if policy == "full" else policy
  )


def scanned(module_cls, remat: str, length: int):
  """`nn.scan` of a layer class over `length` repetitions (maxtext's scan_layers): one traced
  body instead of `length` copies, so the compiler sees a program that does not grow with depth.
  Parameters are stacked on a leading axis named 'layers' (left unsharded by AXIS_RULES); the
  remat policy applies inside the scan (each repetition saves only what the policy keeps); every
  repetition draws its own dropout key. The scanned class is called (carry, xs, *broadcast) ->
  (carry, ys)."""
  policy = REMAT_POLICIES[check_remat(remat)]
  body = module_cls
  if policy is not None:
    body = nn.remat(module_cls, prevent_cse=False, policy=None if policy == "full" else policy)
  return nn.scan(
    body,
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
    length=length,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )


def noise_level_to_unit(log_snr):
  """Maps log-SNR in [-inf, inf] to the cosine-equivalent time (2/pi) atan(exp(-log_snr / 2)) in [0,
  1].

  Finite at both ends and independent of the training schedule, so the network can be sampled with
  another schedule or step count.
  """
  return (2.0 / math.pi) * jnp.arctan(jnp.exp(-0.5 * jnp.asarray(log_snr, jnp.float32)))


def sinusoidal_embedding(
  x,
  dim: int,
  max_period: float = 10000.0,
  scale: float = 1000.0,
  freq_shift: float = 0.0,
  flip_sin_to_cos: bool = True,
):
  """Transformer sinusoidal features of scale * x; x: (B,) float (in [0, 1] at the default scale).
  Frequencies max_period^(-i / (dim/2 - freq_shift)); [cos, sin] (flip_sin_to_cos) or [sin, cos];
  diffusers' `get_timestep_embedding` at scale 1. Returns (B, dim) float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = scale * jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :]
  parts = [jnp.cos(args), jnp.sin(args)]
  emb = jnp.concatenate(parts if flip_sin_to_cos else parts[::-1], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Dense(nn.Module):
  features: int
  axes: tuple = ("embed", "mlp")
  dtype: Dtype = jnp.float32
  zero_init: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kinit = nn.initializers.zeros_init() if self.zero_init else nn.initializers.lecun_normal()
    return nn.Dense(
      self.features,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_init(kinit, self.axes),
      bias_init=_init(nn.initializers.zeros_init(), self.axes[-1:]),
    )(x)


class Conv(nn.Module):
  features: int
  kernel_size: int = 3
  strides: int = 1
  dtype: Dtype = jnp.float32
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kinit = nn.initializers.zeros_init() if self.zero_init else nn.initializers.lecun_normal()
    return nn.Conv(
      self.features,
      (k, k),
      strides=(self.strides, self.strides),
      padding="SAME",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_init(kinit, (None, None, "conv_in", "conv_out")),
      bias_init=_init(nn.initializers.zeros_init(), ("conv_out",)),
    )(x)


class HeadsProjection(nn.Module):
  """(..., D) -> (..., heads, head_dim), without bias unless `use_bias`. Written out (not
  nn.DenseGeneral, which builds its kernel flat and so cannot carry 3-D logical axis names under a
  mesh)."""

  heads: int
  head_dim: int
  axes: tuple = ("embed", "heads", "kv")
  dtype: Dtype = jnp.float32
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    kernel = self.param(
      "kernel", _init(init, self.axes), (x.shape[-1], self.heads, self.head_dim), jnp.float32
    )
    y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param(
        "bias", _init(nn.initializers.zeros_init(), self.axes[1:]), (self.heads, self.head_dim)
      )
      y = y + bias.astype(self.dtype)
    return y


class HeadsOutput(nn.Module):
  """(..., heads, head_dim) -> (..., features), with bias."""

  features: int
  axes: tuple = ("heads", "kv", "embed")
  dtype: Dtype = jnp.float32
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    init = (
      nn.initializers.zeros_init()
      if self.zero_init
      else nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    )
    kernel = self.param(
      "kernel", _init(init, self.axes), (x.shape[-2], x.shape[-1], self.features), jnp.float32
    )
    bias = self.param(
      "bias", _init(nn.initializers.zeros_init(), self.axes[-1:]), (self.features,), jnp.float32
    )
    return jnp.einsum(
      "...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype)
    ) + bias.astype(self.dtype)


class GroupNorm(nn.Module):
  """GroupNorm computed in float32; returns `dtype`. two_pass: the variance as the mean squared
  deviation (flax's default E[x^2] - E[x]^2 cancels where the mean is large against the spread, as
  in DeepFloyd IF's text of near-identical padding rows: 1e-3 output errors there)."""

  groups: int = 32
  dtype: Dtype = jnp.float32
  eps: float = 1e-5
  two_pass: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    groups = math.gcd(self.groups, c)
    y = nn.GroupNorm(
      num_groups=groups,
      epsilon=self.eps,
      use_fast_variance=not self.two_pass,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      scale_init=_init(nn.initializers.ones_init(), ("norm",)),
      bias_init=_init(nn.initializers.zeros_init(), ("norm",)),
    )(x.astype(jnp.float32))
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32; returns `dtype` (two_pass: see `GroupNorm`)."""

  dtype: Dtype = jnp.float32
  two_pass: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(
      epsilon=1e-5,
      use_fast_variance=not self.two_pass,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      scale_init=_init(nn.initializers.ones_init(), ("norm",)),
      bias_init=_init(nn.initializers.zeros_init(), ("norm",)),
    )(x.astype(jnp.float32))
    return y.astype(self.dtype)


class NoiseLevelEmbedding(nn.Module):
  """Sinusoidal features of a level in [0, 1] through a 2-layer SiLU MLP."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, level):
    h = sinusoidal_embedding(level, max(2, self.features // 4)).astype(self.dtype)
    h = Dense(self.features, ("embed", "mlp"), self.dtype)(h)
    h = nn.silu(h)
    return Dense(self.features, ("mlp", "embed"), self.dtype)(h)


def _heads(channels: int, num_heads: Optional[int], head_dim: Optional[int]):
  if num_heads:
    if channels % num_heads:
      raise ConfigError(f"{channels} channels do not split into {num_heads} heads")
    return num_heads, channels // num_heads
  if not head_dim or channels % head_dim:
    raise ConfigError(f"{channels} channels do not split into heads of {head_dim}")
  return channels // head_dim, head_dim


def attention(q, k, v, mask, impl: Optional[str]):
  """softmax(q k^T / sqrt(d)) v over (B, T, N, H) arrays with a (B, S) key mask; logits in float32.

  `jax.nn.dot_product_attention` lets GPUs take cuDNN's fused kernel (impl=None picks it when it
  applies; 'xla' forces the portable path).
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation=impl)


class AttentionBlock(nn.Module):
  """Residual attention over image positions, optionally attending to the text.

  self_attention=True, text=True: the paper's base / 64->256 design: layer-normed, projected text
    tokens concatenated to the image tokens as extra keys and values.
  self_attention=False, text=True: explicit cross-attention to the text only (256->1024). A learned
    null key/value is always present, so a fully masked (dropped) text is well defined.
  self_attention=True, text=False: plain self-attention.
  """

  num_heads: Optional[int] = None
  head_dim: Optional[int] = 64
  self_attention: bool = True
  text: bool = True
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x, text_emb, text_mask):
    b, hgt, wid, c = x.shape
    heads, dh = _heads(c, self.num_heads, self.head_dim)
    proj = lambda name: HeadsProjection(heads, dh, dtype=self.dtype, name=name)
    h = GroupNorm(self.norm_groups, self.dtype)(x).reshape(b, hgt * wid, c)
    q = proj("query")(h)
    keys, values, masks = [], [], []
    if self.self_attention:
      keys.append(proj("key")(h))
      values.append(proj("value")(h))
      masks.append(jnp.ones((b, hgt * wid), bool))
    if self.text:
      t = LayerNorm(self.dtype, name="text_norm")(text_emb)
      keys.append(proj("text_key")(t))
      values.append(proj("text_value")(t))
      masks.append(text_mask.astype(bool))
      null = self.param(
        "null_kv",
        _init(nn.initializers.normal(1.0), (None, "heads", "kv")),
        (2, heads, dh),
        jnp.float32,
      )
      keys.append(jnp.broadcast_to(null[0].astype(self.dtype), (b, 1, heads, dh)))
      values.append(jnp.broadcast_to(null[1].astype(self.dtype), (b, 1, heads, dh)))
      masks.append(jnp.ones((b, 1), bool))
    k = jnp.concatenate(keys, axis=1)
    v = jnp.concatenate(values, axis=1)
    mask = jnp.concatenate(masks, axis=1)
    q = nn.with_logical_constraint(
      q, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    )
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.attention_impl)
    out = HeadsOutput(c, dtype=self.dtype, zero_init=True, name="out")(out)
    return constrain_image(x + out.reshape(b, hgt, wid, c).astype(x.dtype))


class TextPooling(nn.Module):
  """Masked attention pooling of the layer-normed text tokens into one vector of `features`.

  The query is the masked mean of the projected tokens; keys/values are the tokens plus a learned
  null token, so dropped text (all masked) pools to a learned vector.
  """

  features: int
  num_heads: int = 8
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, text_emb, text_mask):
    b = text_emb.shape[0]
    width = self.features
    heads, dh = _heads(width, self.num_heads, None)
    t = LayerNorm(self.dtype)(text_emb)
    t = Dense(width, ("embed", "mlp"), self.dtype, use_bias=False)(t)
    m = text_mask.astype(jnp.float32)[..., None]
    mean = jnp.sum(t.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    null = self.param(
      "null_token", _init(nn.initializers.normal(1.0), (None, "embed")), (1, width), jnp.float32
    )
    tokens = jnp.concatenate([jnp.broadcast_to(null.astype(t.dtype), (b, 1, width)), t], axis=1)
    mask = jnp.concatenate([jnp.ones((b, 1), bool), text_mask.astype(bool)], axis=1)
    proj = lambda name: HeadsProjection(heads, dh, dtype=self.dtype, name=name)
    q = proj("query")(mean.astype(self.dtype)[:, None, :])
    out = attention(q, proj("key")(tokens), proj("value")(tokens), mask, self.attention_impl)
    out = HeadsOutput(width, dtype=self.dtype, name="out")(out)
    return out[:, 0, :]


def downsample(x):
  """2x2 average pooling."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample(x):
  """2x nearest-neighbour upsampling."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")


class ResBlock(nn.Module):
  """BigGAN-style residual block with scale-shift conditioning (Improved DDPM / Imagen).

  GN -> SiLU -> [resample] -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv3x3
  (zero init), plus a shortcut (resampled, and a 1x1 conv when the width changes). `resample` is
  'down' (2x2 average pooling) or 'up' (nearest) inside the block, as in BigGAN.
  """

  features: int
  resample: Optional[str] = None
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, deterministic: bool = True):
    h = nn.silu(GroupNorm(self.norm_groups, self.dtype)(x))
    if self.resample == "down":
      h, x = downsample(h), downsample(x)
    elif self.resample == "up":
      h, x = upsample(h), upsample(x)
    h = Conv(self.features, 3, dtype=self.dtype)(h)
    ss = Dense(2 * self.features, ("embed", "conv_out"), self.dtype)(nn.silu(emb))
    scale, shift = jnp.split(ss[:, None, None, :].astype(jnp.float32), 2, axis=-1)
    h = GroupNorm(self.norm_groups, jnp.float32)(h)
    h = (h * (1.0 + scale) + shift).astype(self.dtype)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = Conv(self.features, 3, dtype=self.dtype, zero_init=True)(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, dtype=self.dtype)(x)
    return constrain_image(x.astype(self.dtype) + h)


class TextConditioning(nn.Module):
  """Noise-level embedding(s) plus attention-pooled text; returns (emb, text tokens, text mask).

  The text embeddings are layer-normed and projected once to `text_dim` (shared by the pooling and
  by every attention layer, which layer-norms them again before its own key/value projections).
  """

  embed_dim: int
  text_dim: int
  pool_heads: int = 8
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, log_snr, cond, extra_levels=()):
    emb = NoiseLevelEmbedding(self.embed_dim, self.dtype, name="time_embed")(
      noise_level_to_unit(log_snr)
    )
    for i, level in enumerate(extra_levels):
      emb = emb + NoiseLevelEmbedding(self.embed_dim, self.dtype, name=f"level_embed_{i}")(level)
    text_mask = cond[TEXT_MASK].astype(bool)
    text = LayerNorm(self.dtype, name="text_norm")(constrain_tokens(cond[TEXT_EMB]))
    text = Dense(self.text_dim, ("text_embed", "embed"), self.dtype, name="text_proj")(text)
    text = constrain_tokens(text)
    emb = emb + TextPooling(
      self.embed_dim, self.pool_heads, self.dtype, self.attention_impl, name="text_pool"
    )(text, text_mask)
    return emb, text, text_mask


class LevelLayer(nn.Module):
  """One repeated unit of a U-Net level, the body of a scan over its homogeneous residual blocks:
  [concatenate the scaled skip connection] -> ResBlock -> [attention]. Called (h, skip, emb,
  text, mask) -> (h, h): the carry is the activation, the output the skip connection the unit
  leaves. `skip` is None on the way down. Children are named 'res' and 'attn'
  (`imagen_jax.models.scan_layout` maps them to the unscanned names)."""

  features: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  deterministic: bool = True
  skip_scale: float = 1.0
  self_attention: bool = False
  text_attention: bool = False
  num_heads: Optional[int] = None
  head_dim: Optional[int] = None
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, h, skip, emb, text, mask):
    if skip is not None:
      s = skip.astype(h.dtype)
      if self.skip_scale != 1.0:
        s = s * jnp.asarray(self.skip_scale, h.dtype)
      h = jnp.concatenate([h, s], axis=-1)
    h = ResBlock(self.features, None, self.dropout, self.norm_groups, self.dtype, name="res")(
      h, emb, self.deterministic
    )
    if self.self_attention or self.text_attention:
      h = AttentionBlock(
        self.num_heads,
        self.head_dim,
        self.self_attention,
        self.text_attention,
        self.norm_groups,
        self.dtype,
        self.attention_impl,
        name="attn",
      )(h, text, mask)
    return h, h
