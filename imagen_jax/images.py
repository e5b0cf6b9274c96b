"""Images on disk and on screen: [-1, 1] floats <-> uint8 PNG, reading input folders, labelled
grids.

Pillow does the encoding and the text; nothing here imports TensorFlow.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from imagen_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_CELL = (
  128  # grid cells are at least this wide: small images are enlarged (nearest) for the labels
)


class ImageError(UserError):
  """An input image that cannot be used (unreadable, wrong size): reported in one line, exit code
  2."""


def to_uint8(x) -> np.ndarray:
  """[-1, 1] float images -> uint8 (round to nearest; values outside are clipped)."""
  x = np.asarray(x, np.float32)
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(x) -> np.ndarray:
  return np.asarray(x, np.float32) / 127.5 - 1.0


def downsample(images, size: int) -> np.ndarray:
  """(B, H, W, C) float images -> (B, size, size, C): the cascade's one down-sampler, antialiased
  bicubic (the data pipeline resizes base targets and SR conditioning images with TensorFlow's
  equivalent; tests check the two agree)."""
  import jax

  x = np.asarray(images, np.float32)
  b, _, _, c = x.shape
  return np.asarray(jax.image.resize(x, (b, size, size, c), "bicubic", antialias=True))


BILINEAR_GRIDS = ("tf1", "pytorch", "align_corners")


def bilinear_matrix(in_size: int, out_size: int, grid: str) -> np.ndarray:
  """(out_size, in_size) bilinear interpolation weights along one axis (no antialiasing).

  Args:
    in_size: the input length.
    out_size: the output length.
    grid: where output pixel i samples the input: 'tf1' at i * in/out (TF1's resize_bilinear,
      the FID Inception's), 'pytorch' at (i + 0.5) in/out - 0.5 clamped at 0 (F.interpolate,
      align_corners=False), 'align_corners' at i (in - 1)/(out - 1) (align_corners=True,
      DeepFloyd IF's stage II upsampling).

  Returns:
    The weights, float32.
  """
  if grid not in BILINEAR_GRIDS:
    raise UserError(f"bilinear grid must be one of {BILINEAR_GRIDS}, got {grid!r}")
  i = np.arange(out_size, dtype=np.float64)
  if grid == "tf1":
    src = i * (in_size / out_size)
  elif grid == "pytorch":
    src = np.maximum((i + 0.5) * (in_size / out_size) - 0.5, 0.0)
  else:
    src = i * ((in_size - 1) / max(out_size - 1, 1))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def save_png(path, image_uint8: np.ndarray) -> None:
  """Writes atomically (temporary name, then rename): a reader never sees half a file. Local or
  cloud paths (`etils.epath`)."""
  from etils import epath
  from PIL import Image

  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image_uint8, np.uint8)).save(buf, format="PNG")
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)


def read_image(path) -> np.ndarray:
  """(H, W, 3) uint8; ImageError when the file is not a readable image."""
  from etils import epath
  from PIL import Image, UnidentifiedImageError

  try:
    with epath.Path(path).open("rb") as f, Image.open(f) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except (OSError, UnidentifiedImageError, ValueError) as e:
    raise ImageError(
      f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ) from None


def image_files(folder) -> List[Path]:
  """The image files of a folder, sorted by name (grids are not inputs: '*grid*' and 'sweep*' are
  left out)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise ImageError(f"image folder not found: {folder}")
  files = sorted(
    p
    for p in folder.iterdir()
    if p.suffix.lower() in IMAGE_SUFFIXES
    and "grid" not in p.stem
    and not p.stem.startswith("sweep")
  )
  if not files:
    raise ImageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
  return files


def read_folder(folder, size: int, what: str) -> "tuple[np.ndarray, List[Path]]":
  """Every image of a folder as (N, size, size, 3) floats in [-1, 1]; ImageError on an unreadable
  one or one of another size (nothing is resized behind the user's back)."""
  files = image_files(folder)
  out = []
  for f in files:
    im = read_image(f)
    if im.shape[:2] != (size, size):
      raise ImageError(
        f"{what} {f} is {im.shape[1]}x{im.shape[0]}, but this stage takes {size}x{size}"
      )
    out.append(from_uint8(im))
  return np.stack(out), files


def _image_paths(path) -> List[Path]:
  """A file, or the image files of a folder."""
  path = Path(path)
  if path.is_file():
    return [path]
  if not path.exists():
    raise ImageError(f"no such image file or folder: {path}")
  return image_files(path)


def read_square_images(path, what: str) -> "tuple[np.ndarray, List[Path]]":
  """An image file or a folder of them, all square and of one size, as (N, S, S, 3) floats in
  [-1, 1] (inpainting inputs; each stage resizes them to its own resolution)."""
  files = _image_paths(path)
  ims = [read_image(f) for f in files]
  size = ims[0].shape[:2]
  for f, im in zip(files, ims):
    if im.shape[0] != im.shape[1] or im.shape[:2] != size:
      raise ImageError(
        f"{what} {f} is {im.shape[1]}x{im.shape[0]}; inpainting images must be square and of one "
        f"size ({size[1]}x{size[0]} first)"
      )
  return from_uint8(np.stack(ims)), files


def read_masks(path, keep: str = "white") -> np.ndarray:
  """An inpainting mask file or a folder of them as (N, S, S, 1) floats in [0, 1], 1 = keep (the
  known region). keep='white': white pixels are kept (black ones generated); 'black': the other
  way round. Grey levels blend."""
  if keep not in ("white", "black"):
    raise ImageError(f"mask keep must be 'white' or 'black', got {keep!r}")
  files = _image_paths(path)
  masks = []
  for f in files:
    m = read_image(f).astype(np.float32).mean(-1, keepdims=True) / 255.0
    if m.shape[0] != m.shape[1]:
      raise ImageError(f"mask {f} is {m.shape[1]}x{m.shape[0]}; masks must be square")
    masks.append(m if keep == "white" else 1.0 - m)
  if len({m.shape for m in masks}) > 1:
    raise ImageError(f"the masks in {path} differ in size")
  return np.stack(masks)


def resize_mask(mask, size: int) -> np.ndarray:
  """(N, S, S, 1) masks in [0, 1] -> (N, size, size, 1): area-weighted (antialiased bilinear), so
  a border pixel of a downsized mask blends."""
  import jax

  m = np.asarray(mask, np.float32)
  out = jax.image.resize(m, (m.shape[0], size, size, m.shape[-1]), "linear", antialias=True)
  return np.clip(np.asarray(out), 0.0, 1.0)


def _font():
  from PIL import ImageFont

  try:
    return ImageFont.load_default(size=11)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def grid(
  rows: Sequence[Sequence[np.ndarray]],
  col_labels: Sequence[str] = (),
  row_labels: Sequence[str] = (),
  title: Optional[str] = None,
) -> np.ndarray:
  """A labelled grid (uint8 (H, W, 3)): rows of equally sized uint8 images, the column labels
  (prompts) under each column, row labels (settings) on the left, an optional title line on top."""
  from PIL import Image, ImageDraw

  h, w = rows[0][0].shape[:2]
  scale = max(1, -(-MIN_CELL // w))
  cw, ch, gap = w * scale, h * scale, 4
  chars = max(8, cw // 6)
  wrapped = [textwrap.wrap(str(t), chars)[:4] or [""] for t in col_labels]
  label_h = (max((len(x) for x in wrapped), default=0) * 13 + 4) if col_labels else 0
  left = (max(len(str(t)) for t in row_labels) * 6 + 10) if row_labels else 0
  top = 16 if title else 0
  ncol = max(len(r) for r in rows)
  width = left + ncol * (cw + gap) + gap
  height = top + len(rows) * (ch + gap) + gap + label_h
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = _font()
  if title:
    draw.text((gap, 2), title, fill=(0, 0, 0), font=font)
  for r, row in enumerate(rows):
    y = top + gap + r * (ch + gap)
    if row_labels:
      draw.text((4, y + ch // 2 - 6), str(row_labels[r]), fill=(0, 0, 0), font=font)
    for c, im in enumerate(row):
      im = np.asarray(im, np.uint8)
      if scale > 1:
        im = im.repeat(scale, axis=0).repeat(scale, axis=1)
      canvas.paste(Image.fromarray(im), (left + gap + c * (cw + gap), y))
  y0 = top + gap + len(rows) * (ch + gap)
  for c, lines in enumerate(wrapped):
    for k, line in enumerate(lines):
      draw.text((left + gap + c * (cw + gap), y0 + k * 13), line, fill=(0, 0, 0), font=font)
  return np.asarray(canvas, np.uint8)
