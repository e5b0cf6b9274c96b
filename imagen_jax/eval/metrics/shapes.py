"""Automatic compositional alignment for the synthetic captioned shapes
(`imagen_jax.data.synthetic`).

Given an image and the caption it was generated for, `score` finds the objects in the image and
checks them against what the caption asks for. No learned parts, so nothing to train or download:

1. Background: the median colour of the image's one-pixel border (objects never fill the border).
2. Every pixel is explained, for each of the six palette colours c, as a blend b + a (c - b) of the
   background b and c (a = the least-squares coverage in [0, 1], the anti-aliasing weight); the
   colour with the smallest residual wins when its residual is under `tolerance` (RGB units) and a >
   1/2. Pixels no blend explains within the tolerance are "off-palette".
3. Objects: 8-connected components of each colour's pixels, at least `min_area` of the image (half
   the smallest object the dataset draws), measured with the coverages (the component grown by one
   pixel so that its anti-aliased rim counts), and solid: a component whose area exceeds its widest
   row x its tallest column by more than 35% is scattered pixels (noise), not a shape (a sharp shape
   fills at most its extent; a generated blob's soft rim reaches about 1.1; uniform noise's
   components reach 2).
4. Shape, from the coverage-weighted moments (so it works at 32 px): a triangle (apex up) has its
   mass low, a vertical skewness of -0.57 against 0 for circles and squares; squares fill their
   extent (area / (widest row x tallest column) = 1) where circles fill pi/4.
5. Left/right: the components' centroids.

Per image (`Score`): `color` (the set of colours found equals the caption's), `count` (as many
objects as the caption names), `shape` (the set of shapes equals the caption's), `relation`
(left/right captions: each named object found exactly once, in the named order), `all` (the objects
found, as a multiset of (shape, colour), equal the caption's, and the relation holds). `fidelity`:
the fraction of pixels that are background or a background/palette blend (1.0 on the dataset's
renders up to anti-aliasing) — the sweep's fidelity proxy.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from imagen_jax.data import synthetic
from imagen_jax.errors import UserError

COLOR_NAMES: Tuple[str, ...] = tuple(synthetic.COLORS)
PALETTE = np.array([synthetic.COLORS[c] for c in COLOR_NAMES], np.float64)
KINDS = ("count", "left_of", "list")
METRICS = ("color", "count", "shape", "relation", "all")
SMALLEST_OBJECT = 2 * 0.07**2  # a triangle of half-extent 0.07, as a fraction of the image

_NUMBER_WORDS = {v: k for k, v in synthetic.NUMBERS.items()}
_SINGULAR = {v: k for k, v in synthetic.PLURAL.items()}


class CaptionError(UserError):
  """A caption outside the synthetic dataset's grammar."""


@dataclasses.dataclass(frozen=True)
class Requirement:
  """What a caption asks for: objects as (shape, colour) in caption order, and for left/right
  captions the (left, right) pair of those objects."""

  kind: str  # count | left_of | list
  objects: Tuple[Tuple[str, str], ...]
  left_right: Optional[Tuple[Tuple[str, str], Tuple[str, str]]] = None


def _phrase(words: List[str]) -> List[Tuple[str, str]]:
  """'a red circle' / 'two red circles' -> [(shape, colour)] * n."""
  if len(words) != 3:
    raise CaptionError(
      f"cannot read {' '.join(words)!r}: expected '<a|an|number> <colour> <shape>'"
    )
  det, color, shape = words
  n = 1 if det in ("a", "an") else _NUMBER_WORDS.get(det)
  shape = _SINGULAR.get(shape, shape)
  if n is None or color not in synthetic.COLORS or shape not in synthetic.SHAPES:
    raise CaptionError(
      f"cannot read {' '.join(words)!r}: expected '<a|an|number> <colour> <shape>'"
    )
  return [(shape, color)] * n


def parse(caption: str) -> Requirement:
  """The requirement of a caption in the synthetic dataset's grammar (count, left/right and list
  captions)."""
  text = caption.strip().lower()
  for rel in ("left", "right"):
    sep = f" to the {rel} of "
    if sep in text:
      a, b = text.split(sep)
      (first,), (second,) = _phrase(a.split()), _phrase(b.split())
      pair = (first, second) if rel == "left" else (second, first)
      return Requirement("left_of", (first, second), pair)
  parts = [p for p in re.split(r",\s*|\s+and\s+", text) if p]
  if len(parts) > 1:
    return Requirement("list", tuple(o for p in parts for o in _phrase(p.split())))
  return Requirement("count", tuple(_phrase(text.split())))


@dataclasses.dataclass(frozen=True)
class Detection:
  shape: str
  color: str
  x: float  # centroid, in [0, 1] of the width
  y: float
  area: float  # fraction of the image
  fill: float  # area / (widest row x tallest column)
  skew: float  # vertical skewness of the mass


@dataclasses.dataclass(frozen=True)
class Score:
  kind: str
  color: bool
  count: bool
  shape: bool
  relation: Optional[bool]  # None unless the caption is a left/right one
  all: bool
  fidelity: float
  detections: Tuple[Detection, ...]

  def metrics(self) -> Dict[str, Optional[float]]:
    return {m: (None if getattr(self, m) is None else float(getattr(self, m))) for m in METRICS}


def _background(img: np.ndarray) -> np.ndarray:
  border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
  return np.median(border, axis=0)


def _explain(img: np.ndarray, tolerance: float):
  """Per pixel: the winning palette index (-1: background or unexplained), its coverage, and
  whether any blend (or the background) explains the pixel within the tolerance."""
  b = _background(img)
  d = PALETTE - b  # (C, 3)
  pb = img - b  # (H, W, 3)
  denom = np.maximum((d * d).sum(-1), 1e-6)
  alpha = np.clip(pb @ d.T / denom, 0.0, 1.0)  # (H, W, C)
  resid = np.linalg.norm(pb[..., None, :] - alpha[..., None] * d, axis=-1)
  best = resid.argmin(-1)
  best_resid = np.take_along_axis(resid, best[..., None], -1)[..., 0]
  best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
  explained = best_resid < tolerance
  label = np.where(explained & (best_alpha > 0.5), best, -1)
  return label, alpha, resid, explained


def _shape_of(weights: np.ndarray) -> Tuple[str, float, float, float, float]:
  """Shape, centroid (x, y in pixels), fill and vertical skewness of a coverage map (H, W)."""
  total = weights.sum()
  ys, xs = np.indices(weights.shape)
  cx, cy = (weights * xs).sum() / total, (weights * ys).sum() / total
  var = (weights * (ys - cy) ** 2).sum() / total
  skew = ((weights * (ys - cy) ** 3).sum() / total) / max(var, 1e-9) ** 1.5
  width = weights.sum(1).max()
  height = weights.sum(0).max()
  fill = total / max(width * height, 1e-9)
  if skew < -0.3:
    shape = "triangle"
  elif fill > 0.9:
    shape = "square"
  else:
    shape = "circle"
  return shape, cx, cy, fill, skew


def detect(
  image: np.ndarray,
  *,
  tolerance: float = 64.0,
  min_area: float = SMALLEST_OBJECT / 2,
  max_fill: float = 1.35,
) -> Tuple[List[Detection], float]:
  """The objects in an RGB image (H, W, 3; uint8, or float in [0, 255]) and its fidelity (see the
  module doc)."""
  img = np.asarray(image, np.float64)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
  h, w, _ = img.shape
  label, alpha, resid, explained = _explain(img, tolerance)
  out = []
  structure = np.ones((3, 3), bool)
  for k, color in enumerate(COLOR_NAMES):
    comps, n = ndimage.label(label == k, structure=structure)
    for i in range(1, n + 1):
      core = comps == i
      rim = (
        ndimage.binary_dilation(core, structure=structure)
        & (label < 0)
        & (resid[..., k] < tolerance)
      )
      weights = np.where(core, alpha[..., k], 0.0) + np.where(rim, alpha[..., k], 0.0)
      area = weights.sum() / (h * w)
      if area < min_area:
        continue
      shape, cx, cy, fill, skew = _shape_of(weights)
      if (
        fill > max_fill
      ):  # scattered pixels, not a solid object (a solid shape fills at most its extent)
        continue
      out.append(
        Detection(
          shape,
          color,
          float((cx + 0.5) / w),
          float((cy + 0.5) / h),
          float(area),
          float(fill),
          float(skew),
        )
      )
  out.sort(key=lambda d: d.x)
  return out, float(explained.mean())


def judge(
  requirement: Requirement, detections: Sequence[Detection], fidelity: float = float("nan")
) -> Score:
  """A Score from what was found against what the caption asks for."""
  want = collections.Counter(requirement.objects)
  have = collections.Counter((d.shape, d.color) for d in detections)
  color = {c for _, c in want} == {d.color for d in detections}
  shape = {s for s, _ in want} == {d.shape for d in detections}
  count = sum(want.values()) == len(detections)
  relation = None
  if requirement.left_right is not None:
    left, right = requirement.left_right
    found_l = [d for d in detections if (d.shape, d.color) == left]
    found_r = [d for d in detections if (d.shape, d.color) == right]
    relation = bool(len(found_l) == 1 and len(found_r) == 1 and found_l[0].x < found_r[0].x)
  everything = bool(have == want and relation is not False)
  return Score(
    requirement.kind,
    bool(color),
    bool(count),
    bool(shape),
    relation,
    everything,
    fidelity,
    tuple(detections),
  )


def score(image: np.ndarray, caption: str, **detect_kwargs) -> Score:
  """Score one image against the caption it was generated for."""
  detections, fidelity = detect(image, **detect_kwargs)
  return judge(parse(caption), detections, fidelity)


def scene_satisfies(scene: synthetic.Scene, caption: str) -> bool:
  """Ground truth: does a dataset scene satisfy a caption (the oracle the scorer is tested
  against)."""
  req = parse(caption)
  have = collections.Counter((o.shape, o.color) for o in scene.objects)
  if have != collections.Counter(req.objects):
    return False
  if req.left_right is None:
    return True
  left = next(o for o in scene.objects if (o.shape, o.color) == req.left_right[0])
  right = next(o for o in scene.objects if (o.shape, o.color) == req.left_right[1])
  return left.x < right.x


def aggregate(scores: Iterable[Score]) -> Dict[str, Dict[str, float]]:
  """Mean of every metric per caption kind and overall ('overall'), with the number of images
  ('n') and the mean fidelity. Relation means are over left/right captions only."""
  groups: Dict[str, List[Score]] = collections.defaultdict(list)
  for s in scores:
    groups[s.kind].append(s)
    groups["overall"].append(s)
  out = {}
  for name in [k for k in KINDS if k in groups] + ["overall"]:
    items = groups.get(name, [])
    row: Dict[str, float] = {"n": float(len(items))}
    for m in METRICS:
      vals = [getattr(s, m) for s in items if getattr(s, m) is not None]
      row[m] = float(np.mean(vals)) if vals else float("nan")
    row["fidelity"] = float(np.mean([s.fidelity for s in items])) if items else float("nan")
    out[name] = row
  return out
