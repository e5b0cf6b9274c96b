"""T5 tokenization: a sentencepiece model, a fixed maximum length, EOS appended, mask = tokens > 0.

Uses seqio's `SentencePieceVocabulary` when seqio is installed (the data pipeline's vocabulary), and
the same sentencepiece model directly otherwise (GPU machines carry no TensorFlow, which seqio
imports); both give the same ids. Truncation, empty captions and invalid UTF-8 are counted and
reported, never silent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from imagen_jax.errors import ConfigError, MissingFileError
from imagen_jax.text.t5 import EOS_ID, PAD_ID

DEFAULT_MAX_LENGTH = 128


def trim_with_eos(ids, max_length: int):
  """ids (unpadded, no EOS) -> (ids[: max_length - 1] + [EOS] as int32, whether it was
  truncated)."""
  ids = np.asarray(ids, np.int32)
  return np.append(ids[: max_length - 1], np.int32(EOS_ID)).astype(np.int32), len(
    ids
  ) + 1 > max_length


@dataclasses.dataclass
class TokenizeStats:
  captions: int = 0
  truncated: int = 0
  empty: int = 0
  invalid_utf8: int = 0


@dataclasses.dataclass
class TokenizedBatch:
  tokens: np.ndarray  # (N, max_length) int32, 0-padded, EOS-terminated
  lengths: np.ndarray  # (N,) number of real tokens (EOS included)
  truncated: np.ndarray  # (N,) bool: the caption was cut to fit max_length
  stats: TokenizeStats

  @property
  def mask(self) -> np.ndarray:
    return self.tokens > PAD_ID


class Tokenizer:
  def __init__(
    self, spm_path: Union[str, Path], max_length: int = DEFAULT_MAX_LENGTH, use_seqio: bool = True
  ):
    spm_path = Path(spm_path)
    if not spm_path.is_file():
      raise MissingFileError(f"sentencepiece model not found: {spm_path}")
    if max_length < 2:
      raise ConfigError(f"max_length must be at least 2 (one token and EOS), got {max_length}")
    self.max_length = max_length
    self.path = spm_path
    self._encode = None
    if use_seqio:
      try:
        import seqio

        vocab = seqio.SentencePieceVocabulary(str(spm_path))
        self._encode = vocab.encode
        self.vocab_size = vocab.vocab_size
      except ImportError:
        self._encode = None
    if self._encode is None:
      import sentencepiece as spm

      proc = spm.SentencePieceProcessor(model_file=str(spm_path))
      self._encode = proc.encode
      self.vocab_size = proc.get_piece_size()

  def __call__(self, captions: Sequence[Union[str, bytes]]) -> TokenizedBatch:
    stats = TokenizeStats(captions=len(captions))
    tokens = np.zeros((len(captions), self.max_length), np.int32)
    lengths = np.zeros((len(captions),), np.int32)
    truncated = np.zeros((len(captions),), bool)
    for i, caption in enumerate(captions):
      if isinstance(caption, bytes):
        try:
          caption = caption.decode("utf-8")
        except UnicodeDecodeError:
          caption = caption.decode("utf-8", errors="replace")
          stats.invalid_utf8 += 1
      elif not isinstance(caption, str):
        raise TypeError(f"caption {i} is a {type(caption).__name__}, not str or bytes")
      if not caption.strip():
        stats.empty += 1
      ids, truncated[i] = trim_with_eos(self._encode(caption), self.max_length)
      stats.truncated += int(truncated[i])
      tokens[i, : len(ids)] = ids
      lengths[i] = len(ids)
    return TokenizedBatch(tokens, lengths, truncated, stats)
