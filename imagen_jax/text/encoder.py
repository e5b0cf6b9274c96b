"""Batched, jitted encoding with the frozen T5 encoder, its parameters sharded on the mesh."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import partitioning
from imagen_jax.text.t5 import T5Config, T5Encoder, abstract_encoder_params


def encode_tokens(config: T5Config, params, tokens, out_dtype=jnp.float32):
  """Pure, jittable: tokens (B, L) -> (embeddings (B, L, d_model) in out_dtype, mask). For on-the-fly mode
  inside a train step, with the params sharded on the step's mesh."""
  emb, mask = T5Encoder(config).apply({"params": params}, tokens)
  return emb.astype(out_dtype), mask


class TextEncoder:
  """encode(tokens) -> (embeddings, mask), in fixed-size batches so that one compilation serves all.

  With a mesh, the parameters are placed by the shared axis rules (T5-XXL's 4.6B shard over fsdp /
  tensor like the U-Nets) and the batch is split over (data, fsdp).
  """

  def __init__(self, config: T5Config, params, mesh: Optional[jax.sharding.Mesh] = None, batch_size: int = 64,
               out_dtype=jnp.float32):
    self.config = config
    self.model = T5Encoder(config)
    self.mesh = mesh
    self.batch_size = batch_size
    self.out_dtype = out_dtype
    self.trace_count = 0
    if mesh is None:
      self.params = jax.device_put(params)
      self._fn = jax.jit(self._apply)
    else:
      shardings = partitioning.mesh_shardings(abstract_encoder_params(config), mesh)
      self.params = jax.device_put(params, shardings)
      data = partitioning.batch_sharding(mesh, 2)
      self._fn = jax.jit(self._apply, in_shardings=(shardings, data),
                         out_shardings=(partitioning.batch_sharding(mesh, 3), data))

  def _apply(self, params, tokens):
    self.trace_count += 1     # runs at trace time only: one trace = one compilation
    return encode_tokens(self.config, params, tokens, self.out_dtype)

  def _run(self, tokens):
    if self.mesh is None:
      return self._fn(self.params, tokens)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(partitioning.AXIS_RULES):
      return self._fn(self.params, tokens)

  def encode(self, tokens: np.ndarray):
    """tokens: (N, L) int32 -> (embeddings (N, L, d_model) as NumPy, mask (N, L) bool)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (N, L), got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    n = tokens.shape[0]
    embs, masks = [], []
    for start in range(0, n, self.batch_size):
      chunk = tokens[start:start + self.batch_size]
      pad = self.batch_size - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)])
      emb, mask = self._run(jnp.asarray(chunk))
      embs.append(np.asarray(emb)[: self.batch_size - pad])
      masks.append(np.asarray(mask)[: self.batch_size - pad])
    if not embs:
      return np.zeros((0, tokens.shape[1], self.config.d_model), self.out_dtype), np.zeros((0, tokens.shape[1]), bool)
    return np.concatenate(embs), np.concatenate(masks)
