"""Stage preprocessing and batching of the cached task: what the trainer consumes.

Per example (deterministic: its randomness is a stateless function of the seed and its position):
  - decode the stored image, resize (antialiased, bicubic) and centre-crop to the stage's size, or,
    for crop-trained stages (256->1024 trains on 64->256 crops of 1024 images), to `full_size`;
  - super-resolution stages: the low-resolution conditioning image is the target downsampled by
    the integer factor image_size / lowres_size with the resize that makes base targets (antialiased
    bicubic: one down-sampler for the whole cascade); crops of target and conditioning are taken at
    aligned offsets (multiples of the factor) of the full image and of its downsample;
  - records whose source image is smaller than the stage's output are skipped (min_source_size);
  - optional horizontal flip of both (off by default: it breaks "left of" captions);
  - pixels scaled to [-1, 1].
Batches: 'image' (B, H, W, 3) float32, 'lowres' (SR stages), 'text_emb' (B, L, D) bfloat16 (or
'tokens' in on-the-fly mode), 'text_mask' (B, L) bool, 'caption'. Each host reads its own shard of
the records; the order is fixed by the seed; the iterator's position is saved and restored with clu.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import numpy as np

from imagen_jax import batch_keys as K
from imagen_jax.data import tf_setup
from imagen_jax.errors import ConfigError
from imagen_jax.text.t5 import EOS_ID

tf = tf_setup()
import seqio  # noqa: E402
from clu.data import dataset_iterator as clu_iter  # noqa: E402


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StageDataConfig:
  image_size: int = 64  # target resolution (the crop size of crop-trained stages)
  lowres_size: Optional[int] = None  # SR stages: conditioning resolution (image_size / integer)
  full_size: Optional[int] = None  # crop-trained stages: resolution the crops are taken from
  random_flip: bool = False
  batch_size: int = 2048  # global batch; each host gets batch_size / process_count
  shuffle_buffer: int = 10_000
  seed: int = 0
  embeddings: str = "cached"  # 'cached' (text_emb in the records) | 'on_the_fly' (tokens only)
  max_length: int = 128  # on-the-fly mode: tokens trimmed (EOS kept) and padded to this
  # Skip records whose source image's shorter side is below this (an upscaled source would teach an
  # SR stage to reproduce blur). None: the stage's output size (full_size for crop-trained stages);
  # 0: keep every record. Records of caches written before source sizes were recorded are kept.
  min_source_size: Optional[int] = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.lowres_size is not None and self.image_size % self.lowres_size:
      raise ConfigError(
        f"image_size {self.image_size} must be a multiple of lowres_size {self.lowres_size}"
      )
    if self.full_size is not None:
      if self.lowres_size is None:
        raise ConfigError("full_size (crop training) needs lowres_size")
      if self.full_size < self.image_size or self.full_size % (self.image_size // self.lowres_size):
        raise ConfigError(
          f"full_size {self.full_size} must be >= image_size and a multiple of the SR factor"
        )
    if self.embeddings not in ("cached", "on_the_fly"):
      raise ConfigError(f"embeddings must be 'cached' or 'on_the_fly', got {self.embeddings!r}")

  @property
  def source_size_floor(self) -> int:
    """The smallest source (shorter side, pixels) this stage trains on; 0: no floor."""
    if self.min_source_size is not None:
      return int(self.min_source_size)
    return int(self.full_size or self.image_size)

  @property
  def factor(self) -> int:
    return 1 if self.lowres_size is None else self.image_size // self.lowres_size


def _resize_square(img, size: int):
  """Shorter side to `size` (antialiased bicubic), centre crop to size x size; float32 in [0,
  255]."""
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
  nh = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
  nw = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
  img = tf.cond(
    tf.logical_and(tf.equal(h, size), tf.equal(w, size)),
    lambda: img,
    lambda: tf.clip_by_value(
      tf.image.resize(img, (nh, nw), method="bicubic", antialias=True), 0.0, 255.0
    ),
  )
  top, left = (nh - size) // 2, (nw - size) // 2
  return tf.ensure_shape(img[top : top + size, left : left + size, :], [size, size, 3])


def downsample(img, size: int):
  """(H, W, 3) float32 in [0, 255] -> (size, size, 3): the cascade's one down-sampler (antialiased
  bicubic, clipped), the same resize that makes the base stage's targets, so an SR stage is trained
  on the kind of low-res image a base stage learns to draw (`images.downsample` is its JAX twin)."""
  return tf.clip_by_value(
    tf.image.resize(img, (size, size), method="bicubic", antialias=True), 0.0, 255.0
  )


def stage_example(index, ex, config: StageDataConfig):
  """One record -> stage example; randomness from (seed, index) only."""
  img = tf.cast(tf.io.decode_image(ex[K.IMAGE], channels=3, expand_animations=False), tf.float32)
  seed = tf.stack([tf.cast(config.seed, tf.int64), tf.cast(index, tf.int64)])
  out = {K.TEXT_MASK: ex[K.TEXT_MASK], K.CAPTION: ex[K.CAPTION], K.KEY: ex[K.KEY]}
  if config.embeddings == "cached":
    out[K.TEXT_EMB] = ex[K.TEXT_EMB]
  else:
    out[K.TOKENS] = ex[K.TOKENS]
  f = config.factor
  if config.full_size is None:
    target = _resize_square(img, config.image_size)
    lowres = None
    if config.lowres_size is not None:
      lowres = downsample(target, config.lowres_size)
  else:
    full = _resize_square(img, config.full_size)
    low_full = downsample(full, config.full_size // f)
    steps = (config.full_size - config.image_size) // f + 1
    off = tf.random.stateless_uniform([2], seed=seed, minval=0, maxval=steps, dtype=tf.int32)
    target = full[
      off[0] * f : off[0] * f + config.image_size, off[1] * f : off[1] * f + config.image_size
    ]
    target = tf.ensure_shape(target, [config.image_size, config.image_size, 3])
    lowres = low_full[off[0] : off[0] + config.lowres_size, off[1] : off[1] + config.lowres_size]
    lowres = tf.ensure_shape(lowres, [config.lowres_size, config.lowres_size, 3])
  if config.random_flip:
    flip = tf.random.stateless_uniform([], seed=seed + 1) < 0.5
    target = tf.cond(flip, lambda: target[:, ::-1], lambda: target)
    if lowres is not None:
      lowres = tf.cond(flip, lambda: lowres[:, ::-1], lambda: lowres)
  out[K.IMAGE] = target / 127.5 - 1.0
  if lowres is not None:
    out[K.LOWRES] = lowres / 127.5 - 1.0
  return out


def stage_dataset(
  task_name: str,
  config: StageDataConfig,
  split: str = "train",
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: Optional[int] = None,
):
  """Batches of `task_name` (the cached task, or a source task in on-the-fly mode) for this host."""
  if config.batch_size % process_count:
    raise ConfigError(f"batch_size {config.batch_size} is not divisible by {process_count} hosts")
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(
    split=split,
    shuffle=False,
    seed=config.seed,
    shard_info=seqio.ShardInfo(process_index, process_count) if process_count > 1 else None,
    sequence_length=None,
    num_epochs=1,
    try_in_mem_cache=False,
  )
  floor = config.source_size_floor
  if floor > 0:
    ds = ds.filter(lambda ex: (ex[K.SOURCE_SIZE] == 0) | (ex[K.SOURCE_SIZE] >= floor))
  if config.embeddings == "on_the_fly":
    ds = pad_tokens_dataset(ds, config.max_length).map(
      lambda ex: {**ex, K.TEXT_MASK: ex[K.TOKENS] > 0}
    )
  opts = tf.data.Options()
  opts.deterministic = True
  ds = ds.with_options(opts)
  if config.shuffle_buffer > 1:
    ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
  ds = ds.repeat(num_epochs)
  ds = ds.enumerate().map(
    lambda i, ex: stage_example(i, ex, config),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  return ds.batch(config.batch_size // process_count, drop_remainder=True).prefetch(2)


def source_size_skips(counts: dict, config: StageDataConfig) -> dict:
  """What the stage's source-size floor skips of a cache: {'records', 'kept', 'skipped_by_reason':
  {'source_smaller_than_<N>px': n}} from the cache's per-size counts (`tasks.source_size_counts`;
  records of unknown size are kept)."""
  floor = config.source_size_floor
  total = sum(counts.values())
  small = sum(n for size, n in counts.items() if 0 < size < floor) if floor > 0 else 0
  reasons = {f"source_smaller_than_{floor}px": small} if small else {}
  return {"records": total, "kept": total - small, "skipped_by_reason": reasons}


def pad_tokens_dataset(ds, max_length: int):
  """On-the-fly mode with a source task: trim to max_length - 1, append EOS, pad (like the
  cache)."""

  def fn(ex):
    ids = ex[K.TOKENS][: max_length - 1]
    ids = tf.concat([ids, [EOS_ID]], axis=0)
    return dict(ex, tokens=tf.pad(ids, [[0, max_length - tf.shape(ids)[0]]]))

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


class StageIterator:
  """NumPy batches with a checkpointable position (clu's TfDatasetIterator over tf.data).

  save(path) / restore(path) write and read the iterator state (shuffle buffer and position), so a
  resumed run sees the same next batch.
  """

  def __init__(self, dataset):
    self._it = clu_iter.TfDatasetIterator(dataset, checkpoint=True)

  def __iter__(self):
    return self

  def __next__(self):
    return self._it.get_next()

  def save(self, path) -> None:
    self._it.save(str(path))

  def restore(self, path) -> None:
    self._it.restore(str(path))


def box_downsample(images: np.ndarray, factor: int) -> np.ndarray:
  """NumPy reference: mean over factor x factor blocks of (B, H, W, C)."""
  b, h, w, c = images.shape
  return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
