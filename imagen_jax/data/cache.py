"""`imagen-jax cache-embeddings`: the frozen T5 encoder over a task's examples, written as sharded
TFRecords holding the image, the caption, the token ids and the embeddings (bfloat16 bytes, unpadded
tokens only).

Shard i holds source records i, i + n, i + 2n, ... A shard is written to a temporary file and
renamed when complete, with its statistics beside it, so a rerun skips finished shards (resumable)
and a half-written shard is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import gin
import numpy as np
from etils import epath
from tqdm import tqdm

from imagen_jax import batch_keys as K
from imagen_jax.data import sources as sources_lib
from imagen_jax.data import tasks as tasks_lib
from imagen_jax.data import tf_setup
from imagen_jax.files import write_json
from imagen_jax.text.tokenizer import trim_with_eos

tf = tf_setup()
import seqio  # noqa: E402


@dataclasses.dataclass
class CacheSummary:
  examples: int = 0
  tokens: int = 0
  truncated: int = 0
  bad_records: int = 0
  bad_by_reason: dict = dataclasses.field(default_factory=dict)
  bytes_written: int = 0
  shards_written: int = 0
  shards_skipped: int = 0
  seconds: float = 0.0

  def add_shard(self, s: dict) -> None:
    for k in ("examples", "tokens", "truncated", "bad_records", "bytes_written"):
      setattr(self, k, getattr(self, k) + s[k])
    for k, v in s["bad_by_reason"].items():
      self.bad_by_reason[k] = self.bad_by_reason.get(k, 0) + v

  def line(self) -> str:
    rate = self.examples / self.seconds if self.seconds > 0 else float("nan")
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_by_reason.items()))
    return (
      f"examples={self.examples} tokens={self.tokens} truncated={self.truncated} "
      f"bad_records={self.bad_records}{f' ({reasons})' if reasons else ''} "
      f"bytes={self.bytes_written} "
      f"shards written={self.shards_written} skipped={self.shards_skipped} examples/s={rate:.1f}"
    )


def shard_path(output_dir: epath.Path, split: str, index: int, count: int) -> epath.Path:
  return output_dir / f"{split}.tfrecord-{index:05d}-of-{count:05d}"


def _bytes(v):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def serialize(
  key: bytes,
  image: bytes,
  caption: bytes,
  ground_truth: bytes,
  tokens: np.ndarray,
  embeddings: np.ndarray,
  source_size: int = 0,
) -> bytes:
  """One cache record; `embeddings` is (num_tokens, d_model) and stored as bfloat16 bytes."""
  import ml_dtypes

  n = int(tokens.shape[0])
  feats = {
    K.KEY: _bytes(key),
    K.IMAGE: _bytes(image),
    K.CAPTION: _bytes(caption),
    K.GROUND_TRUTH: _bytes(ground_truth),
    K.TOKENS: tf.train.Feature(
      int64_list=tf.train.Int64List(value=tokens.astype(np.int64).tolist())
    ),
    "num_tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=[n])),
    K.SOURCE_SIZE: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(source_size)])),
    "embeddings": _bytes(np.ascontiguousarray(embeddings[:n].astype(ml_dtypes.bfloat16)).tobytes()),
  }
  return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _write_metadata(output_dir: epath.Path, meta: dict) -> None:
  path = output_dir / tasks_lib.METADATA
  if path.is_file():
    old = json.loads(path.read_text())
    fixed = ("task", "d_model", "max_length", "num_shards", "encoder")
    diff = [f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in fixed if old.get(k) != meta.get(k)]
    if diff:
      raise sources_lib.DataError(
        f"{output_dir} holds a cache made with other settings ({'; '.join(diff)}); "
        "use a new output directory"
      )
    meta = dict(old, splits=sorted(set(old["splits"]) | set(meta["splits"])))
  write_json(path, meta, indent=2)


@gin.configurable
def cache_embeddings(
  task_name: str = gin.REQUIRED,
  output_dir: str = gin.REQUIRED,
  encoder_checkpoint: str = gin.REQUIRED,
  encoder_size: Optional[str] = None,
  split: str = "train",
  num_shards: int = 4,
  batch_size: int = 64,
  max_length: int = 128,
  max_examples: Optional[int] = None,
  stop_after_shards: Optional[int] = None,
  progress: bool = True,
) -> CacheSummary:
  """Encodes `task_name`'s examples with the frozen T5 encoder and writes the cache (resumable).

  max_examples caps each shard (for smoke tests); stop_after_shards stops after writing that many
  new shards (to test resumption).
  """
  import jax

  from imagen_jax import partitioning
  from imagen_jax.gin_utils import require
  from imagen_jax.text import checkpoints as ckpt_lib
  from imagen_jax.text import t5
  from imagen_jax.text.encoder import TextEncoder

  require(
    "cache_embeddings",
    task_name=task_name,
    output_dir=output_dir,
    encoder_checkpoint=encoder_checkpoint,
  )
  t0 = time.perf_counter()
  task = seqio.get_mixture_or_task(task_name)
  config = None if encoder_size is None else t5.t5_config(encoder_size)
  config, params = ckpt_lib.load_any(encoder_checkpoint, config)
  out = epath.Path(output_dir)  # local or cloud: TFRecords are written through tf.io.gfile
  out.mkdir(parents=True, exist_ok=True)
  where = (
    encoder_checkpoint if "://" in str(encoder_checkpoint) else Path(encoder_checkpoint).resolve()
  )
  encoder_id = f"{where} d_model={config.d_model} layers={config.num_layers}"
  _write_metadata(
    out,
    {
      "task": task_name,
      "d_model": config.d_model,
      "max_length": max_length,
      "num_shards": num_shards,
      "encoder": encoder_id,
      "splits": [split],
      "embedding_dtype": "bfloat16",
    },
  )
  n_dev = jax.device_count()
  mesh = partitioning.create_mesh(data=-1) if n_dev > 1 and batch_size % n_dev == 0 else None
  encoder = TextEncoder(config, params, mesh=mesh, batch_size=batch_size)
  tasks_lib.write_null_text(out, encoder, max_length)

  summary = CacheSummary()
  bar = tqdm(
    total=num_shards, desc=f"cache {task_name}/{split}", unit="shard", disable=not progress
  )
  for index in range(num_shards):
    final = shard_path(out, split, index, num_shards)
    stats_file = out / f"{split}.stats-{index:05d}-of-{num_shards:05d}.json"
    if final.is_file() and stats_file.is_file():
      summary.add_shard(json.loads(stats_file.read_text()))
      summary.shards_skipped += 1
      bar.update(1)
      continue
    if stop_after_shards is not None and summary.shards_written >= stop_after_shards:
      break
    shard = _write_shard(
      task, split, index, num_shards, final, encoder, batch_size, max_length, max_examples
    )
    stats_file.write_text(json.dumps(shard))
    summary.add_shard(shard)
    summary.shards_written += 1
    bar.update(1)
  bar.close()
  summary.seconds = time.perf_counter() - t0
  return summary


def _write_shard(
  task, split, index, count, final: epath.Path, encoder, batch_size, max_length, max_examples
) -> dict:
  ds = task.get_dataset(
    split=split,
    shuffle=False,
    shard_info=seqio.ShardInfo(index=index, num_shards=count),
    sequence_length=None,
    use_cached=False,
    try_in_mem_cache=False,
  )
  if max_examples is not None:
    ds = ds.take(max_examples)
  tmp = final.with_name(final.name + ".incomplete")
  stats = {"examples": 0, "tokens": 0, "truncated": 0}
  with tf.io.TFRecordWriter(str(tmp)) as writer:
    pending = []

    def flush():
      tokens = np.zeros((len(pending), max_length), np.int32)
      for i, p in enumerate(pending):
        tokens[i, : len(p["ids"])] = p["ids"]
      emb, _ = encoder.encode(tokens)
      for i, p in enumerate(pending):
        n = len(p["ids"])
        writer.write(
          serialize(
            p[K.KEY],
            p[K.IMAGE],
            p[K.CAPTION],
            p[K.GROUND_TRUTH],
            p["ids"],
            emb[i, :n],
            p[K.SOURCE_SIZE],
          )
        )
        stats["tokens"] += n
      stats["examples"] += len(pending)
      pending.clear()

    for ex in ds.as_numpy_iterator():
      ids, truncated = trim_with_eos(np.asarray(ex[K.TOKENS]), max_length)
      stats["truncated"] += int(truncated)
      pending.append(
        {
          K.KEY: ex[K.KEY],
          K.IMAGE: ex[K.IMAGE],
          K.CAPTION: ex[K.CAPTION],
          K.GROUND_TRUTH: ex[K.GROUND_TRUTH],
          K.SOURCE_SIZE: int(ex.get(K.SOURCE_SIZE, 0)),
          "ids": ids,
        }
      )
      if len(pending) == batch_size:
        flush()
    if pending:
      flush()
  src_stats = task.source.stats.get((split, index))
  stats["bad_records"] = src_stats.bad if src_stats else 0
  stats["bad_by_reason"] = dict(src_stats.skipped) if src_stats else {}
  stats["source_sizes"] = (
    {str(k): v for k, v in sorted((src_stats.source_sizes or {}).items())} if src_stats else {}
  )
  stats["bytes_written"] = int(tmp.stat().length)
  tmp.replace(final)
  return stats
