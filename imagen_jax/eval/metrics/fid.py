"""`imagen-jax eval fid`: FID of a folder of samples against reference statistics (.npz) or a folder
of reference images, with the FID Inception (`eval.inception`) and the float64 Fréchet distance
(`eval.frechet`).

Images are read in batches from disk (PNG / JPEG / WebP, RGB; 30k images need not fit in memory);
every image of a folder must have the same size (`--image_size S` checks it is S x S), or
`--center_crop S` takes the central square and resizes it to S x S with PIL's bicubic filter first
(what the COCO protocol does to the reference photos). Features are float64; statistics use numpy's
unbiased covariance.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
from tqdm import tqdm

from imagen_jax import images as imio
from imagen_jax.errors import UserError
from imagen_jax.eval.metrics import frechet
from imagen_jax.eval.networks import inception
from imagen_jax.files import write_json


class FIDError(UserError):
  """Bad FID input (empty folders, mismatched sizes, unreadable images): one line, exit code 2."""


def list_images(folder) -> List[Path]:
  d = Path(folder)
  if not d.is_dir():
    raise FIDError(f"{folder}: not a folder of images")
  files = imio.image_files(d)
  if not files:
    raise FIDError(f"{folder}: no images (png, jpg, jpeg, webp)")
  return files


def _read(path: Path, center_crop: Optional[int]) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      if center_crop:
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((center_crop, center_crop), Image.Resampling.BICUBIC)
      return np.asarray(im, np.uint8)
  except OSError as e:
    raise FIDError(f"cannot read image {path}: {e}") from None


def folder_features(
  folder,
  extractor: inception.FeatureExtractor,
  *,
  image_size: Optional[int] = None,
  center_crop: Optional[int] = None,
  progress: bool = True,
  what: str = "images",
) -> np.ndarray:
  """(N, 2048) float64 features of every image in a folder, streamed in the extractor's batch
  size."""
  files = list_images(folder)
  first = _read(files[0], center_crop)
  size = first.shape[:2]
  if image_size and size != (image_size, image_size):
    raise FIDError(
      f"{files[0]}: {size[1]}x{size[0]}, expected {image_size}x{image_size} (image_size)"
    )
  feats = []
  # The bar goes to stdout (like `sample`'s): stderr keeps only an error's one line.
  bar = tqdm(
    total=len(files),
    desc=f"fid {what}",
    unit="img",
    disable=not progress,
    file=sys.stdout,
    leave=False,
  )
  t0 = time.perf_counter()
  b = extractor.batch_size
  try:
    for start in range(0, len(files), b):
      batch = []
      for f in files[start : start + b]:
        im = first if f is files[0] else _read(f, center_crop)
        if im.shape[:2] != size:
          raise FIDError(
            f"{f}: {im.shape[1]}x{im.shape[0]}, but {files[0].name} is {size[1]}x{size[0]}: every "
            "image of a folder must have one size (or center-crop them: center_crop)"
          )
        batch.append(im)
      feats.append(extractor(np.stack(batch)))
      bar.update(len(batch))
      bar.set_postfix(img_per_s=f"{(start + len(batch)) / (time.perf_counter() - t0):.1f}")
  finally:
    bar.close()
  return np.concatenate(feats)


def reference_stats(
  ref, extractor, *, center_crop: Optional[int] = None, progress: bool = True
) -> frechet.Stats:
  """Statistics from an .npz or from a folder of reference images."""
  p = Path(ref)
  if p.is_file():
    return frechet.Stats.load(p)
  if not p.exists():
    raise FIDError(f"ref {ref}: neither a statistics .npz nor a folder of images")
  return frechet.Stats.of(
    folder_features(p, extractor, center_crop=center_crop, progress=progress, what="reference")
  )


def evaluate(
  samples,
  ref,
  weights,
  *,
  image_size: Optional[int] = None,
  center_crop: Optional[int] = None,
  resize: str = "tf1",
  batch_size: int = 64,
  save_stats: Optional[str] = None,
  json_path: Optional[str] = None,
) -> dict:
  """FID of a folder of samples against reference statistics or a folder of reference images.

  Args:
    samples: folder of generated images (one size).
    ref: reference statistics (.npz with mu, sigma) or a folder of reference images.
    weights: the converted Inception weights (`inception.convert`).
    image_size: check that the samples are this size.
    center_crop: reference images: central square resized to this size (bicubic).
    resize: the 299x299 bilinear resize: 'tf1' (original FID) or 'pytorch' (pytorch-fid).
    batch_size: images per extractor call.
    save_stats: write the samples' statistics (.npz) here.
    json_path: write the result as JSON here.

  Returns:
    {'fid', 'samples', 'num_samples', 'ref', 'num_ref', 'resize', 'sample_images_per_second'}.
  """
  extractor = inception.FeatureExtractor(
    inception.load(weights), batch_size=batch_size, resize=resize
  )
  t0 = time.perf_counter()
  feats = folder_features(samples, extractor, image_size=image_size, what="samples")
  seconds = time.perf_counter() - t0
  stats = frechet.Stats.of(feats)
  reference = reference_stats(ref, extractor, center_crop=center_crop)
  value = frechet.frechet_distance(stats, reference)
  if save_stats:
    stats.save(save_stats)
  result = {
    "fid": value,
    "samples": str(samples),
    "num_samples": stats.count,
    "ref": str(ref),
    "num_ref": reference.count,
    "resize": resize,
    "sample_images_per_second": stats.count / seconds,
  }
  if json_path:
    write_json(json_path, result)
  return result
