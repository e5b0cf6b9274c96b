"""Where the trainer's batches come from: a source yields this host's part of each global batch as
NumPy arrays and can save / restore its position (a checkpoint item, one file set per process).

- `TaskSource`: the data pipeline (a seqio task, normally the embedding cache) through
  `imagen_jax.data.pipeline.stage_dataset`; TensorFlow is imported only when one is built.
- `InMemorySource`: arrays held in memory, a fixed shuffled order per epoch from the seed; host p
  takes rows [p b, (p + 1) b) of each global batch, so any number of hosts sees exactly the global
  batches of a single host (what the multi-host test and benchmarks need). No TensorFlow.
- `word_vector_shapes`: the synthetic captioned shapes with a fixed random vector per caption word
  as the "text embedding": a real, learnable text signal without a T5 encoder (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import json
from typing import Dict, Iterator, Optional

import gin
import jax
import numpy as np
from etils import epath

from imagen_jax import batch_keys as K
from imagen_jax.errors import ConfigError, UserError


class InMemorySource:
  """Global batches of `batch_size` rows drawn from in-memory arrays (see the module docstring)."""

  def __init__(
    self,
    arrays: Dict[str, np.ndarray],
    batch_size: int,
    seed: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
  ):
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {len(v) for v in self.arrays.values()}
    if len(sizes) != 1:
      raise ValueError(
        f"arrays have different lengths: { {k: len(v) for k, v in self.arrays.items()} }"
      )
    self.n = sizes.pop()
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if batch_size % self.process_count:
      raise ConfigError(
        f"batch_size {batch_size} is not divisible by {self.process_count} processes"
      )
    if batch_size > self.n:
      raise ConfigError(f"batch_size {batch_size} exceeds the {self.n} examples")
    self.batch_size = batch_size
    self.seed = seed
    self.position = 0  # global batches produced so far

  def _indices(self, batch: int) -> np.ndarray:
    per_epoch = self.n // self.batch_size
    epoch, i = divmod(batch, per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    rows = order[i * self.batch_size : (i + 1) * self.batch_size]
    local = self.batch_size // self.process_count
    return rows[self.process_index * local : (self.process_index + 1) * local]

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    idx = self._indices(self.position)
    self.position += 1
    return {k: v[idx] for k, v in self.arrays.items()}

  def save(self, prefix: str) -> None:
    epath.Path(prefix + ".json").write_text(
      json.dumps(
        {"position": self.position, "seed": self.seed, "batch_size": self.batch_size, "n": self.n}
      )
    )

  def restore(self, prefix: str) -> None:
    saved = json.loads(epath.Path(prefix + ".json").read_text())
    if (saved["seed"], saved["batch_size"], saved["n"]) != (self.seed, self.batch_size, self.n):
      raise UserError(
        f"the saved data position is for another source ({saved}), not seed={self.seed} "
        f"batch_size={self.batch_size} n={self.n}"
      )
    self.position = int(saved["position"])


class TaskSource:
  """This host's batches of a seqio task through the stage pipeline (clu iterator:
  checkpointable)."""

  def __init__(
    self,
    task_name: str,
    stage_config,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
  ):
    from imagen_jax.data import pipeline

    self.task_name = task_name
    self.config = stage_config
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    self._it = pipeline.StageIterator(
      pipeline.stage_dataset(task_name, stage_config, process_index=index, process_count=count)
    )
    self.skips = self._source_size_skips(task_name, stage_config)
    if self.skips and self.skips["skipped_by_reason"] and index == 0:
      reasons = ", ".join(f"{k}={v}" for k, v in self.skips["skipped_by_reason"].items())
      print(
        f"data: {self.skips['kept']} of {self.skips['records']} cached records used; skipped: "
        f"{reasons}",
        flush=True,
      )

  @staticmethod
  def _source_size_skips(task_name: str, stage_config) -> Optional[dict]:
    """The records the stage's source-size floor skips (`pipeline.source_size_skips`), for a
    cached task; None for other tasks."""
    from imagen_jax.data import pipeline, tasks

    cache_dir = tasks.CACHE_DIRS.get(task_name)
    if cache_dir is None:
      return None
    return pipeline.source_size_skips(tasks.source_size_counts(cache_dir), stage_config)

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    return next(self._it)

  def save(self, prefix: str) -> None:
    self._it.save(prefix)

  def restore(self, prefix: str) -> None:
    self._it.restore(prefix)


@gin.configurable
def cached_task(
  cache_dir: str = gin.REQUIRED, vocab_path: Optional[str] = None, name: str = "train_cache"
) -> str:
  """Registers the embedding cache in `cache_dir` as a seqio task and returns its name (for
  `train.data_task = @cached_task()`); vocab_path: the cache's sentencepiece model (optional: the
  cached records already hold token ids)."""
  from imagen_jax.data import tasks
  from imagen_jax.gin_utils import require

  require("cached_task", cache_dir=cache_dir)
  tasks.register_cached_task(name, cache_dir, vocab_path)
  return name


def _word_vector(word: str, dim: int) -> np.ndarray:
  seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
  return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def word_vector_shapes(
  num_examples: int,
  resolution: int,
  dim: int,
  max_length: int,
  seed: int = 0,
  one_object: bool = False,
  lowres: Optional[int] = None,
) -> Dict[str, np.ndarray]:
  """Synthetic captioned shapes as in-memory arrays: IMAGE in [-1, 1], TEXT_EMB = one fixed random
  vector per caption word (zero-padded to max_length), TEXT_MASK, and LOWRES (box-downsampled) when
  asked.

  one_object=True keeps only one-object captions ("a red circle"), where colour and shape are the
  text's whole content.
  """
  from imagen_jax.data import synthetic

  images, embs, masks, captions = [], [], [], []
  index = 0
  while len(images) < num_examples:
    scene = synthetic.make_scene(seed, index)
    index += 1
    if one_object and len(scene.objects) != 1:
      continue
    words = scene.caption.replace(",", " ").split()[:max_length]
    emb = np.zeros((max_length, dim), np.float32)
    for i, w in enumerate(words):
      emb[i] = _word_vector(w, dim)
    images.append(synthetic.render(scene, resolution).astype(np.float32) / 127.5 - 1.0)
    embs.append(emb)
    masks.append(np.arange(max_length) < len(words))
    captions.append(scene.caption)
  out = {K.IMAGE: np.stack(images), K.TEXT_EMB: np.stack(embs), K.TEXT_MASK: np.stack(masks)}
  if lowres is not None:
    f = resolution // lowres
    b = out[K.IMAGE].shape[0]
    out[K.LOWRES] = out[K.IMAGE].reshape(b, lowres, f, lowres, f, 3).mean(axis=(2, 4))
  out[K.CAPTION] = np.asarray(captions)
  return out
