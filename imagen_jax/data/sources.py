"""Image-caption sources and the validation every record passes through.

A source yields raw records {'key', 'image' (encoded bytes or an HxWxC uint8 array), 'caption'}:
image folders, JSONL, tfds, webdataset `.tar` shards and parquet files as img2dataset writes them
(local or cloud paths, through `etils.epath`). `clean_records` decodes each image with Pillow,
converts any mode (greyscale, RGBA, CMYK, palette, 16-bit) to RGB, rejects tiny images and
missing/empty captions, optionally cleans captions (URLs, HTML entities, whitespace), records the
source's shorter side (stages skip sources smaller than their output), centre-crops or pads to a
square at the cache resolution and re-encodes as PNG. Bad records are skipped and counted by
reason; a source where most records are bad fails with a clear error.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError

from imagen_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(UserError):
  """A data source is unusable (missing, or mostly bad records)."""


@dataclasses.dataclass
class SourceStats:
  seen: int = 0
  kept: int = 0
  skipped: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  converted: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  # kept records whose caption the cleaning changed, by what it removed
  cleaned: Dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  # kept records by the shorter side of their source image (stages skip sources smaller than
  # their output: pipeline.StageDataConfig.min_source_size)
  source_sizes: Dict[int, int] = dataclasses.field(default_factory=collections.Counter)

  @property
  def bad(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
    conv = ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items())) or "none"
    line = (
      f"records seen={self.seen} kept={self.kept} skipped={self.bad} ({reasons}); "
      f"mode conversions: {conv}"
    )
    if self.cleaned:
      line += "; captions cleaned: " + ", ".join(
        f"{k}={v}" for k, v in sorted(self.cleaned.items())
      )
    return line


def to_rgb(img: Image.Image) -> Image.Image:
  """Any Pillow mode to RGB; transparent pixels composited on white."""
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    arr = np.asarray(img, np.float64)
    arr = (255.0 * arr / max(arr.max(), 1.0)).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  return img.convert("RGB")  # L, 1, CMYK, YCbCr, P without transparency, F, ...


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
  """Shorter side to `size` (antialiased), then the centre square."""
  return ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def resize_pad(img: Image.Image, size: int, fill=(255, 255, 255)) -> Image.Image:
  """Longer side to `size` (antialiased), centred on a `fill` square: nothing is cropped away."""
  return ImageOps.pad(img, (size, size), method=Image.Resampling.BICUBIC, color=fill)


CROPS = {"center": resize_center_crop, "pad": resize_pad}

_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_SPACE = re.compile(r"\s+")


def clean_caption(caption: str) -> tuple:
  """Web-caption cleaning: URLs, HTML tags and entities removed (entities decoded), whitespace
  collapsed.

  Args:
    caption: the raw caption.

  Returns:
    (cleaned caption, tuple of what was removed: 'url', 'html_tag', 'html_entity', 'whitespace').
  """
  what = []
  text = caption
  if _URL.search(text):
    text, what = _URL.sub(" ", text), what + ["url"]
  if _TAG.search(text):
    text, what = _TAG.sub(" ", text), what + ["html_tag"]
  if _ENTITY.search(text):
    text, what = html.unescape(text), what + ["html_entity"]
  collapsed = _SPACE.sub(" ", text).strip()
  if collapsed != text.strip() or (not what and collapsed != caption):
    what.append("whitespace")
  return collapsed, tuple(what)


def clean_records(
  records: Iterable[dict],
  stats: SourceStats,
  image_size: Optional[int] = None,
  min_image_size: int = 16,
  max_bad_fraction: float = 0.5,
  check_after: int = 20,
  crop: str = "center",
  clean_captions: bool = False,
) -> Iterator[dict]:
  """Validated records {'key', 'image' (PNG bytes, RGB), 'caption' (str), ...extra fields kept}.

  Args:
    records: raw records from a source.
    stats: counts what is kept, skipped (by reason), converted and cleaned.
    image_size: the square the images are stored at (None: their own size).
    min_image_size: records whose shorter side is smaller are skipped (`image_too_small`).
    max_bad_fraction: fail when more of the records than this are bad.
    check_after: ...once this many records have been seen.
    crop: 'center' (shorter side to image_size, centre square) or 'pad' (longer side to
      image_size on a white square).
    clean_captions: remove URLs and HTML tags/entities, collapse whitespace (`clean_caption`).

  Yields:
    The validated records.
  """
  if crop not in CROPS:
    raise UserError(f"crop must be one of {sorted(CROPS)}, got {crop!r}")
  for rec in records:
    stats.seen += 1
    reason = rec.get("error")  # set by a source that could not even parse the record
    caption = rec.get("caption")
    if isinstance(caption, bytes):
      try:
        caption = caption.decode("utf-8")
      except UnicodeDecodeError:
        reason = "caption_not_utf8"
    if reason is None and caption is not None and clean_captions:
      caption, removed = clean_caption(str(caption))
      for what in removed:
        stats.cleaned[what] += 1
    if reason is None and (caption is None or not str(caption).strip()):
      reason = "missing_or_empty_caption"
    img = None
    if reason is None:
      try:
        data = rec.get("image")
        if data is None:
          raise FileNotFoundError
        if isinstance(data, (bytes, bytearray)):
          img = Image.open(io.BytesIO(data))
          img.load()
        else:
          arr = np.asarray(data)
          img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
      except FileNotFoundError:
        reason = "missing_image"
      except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError):
        reason = "corrupt_image"
    if reason is None and min(img.size) < min_image_size:
      reason = "image_too_small"
    if reason is not None:
      stats.skipped[reason] += 1
      _check_bad_fraction(stats, max_bad_fraction, check_after)
      continue
    if img.mode != "RGB":
      stats.converted[img.mode] += 1
    img = to_rgb(img)
    source_size = int(min(img.size))
    stats.source_sizes[source_size] += 1
    if image_size is not None:
      img = CROPS[crop](img, image_size)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    stats.kept += 1
    out = {k: v for k, v in rec.items() if k not in ("image", "caption", "error")}
    out.update(image=buf.getvalue(), caption=str(caption).strip(), source_size=source_size)
    yield out
  _check_bad_fraction(stats, max_bad_fraction, 1)


def _check_bad_fraction(stats: SourceStats, max_bad_fraction: float, check_after: int) -> None:
  if stats.seen >= check_after and stats.bad > max_bad_fraction * stats.seen:
    raise DataError(f"more than {max_bad_fraction:.0%} of the records are bad ({stats.summary()})")


def folder_records(folder) -> Iterator[dict]:
  """img2dataset layout: every image file with a same-named .txt caption beside it (sorted
  order)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"image folder not found: {folder}")
  files = sorted(
    p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
  )
  if not files:
    raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
  for p in files:
    txt = p.with_suffix(".txt")
    caption = txt.read_bytes() if txt.is_file() else None
    yield {"key": str(p.relative_to(folder)), "image": p.read_bytes(), "caption": caption}


def jsonl_records(path) -> Iterator[dict]:
  """A JSONL file of {"image": path (relative to the file's folder or absolute), "caption":
  text}."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"JSONL file not found: {path}")
  with path.open("rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        image_path = path.parent / rec["image"]
      except (json.JSONDecodeError, KeyError, TypeError):
        yield {"key": f"{path.name}:{lineno}", "error": "malformed_record"}
        continue
      image = image_path.read_bytes() if image_path.is_file() else None
      yield {"key": f"{path.name}:{lineno}", "image": image, "caption": rec.get("caption")}


WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _split_member(name: str):
  """webdataset's naming: 'dir/key.ext1.ext2' -> ('dir/key', 'ext1.ext2'); the key ends at the
  first dot of the file name."""
  folder, _, base = name.rpartition("/")
  stem, dot, ext = base.partition(".")
  return (folder + "/" + stem if folder else stem), ext.lower() if dot else ""


def _json_field(data: bytes, field: str):
  tree = json.loads(data)
  for k in field.split("/"):
    tree = tree[k]
  return tree


def _webdataset_sample(shard: str, key: str, files: Dict[str, bytes], caption_field: Optional[str]):
  rec: dict = {"key": f"{shard}:{key}", "image": None, "caption": None}
  for ext in WEBDATASET_IMAGE_EXTENSIONS:
    if ext in files:
      rec["image"] = files[ext]
      break
  if caption_field is None:
    rec["caption"] = files.get("txt")
  elif "json" in files:
    try:
      rec["caption"] = _json_field(files["json"], caption_field)
    except ValueError:  # not JSON
      rec["error"] = "malformed_record"
    except (KeyError, TypeError, IndexError):  # no such field: counted as a missing caption
      pass
  return rec


def webdataset_records(shard, caption_field: Optional[str] = None) -> Iterator[dict]:
  """The samples of one webdataset `.tar` shard (img2dataset's layout: `{key}.jpg`, `{key}.txt`,
  `{key}.json`), read in member order and grouped by key, local or cloud.

  Args:
    shard: the tar file (local path or `gs://...`).
    caption_field: None: the caption is the `.txt` member; else a '/'-path into the `.json` member.

  Yields:
    Raw records; a sample without an image reads `image` None (`missing_image`), without a caption
    `caption` None; a shard that is not a readable tar, or breaks off, yields one record with
    `error` 'corrupt_tar' after the samples read before the break.
  """
  name = str(shard)
  key, files = None, {}
  try:
    with epath.Path(shard).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if not member.isfile():
          continue
        k, ext = _split_member(member.name)
        if k != key and key is not None:
          yield _webdataset_sample(name, key, files, caption_field)
          files = {}
        key = k
        files[ext] = tar.extractfile(member).read()
      # tarfile ends quietly where a header is cut off or missing: only the end-of-archive block
      # (zeros) says that the shard is whole
      f.seek(tar.offset)
      end = f.read(tarfile.BLOCKSIZE)
      if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
        raise tarfile.ReadError("no end-of-archive marker: the shard is cut off")
  except (tarfile.TarError, OSError, EOFError, ValueError):
    files = {}  # the sample being read when the shard broke off is incomplete: dropped
    yield {"key": name, "error": "corrupt_tar"}
  if files:
    yield _webdataset_sample(name, key, files, caption_field)


def parquet_records(
  path,
  image_column: str = "jpg",
  caption_column: str = "caption",
  key_column: Optional[str] = "key",
) -> Iterator[dict]:
  """The rows of one parquet file (img2dataset's `--output_format parquet`: image bytes in `jpg`,
  the caption in `caption`; Hugging Face's image struct {bytes, path} also reads), one row group at
  a time, local or cloud.

  Args:
    path: the parquet file.
    image_column: the column of encoded image bytes (or of {bytes, path} structs).
    caption_column: the caption column.
    key_column: the column naming each row, if present (else file:row).

  Yields:
    Raw records; a file that is not readable parquet yields one record with `error`
    'corrupt_parquet'; missing columns fail with a DataError naming them.
  """
  import pyarrow.parquet as pq

  name = str(path)
  try:
    with epath.Path(path).open("rb") as f:
      pf = pq.ParquetFile(f)
      names = pf.schema_arrow.names
      missing = [c for c in (image_column, caption_column) if c not in names]
      if missing:
        raise DataError(f"{name}: no column {', '.join(missing)} (has {', '.join(names)})")
      cols = [image_column, caption_column] + ([key_column] if key_column in names else [])
      row = 0
      for group in range(pf.num_row_groups):
        table = pf.read_row_group(group, columns=cols).to_pydict()
        for i, (image, caption) in enumerate(zip(table[image_column], table[caption_column])):
          if isinstance(image, dict):
            image = image.get("bytes")
          key = table[key_column][i] if key_column in table else None
          yield {
            "key": f"{name}:{key if key is not None else row}",
            "image": image,
            "caption": caption,
          }
          row += 1
  except DataError:
    raise
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a file that is not parquet
    if type(e).__module__.startswith("pyarrow") or isinstance(e, OSError):
      yield {"key": name, "error": "corrupt_parquet"}
    else:
      raise


def sharded_file_records(
  files: Sequence, read: Callable[[object], Iterable[dict]], index: int, count: int
) -> Iterator[dict]:
  """Shard `index` of `count` of the records of several files: with at least `count` files, whole
  files (file i goes to shard i mod count), so each host or cache shard reads only its own files;
  with fewer, every file is read and record i goes to shard i mod count.

  Args:
    files: the files, in order.
    read: file -> its raw records.
    index: this shard.
    count: the number of shards.

  Yields:
    This shard's raw records, in order.
  """
  if len(files) >= count:
    for f in files[index::count]:
      yield from read(f)
    return
  i = 0
  for f in files:
    for rec in read(f):
      if i % count == index:
        yield rec
      i += 1


def tfds_records(
  name: str,
  split: str = "train",
  image_field: str = "image",
  caption_field: str = "captions/text",
  all_captions: bool = False,
  data_dir: Optional[str] = None,
) -> Iterator[dict]:
  """Any tfds image-caption dataset. `caption_field` is a '/'-path into the features; a sequence of
  captions gives its first (or, with all_captions, one record per caption)."""
  from imagen_jax.data import tf_setup

  tf_setup()
  import tensorflow_datasets as tfds

  ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
  for i, ex in enumerate(tfds.as_numpy(ds)):
    image = _get_path(ex, image_field)
    captions = _get_path(ex, caption_field)
    if isinstance(captions, np.ndarray) and captions.ndim >= 1:
      captions = list(captions) if all_captions else list(captions[:1])
    else:
      captions = [captions]
    for j, caption in enumerate(captions or [None]):
      yield {"key": f"{name}/{split}/{i}/{j}", "image": image, "caption": caption}


def _get_path(tree, path: str):
  for k in path.split("/"):
    if not isinstance(tree, dict) or k not in tree:
      raise DataError(
        f"feature {path!r} not found (have "
        f"{sorted(tree) if isinstance(tree, dict) else type(tree)})"
      )
    tree = tree[k]
  return tree
