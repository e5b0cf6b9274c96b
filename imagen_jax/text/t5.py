"""The T5 v1.1 encoder in Flax linen (what Imagen conditions on; docs/paper.md §4).

Pre-norm residual blocks with RMSNorm (float32, no mean subtraction, no bias, eps 1e-6); no biases
anywhere; unscaled attention logits; one bucketed bidirectional relative-position bias table (heads,
32) shared by all layers; gated-GELU feed-forward (tanh GELU); unscaled token embeddings; a final
RMSNorm. Parameter names and kernel layouts are T5X's, so a T5X checkpoint maps one to one and a
Hugging Face one by transposing its kernels (`imagen_jax.text.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.errors import ConfigError

PAD_ID = 0
EOS_ID = 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Defaults are T5 v1.1 XXL, the paper's encoder (4.6B parameters in the encoder)."""

  vocab_size: int = 32128
  d_model: int = 4096
  num_heads: int = 64
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # compute dtype ('bfloat16' on accelerators)
  param_dtype: str = "float32"  # 'bfloat16' halves the memory of a frozen encoder (XXL: ~9.2 GB)
  remat: bool = False

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @property
  def dtypes(self):
    """(compute dtype, parameter dtype) as jnp dtypes."""
    return jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)


T5_SIZES = {
  # d_model, heads, d_kv, d_ff, layers (docs/paper.md §4)
  "small": (512, 6, 64, 1024, 8),
  "base": (768, 12, 64, 2048, 12),
  "large": (1024, 16, 64, 2816, 24),
  "xl": (2048, 32, 64, 5120, 24),
  "xxl": (4096, 64, 64, 10240, 24),
  "tiny": (32, 4, 8, 48, 2),  # tests
}


@gin.configurable
def t5_config(size: str = "xxl", **overrides) -> T5Config:
  if size not in T5_SIZES:
    raise ConfigError(f"unknown T5 size {size!r}; expected one of {sorted(T5_SIZES)}")
  d_model, heads, d_kv, d_ff, layers = T5_SIZES[size]
  kw = dict(d_model=d_model, num_heads=heads, d_kv=d_kv, d_ff=d_ff, num_layers=layers)
  if size == "tiny":
    kw["vocab_size"] = 128
  kw.update(overrides)
  return T5Config(**kw)


def relative_position_bucket(relative_position, num_buckets: int = 32, max_distance: int = 128):
  """Bidirectional T5 buckets of (key position - query position), as int32 (NumPy, static shapes).

  Half the buckets for each direction; within a direction, distances below num_buckets/4 get a
  bucket each, larger ones share log-spaced buckets up to max_distance (computed in float32 as the
  original Mesh TensorFlow code did, so boundary distances land in the same buckets as the released
  models).
  """
  rp = np.asarray(relative_position, np.int64)
  half = num_buckets // 2
  bucket = (rp > 0).astype(np.int64) * half
  dist = np.abs(rp)
  max_exact = half // 2
  log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
    math.log(max_distance / max_exact)
  )  # only used where dist >= max_exact
  large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (bucket + np.where(dist < max_exact, dist, large)).astype(np.int32)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class _Kernel(nn.Module):
  """x @ kernel, no bias; the kernel is 2-D (in, out) as in T5X."""

  features: int
  axes: tuple
  init_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "normal")
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(init, self.axes),
      (x.shape[-1], self.features),
      self.param_dtype,
    )
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class RelativePositionBias(nn.Module):
  num_heads: int
  num_buckets: int
  max_distance: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, length: int):
    table = self.param(
      "rel_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
      (self.num_heads, self.num_buckets),
      self.param_dtype,
    )
    pos = np.arange(length)
    buckets = relative_position_bucket(
      pos[None, :] - pos[:, None], self.num_buckets, self.max_distance
    )
    # (heads, q, k) -> (1, heads, q, k)
    return jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=1)[None]


class SelfAttention(nn.Module):
  """Multi-head self-attention with the shared position bias; logits are not scaled (T5 puts
  1/sqrt(d_kv) into the query initialisation)."""

  config: T5Config

  @nn.compact
  def __call__(self, h, bias, mask):
    cfg = self.config
    dt, pdt = cfg.dtypes
    b, length, _ = h.shape
    heads = lambda y: y.reshape(b, length, cfg.num_heads, cfg.d_kv)
    q = heads(
      _Kernel(cfg.inner_dim, ("embed", "joined_kv"), 1.0 / cfg.d_kv, dt, pdt, name="query")(h)
    )
    k = heads(_Kernel(cfg.inner_dim, ("embed", "joined_kv"), 1.0, dt, pdt, name="key")(h))
    v = heads(_Kernel(cfg.inner_dim, ("embed", "joined_kv"), 1.0, dt, pdt, name="value")(h))
    q = nn.with_logical_constraint(
      q, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
    )
    out = jax.nn.dot_product_attention(
      q, k, v, bias=bias.astype(q.dtype), mask=mask[:, None, None, :], scale=1.0
    )
    return _Kernel(cfg.d_model, ("joined_kv", "embed"), 1.0, dt, pdt, name="out")(
      out.reshape(b, length, -1)
    )


class GatedGeluMlp(nn.Module):
  """gelu_tanh(x wi_0) * (x wi_1) -> wo."""

  config: T5Config

  @nn.compact
  def __call__(self, h):
    cfg = self.config
    dt, pdt = cfg.dtypes
    gate = jax.nn.gelu(
      _Kernel(cfg.d_ff, ("embed", "mlp"), 1.0, dt, pdt, name="wi_0")(h), approximate=True
    )
    lin = _Kernel(cfg.d_ff, ("embed", "mlp"), 1.0, dt, pdt, name="wi_1")(h)
    inner = nn.with_logical_constraint(
      gate * lin, ("activation_batch", "activation_length", "activation_mlp")
    )
    return _Kernel(cfg.d_model, ("mlp", "embed"), 1.0, dt, pdt, name="wo")(inner)


ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


class EncoderLayer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, bias, mask):
    cfg = self.config
    dt, pdt = cfg.dtypes
    h = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="pre_attention_layer_norm")(x)
    x = nn.with_logical_constraint(
      x + SelfAttention(cfg, name="attention")(h, bias, mask).astype(x.dtype), ACT_AXES
    )
    h = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="pre_mlp_layer_norm")(x)
    return nn.with_logical_constraint(
      x + GatedGeluMlp(cfg, name="mlp")(h).astype(x.dtype), ACT_AXES
    )


class EncoderStack(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    dt, pdt = cfg.dtypes
    bias = RelativePositionBias(
      cfg.num_heads,
      cfg.relative_attention_num_buckets,
      cfg.relative_attention_max_distance,
      dt,
      pdt,
      name="relpos_bias",
    )(x.shape[1])
    layer_cls = nn.remat(EncoderLayer) if cfg.remat else EncoderLayer
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, name=f"layers_{i}")(x, bias, mask)
    return RMSNorm(cfg.layer_norm_epsilon, jnp.float32, pdt, name="encoder_norm")(x)


class T5Encoder(nn.Module):
  """tokens (B, L) int32 -> (embeddings (B, L, d_model) float32, mask (B, L) bool); mask = tokens
  > 0."""

  config: T5Config

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    dt, pdt = cfg.dtypes
    mask = tokens > PAD_ID
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=dt,
      param_dtype=pdt,
      name="token_embedder",
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
    )
    x = nn.with_logical_constraint(embed(tokens), ACT_AXES)
    return EncoderStack(cfg, name="encoder")(x, mask), mask


def _init(config: T5Config, key, length: int = 8):
  return T5Encoder(config).init(key, jnp.ones((1, length), jnp.int32))["params"]


def init_random_encoder_params(config: T5Config, key):
  """Random initial encoder parameters (boxed with their logical axis names), for tests and the
  demo's untrained encoder; real runs load a checkpoint (`imagen_jax.text.checkpoints`)."""
  return jax.jit(lambda k: _init(config, k))(key)


def abstract_encoder_params(config: T5Config):
  """The encoder's parameter tree as shapes and dtypes with logical axis names, nothing
  allocated: for shardings, layout checks and ahead-of-time compiles."""
  return jax.eval_shape(lambda: _init(config, jax.random.PRNGKey(0)))
