"""seqio Tasks: one per image-caption source (captions tokenized with the T5 vocabulary), and the
"cached" task that reads the records `cache-embeddings` writes (images and embeddings together, one
sequential stream, no join)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import gin
from etils import epath

from imagen_jax import batch_keys as K
from imagen_jax.data import sources as sources_lib
from imagen_jax.data import synthetic, tf_setup
from imagen_jax.errors import ConfigError, MissingFileError
from imagen_jax.files import expand_paths
from imagen_jax.gin_utils import require

tf = tf_setup()
import seqio  # noqa: E402  (after tf_setup: TensorFlow must not grab the accelerators)

RECORD_SIGNATURE = {
  K.KEY: tf.TensorSpec((), tf.string),
  K.IMAGE: tf.TensorSpec((), tf.string),
  K.CAPTION: tf.TensorSpec((), tf.string),
  K.GROUND_TRUTH: tf.TensorSpec((), tf.string),
  K.SOURCE_SIZE: tf.TensorSpec((), tf.int64),
}


class CaptionedImageSource(seqio.DataSource):
  """A seqio DataSource over a Python record iterator, validated by `sources.clean_records`.

  Sharding happens *before* validation (record i goes to shard i mod num_shards), so each shard
  decodes only its own images and its bad-record counts are its own (`stats[(split, shard)]`).
  """

  def __init__(
    self,
    records_fn: Callable[..., Iterable[dict]],
    image_size: Optional[int],
    splits: Tuple[str, ...] = ("train",),
    min_image_size: int = 16,
    max_bad_fraction: float = 0.5,
    sharded: bool = False,
    crop: str = "center",
    clean_captions: bool = False,
  ):
    """A source task's records.

    Args:
      records_fn: split -> raw records; with `sharded`, (split, index, count) -> shard `index` of
        `count` of them (sources of many files hand each shard whole files).
      image_size: the square the images are stored at (None: their own size).
      splits: the splits the source has.
      min_image_size: smaller images are skipped.
      max_bad_fraction: fail when more records than this are bad.
      sharded: see records_fn.
      crop: 'center' or 'pad' (`sources.clean_records`).
      clean_captions: clean web captions (`sources.clean_caption`).
    """
    super().__init__(splits=splits, num_input_examples=None, caching_permitted=True)
    self._records_fn = records_fn
    self._image_size = image_size
    self._min_image_size = min_image_size
    self._max_bad_fraction = max_bad_fraction
    self._sharded = sharded
    self._crop = crop
    self._clean_captions = clean_captions
    self.stats: Dict[Tuple[str, int], sources_lib.SourceStats] = {}

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str):
    return [split]

  def get_dataset(
    self,
    split: str = "train",
    shuffle: bool = True,
    seed: Optional[int] = None,
    shard_info: Optional[seqio.ShardInfo] = None,
    *,
    sequence_length=None,
    use_cached=False,
    num_epochs: Optional[int] = 1,
  ):
    del (
      shuffle,
      seed,
      sequence_length,
      use_cached,
    )  # records come in source order; shuffle downstream
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    stats = sources_lib.SourceStats()
    self.stats[(split, index)] = stats

    def gen():
      if self._sharded:
        raw = self._records_fn(split, index, count)
      else:
        raw = (r for i, r in enumerate(self._records_fn(split)) if i % count == index)
      for rec in sources_lib.clean_records(
        raw,
        stats,
        self._image_size,
        self._min_image_size,
        self._max_bad_fraction,
        crop=self._crop,
        clean_captions=self._clean_captions,
      ):
        yield {
          K.KEY: str(rec.get(K.KEY, "")),
          K.IMAGE: rec[K.IMAGE],
          K.CAPTION: rec[K.CAPTION],
          K.GROUND_TRUTH: rec.get(K.GROUND_TRUTH, ""),
          K.SOURCE_SIZE: int(rec.get(K.SOURCE_SIZE, 0)),
        }

    ds = tf.data.Dataset.from_generator(gen, output_signature=RECORD_SIGNATURE)
    return ds.repeat(num_epochs) if num_epochs != 1 else ds


def _caption_to_tokens(ds):
  return ds.map(lambda ex: {**ex, K.TOKENS: ex[K.CAPTION]}, num_parallel_calls=tf.data.AUTOTUNE)


def vocabulary(spm_path) -> seqio.SentencePieceVocabulary:
  if not Path(spm_path).is_file():
    raise MissingFileError(f"sentencepiece model not found: {spm_path}")
  return seqio.SentencePieceVocabulary(str(spm_path))


def _add(name: str, source, preprocessors, vocab_path, replace: bool):
  if replace and name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  vocab = vocabulary(vocab_path) if vocab_path is not None else seqio.PassThroughVocabulary(size=0)
  output_features = {K.TOKENS: seqio.Feature(vocab, add_eos=True, dtype=tf.int32)}
  return seqio.TaskRegistry.add(
    name, source=source, preprocessors=preprocessors, output_features=output_features
  )


@gin.configurable
def register_source_task(
  name: str = gin.REQUIRED,
  kind: str = gin.REQUIRED,
  vocab_path: str = gin.REQUIRED,
  image_size: Optional[int] = None,
  path: Optional[str] = None,
  tfds_name: Optional[str] = None,
  tfds_data_dir: Optional[str] = None,
  image_field: str = "image",
  caption_field: str = "captions/text",
  all_captions: bool = False,
  seed: int = 0,
  num_examples: int = 1000,
  splits: Optional[Tuple[str, ...]] = None,
  max_bad_fraction: float = 0.5,
  replace: bool = True,
  json_caption_field: Optional[str] = None,
  image_column: str = "jpg",
  caption_column: str = "caption",
  crop: str = "center",
  clean_captions: bool = False,
) -> seqio.Task:
  """Registers a source as a seqio Task whose examples carry 'tokens' (the caption, T5-tokenized,
  not yet trimmed: the cache writer trims, appends EOS and counts truncation).

  kind: 'folder' (path: image files with same-named .txt captions), 'jsonl' (path), 'tfds'
  (tfds_name, image_field, caption_field, all_captions, tfds_data_dir), 'webdataset' (path: tar
  shards as a glob, brace range `{00000..00099}`, comma list; caption from `.txt`, or with
  json_caption_field from that '/'-path into `.json`),
  'parquet' (path: files, as for webdataset; image_column, caption_column), 'synthetic' (seed,
  num_examples; 'validation' uses seed + 1). Paths may be cloud paths (`gs://...`). Tar shards and
  parquet files are split across hosts (and cache shards) by whole files when there are enough.
  image_size: resolution the stored images are resized to (the largest stage's; None keeps the
  original, synthetic renders at 64), by centre crop or, with crop='pad', padding to a square.
  clean_captions: strip URLs and HTML, collapse whitespace (counted).
  """
  require(
    "register_source_task",
    name=name,
    kind=kind,
    vocab_path=vocab_path,
    path=path,
    tfds_data_dir=tfds_data_dir,
  )
  if kind in ("folder", "jsonl", "webdataset", "parquet") and not path:
    raise ConfigError(f"a {kind} source needs path")
  if kind in ("folder", "jsonl") and "://" not in str(path) and not Path(path).exists():
    raise MissingFileError(f"the {kind} source's path {path} does not exist")
  sharded = False
  if kind in ("webdataset", "parquet"):
    files = expand_paths(path, what=f"{kind} files")
    if kind == "webdataset":
      read = functools.partial(sources_lib.webdataset_records, caption_field=json_caption_field)
    else:
      read = functools.partial(
        sources_lib.parquet_records, image_column=image_column, caption_column=caption_column
      )
    records = lambda split, index, count: sources_lib.sharded_file_records(
      files, read, index, count
    )
    sharded = True
  elif kind == "folder":
    records = lambda split: sources_lib.folder_records(path)
  elif kind == "jsonl":
    records = lambda split: sources_lib.jsonl_records(path)
  elif kind == "tfds":
    if not tfds_name:
      raise ConfigError("a tfds source needs tfds_name")
    records = lambda split: sources_lib.tfds_records(
      tfds_name, split, image_field, caption_field, all_captions, tfds_data_dir
    )
  elif kind == "synthetic":
    res = image_size or 64
    records = lambda split: synthetic.examples(
      seed if split == "train" else seed + 1, num_examples, res
    )
  else:
    raise ConfigError(
      f"unknown source kind {kind!r}; expected folder, jsonl, tfds, webdataset, parquet or "
      "synthetic"
    )
  if splits is None:
    splits = ("train", "validation") if kind in ("tfds", "synthetic") else ("train",)
  source = CaptionedImageSource(
    records,
    image_size,
    splits=tuple(splits),
    max_bad_fraction=max_bad_fraction,
    sharded=sharded,
    crop=crop,
    clean_captions=clean_captions,
  )
  preprocessors = [
    _caption_to_tokens,
    functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
  ]
  return _add(name, source, preprocessors, vocab_path, replace)


# ---------------------------------------------------------------------------------- cached records

METADATA = "metadata.json"
CACHE_DIRS: Dict[str, str] = {}  # registered cached task -> its directory (for its statistics)

FEATURES = {
  K.KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
  K.IMAGE: tf.io.FixedLenFeature([], tf.string),
  K.CAPTION: tf.io.FixedLenFeature([], tf.string),
  K.GROUND_TRUTH: tf.io.FixedLenFeature([], tf.string, default_value=""),
  K.TOKENS: tf.io.VarLenFeature(tf.int64),
  "num_tokens": tf.io.FixedLenFeature([], tf.int64),
  "embeddings": tf.io.FixedLenFeature([], tf.string),
  # caches written before it was recorded read 0 (unknown: no stage skips them)
  K.SOURCE_SIZE: tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


NULL_TEXT = "null_text.npz"


def empty_prompt_tokens(max_length: int):
  """The tokens of the empty prompt: EOS, then padding (what T5 tokenizers give for "")."""
  import numpy as np

  from imagen_jax.text.t5 import EOS_ID

  tokens = np.zeros((1, max_length), np.int32)
  tokens[0, 0] = EOS_ID
  return tokens


def write_null_text(cache_dir, encoder, max_length: int) -> None:
  """Writes the encoder's embedding of the empty prompt (bfloat16-rounded, as the cache stores
  embeddings) and its mask: the null condition of stages trained with null_text='empty_prompt'."""
  import io

  import jax.numpy as jnp
  import numpy as np

  emb, mask = encoder.encode(empty_prompt_tokens(max_length))
  emb = np.asarray(jnp.asarray(emb[0]).astype(jnp.bfloat16).astype(jnp.float32))
  buf = io.BytesIO()
  np.savez(buf, emb=emb, mask=np.asarray(mask[0], bool))
  (epath.Path(cache_dir) / NULL_TEXT).write_bytes(buf.getvalue())


def read_null_text(cache_dir):
  """(emb (L, D) float32, mask (L,)) of the empty prompt a cache was written with."""
  import io

  import numpy as np

  path = epath.Path(cache_dir) / NULL_TEXT
  if not path.is_file():
    raise sources_lib.DataError(
      f"{cache_dir}: no {NULL_TEXT} (the empty prompt's embedding, written by cache-embeddings "
      "since 2026-12-07); re-run cache-embeddings into a new directory"
    )
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
    return np.asarray(f["emb"], np.float32), np.asarray(f["mask"], bool)


def read_metadata(cache_dir) -> dict:
  path = epath.Path(cache_dir) / METADATA
  if not path.is_file():
    raise sources_lib.DataError(f"{cache_dir}: no {METADATA}; not an embedding cache")
  return json.loads(path.read_text())


def decode_cached(ex, max_length: int, d_model: int):
  """Parsed record -> tokens / text_emb (bfloat16) / text_mask padded to max_length."""
  n = tf.cast(ex["num_tokens"], tf.int32)
  tokens = tf.cast(tf.sparse.to_dense(ex[K.TOKENS]), tf.int32)
  emb = tf.reshape(tf.io.decode_raw(ex["embeddings"], tf.bfloat16), [n, d_model])
  pad = max_length - n
  return {
    K.KEY: ex[K.KEY],
    K.IMAGE: ex[K.IMAGE],
    K.CAPTION: ex[K.CAPTION],
    K.GROUND_TRUTH: ex[K.GROUND_TRUTH],
    K.SOURCE_SIZE: ex[K.SOURCE_SIZE],
    K.TOKENS: tf.pad(tokens, [[0, pad]]),
    K.TEXT_EMB: tf.ensure_shape(tf.pad(emb, [[0, pad], [0, 0]]), [max_length, d_model]),
    K.TEXT_MASK: tf.range(max_length) < n,
  }


def source_size_counts(cache_dir, split: str = "train") -> dict:
  """{source image's shorter side: records} over the cache's shards (from their statistics files;
  empty for a cache written before source sizes were recorded)."""
  counts: dict = {}
  for path in sorted(epath.Path(cache_dir).glob(f"{split}.stats-*-of-*.json")):
    for size, n in json.loads(path.read_text()).get("source_sizes", {}).items():
      counts[int(size)] = counts.get(int(size), 0) + int(n)
  return counts


def cached_file_pattern(cache_dir, split: str) -> str:
  return str(epath.Path(cache_dir) / f"{split}.tfrecord-*-of-*")


@gin.configurable
def register_cached_task(
  name: str, cache_dir: str, vocab_path: Optional[str] = None, replace: bool = True
) -> seqio.Task:
  """The written cache as a seqio Task: records with image bytes, caption, tokens and embeddings.
  vocab_path (optional: the records hold token ids already) only labels the task's token feature."""
  meta = read_metadata(cache_dir)
  CACHE_DIRS[name] = str(cache_dir)
  source = seqio.TFExampleDataSource(
    split_to_filepattern={s: cached_file_pattern(cache_dir, s) for s in meta["splits"]},
    feature_description=FEATURES,
    reader_cls=tf.data.TFRecordDataset,
  )
  decode = lambda ds: ds.map(
    functools.partial(decode_cached, max_length=meta["max_length"], d_model=meta["d_model"]),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  return _add(name, source, [decode], vocab_path, replace)
