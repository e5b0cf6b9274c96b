"""Image-caption sources and the validation every record passes through.

A source yields raw records {'key', 'image' (encoded bytes or an HxWxC uint8 array), 'caption'}.
`clean_records` decodes each image with Pillow, converts any mode (greyscale, RGBA, CMYK, palette,
16-bit) to RGB, rejects tiny images and missing/empty captions, records the source's shorter side
(stages skip sources smaller than their output), resizes to the cache resolution and re-encodes as
PNG. Bad records are skipped and counted by reason; a source where most records are
bad fails with a clear error.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

import numpy as np
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
  # kept records by the shorter side of their source image (stages skip sources smaller than
  # their output: pipeline.StageDataConfig.min_source_size)
  source_sizes: Dict[int, int] = dataclasses.field(default_factory=collections.Counter)

  @property
  def bad(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
    conv = ", ".join(f"{k}={v}" for k, v in sorted(self.converted.items())) or "none"
    return (
      f"records seen={self.seen} kept={self.kept} skipped={self.bad} ({reasons}); "
      f"mode conversions: {conv}"
    )


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


def clean_records(
  records: Iterable[dict],
  stats: SourceStats,
  image_size: Optional[int] = None,
  min_image_size: int = 16,
  max_bad_fraction: float = 0.5,
  check_after: int = 20,
) -> Iterator[dict]:
  """Validated records {'key', 'image' (PNG bytes, RGB), 'caption' (str), ...extra fields kept}."""
  for rec in records:
    stats.seen += 1
    reason = rec.get("error")  # set by a source that could not even parse the record
    caption = rec.get("caption")
    if isinstance(caption, bytes):
      try:
        caption = caption.decode("utf-8")
      except UnicodeDecodeError:
        reason = "caption_not_utf8"
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
      img = resize_center_crop(img, image_size)
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
