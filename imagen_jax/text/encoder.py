"""Batched, jitted encoding with the frozen T5 encoder, its parameters sharded on the mesh."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import partitioning
from imagen_jax.errors import UserError
from imagen_jax.text.t5 import T5Config, T5Encoder, abstract_encoder_params


def encode_tokens(config: T5Config, params, tokens, out_dtype=jnp.float32):
  """Pure, jittable: tokens (B, L) -> (embeddings (B, L, d_model) in out_dtype, mask). For
  on-the-fly mode inside a train step, with the params sharded on the step's mesh."""
  emb, mask = T5Encoder(config).apply({"params": params}, tokens)
  return emb.astype(out_dtype), mask


class TextEncoder:
  """encode(tokens) -> (embeddings, mask), in fixed-size batches so that one compilation serves all.

  With a mesh, the parameters are placed by the shared axis rules (T5-XXL's 4.6B shard over fsdp /
  tensor like the U-Nets) and the batch is split over (data, fsdp).
  """

  def __init__(
    self,
    config: T5Config,
    params,
    mesh: Optional[jax.sharding.Mesh] = None,
    batch_size: int = 64,
    out_dtype=jnp.float32,
  ):
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
      self._fn = jax.jit(
        self._apply,
        in_shardings=(shardings, data),
        out_shardings=(partitioning.batch_sharding(mesh, 3), data),
      )

  def _apply(self, params, tokens):
    self.trace_count += 1  # runs at trace time only: one trace = one compilation
    return encode_tokens(self.config, params, tokens, self.out_dtype)

  def _run(self, tokens):
    if self.mesh is None:
      return self._fn(self.params, tokens)
    with partitioning.mesh_context(self.mesh):
      return self._fn(self.params, tokens)

  def encode(self, tokens: np.ndarray):
    """Embeds token ids in batches of `batch_size` rows (one compiled shape).

    Args:
      tokens: (N, L) int32 token ids.

    Returns:
      (embeddings (N, L, d_model) as NumPy in `out_dtype`, mask (N, L) bool).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (N, L), got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ValueError(
        f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, {tokens.max()}]"
      )
    out = partitioning.pad_shard_unpad(
      lambda rows: self._run(jnp.asarray(tokens[rows])),
      tokens.shape[0],
      self.batch_size,
      multiple=self.batch_size,
    )
    if out is None:
      return np.zeros((0, tokens.shape[1], self.config.d_model), self.out_dtype), np.zeros(
        (0, tokens.shape[1]), bool
      )
    return out


@dataclasses.dataclass
class EncodedPrompts:
  """Prompts with their T5 embeddings and what tokenizing them did."""

  texts: List[str]
  emb: np.ndarray  # (P, L, D)
  mask: np.ndarray  # (P, L)
  truncated: List[bool]
  lengths: List[int]
  stats: Any = None  # tokenizer.TokenizeStats


def encode_prompts(
  prompts: Sequence[str],
  vocab: str,
  encoder: str,
  max_length: int = 128,
  *,
  batch_size: Optional[int] = None,
  size: Optional[str] = None,
  warn: Optional[Callable[[str], None]] = None,
  loaded=None,
) -> EncodedPrompts:
  """Tokenizes (EOS appended) and encodes prompts once with a T5 encoder checkpoint.

  Uses the sentencepiece model directly (no TensorFlow).

  Args:
    prompts: the texts.
    vocab: the sentencepiece model file.
    encoder: the checkpoint (ours, Hugging Face or T5X).
    max_length: tokens per prompt, EOS included.
    batch_size: prompts per encoder call (default: all of them, at most 64).
    size: the T5 size (needed for a T5X checkpoint; checked against the others).
    warn: called with a line for each truncated prompt.
    loaded: the encoder's (config, params), already read (then `encoder` is not read again).

  Returns:
    The `EncodedPrompts`.
  """
  from imagen_jax.text import checkpoints, t5
  from imagen_jax.text.tokenizer import Tokenizer

  if not prompts:
    raise UserError("no prompts")
  tokenizer = Tokenizer(vocab, max_length, use_seqio=False)
  if loaded is None:
    loaded = checkpoints.load_any(encoder, None if size is None else t5.t5_config(size))
  config, params = loaded
  if tokenizer.vocab_size > config.vocab_size:
    raise UserError(
      f"vocabulary has {tokenizer.vocab_size} pieces but the encoder only {config.vocab_size} rows"
    )
  batch = tokenizer(list(prompts))
  if warn is not None:
    for i, (text, cut) in enumerate(zip(prompts, batch.truncated)):
      if cut:
        warn(f"prompt {i} truncated to {max_length} tokens (EOS included): {text[:60]!r}")
  batch_size = batch_size or max(1, min(len(prompts), 64))
  emb, mask = TextEncoder(config, params, batch_size=batch_size).encode(batch.tokens)
  return EncodedPrompts(
    texts=list(prompts),
    emb=emb,
    mask=mask,
    truncated=[bool(t) for t in batch.truncated],
    lengths=[int(n) for n in batch.lengths],
    stats=batch.stats,
  )
