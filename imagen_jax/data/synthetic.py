"""A built-in synthetic captioned-shapes dataset: deterministic from (seed, index), no download.

One to four coloured circles / squares / triangles on a plain background, with captions naming
colours, counts and relations ("two red circles", "a blue square to the left of a yellow triangle").
Scenes live in normalised coordinates and are rendered at any resolution (supersampled, so crisp at
1024). Each example records its ground truth (objects, colours, positions) for alignment scoring.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Dict, Iterator, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLORS: Dict[str, Tuple[int, int, int]] = {
  "red": (220, 30, 30),
  "green": (30, 170, 60),
  "blue": (40, 70, 220),
  "yellow": (240, 210, 20),
  "purple": (140, 50, 170),
  "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
  "white": (245, 245, 245),
  "gray": (128, 128, 128),
  "black": (15, 15, 15),
}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  shape: str
  color: str
  x: float  # centre, in [0, 1] of the width
  y: float  # centre, in [0, 1] of the height
  size: float  # half-extent, in [0, 1] of the side

  def to_dict(self):
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: Tuple[ShapeObject, ...]
  background: str
  caption: str
  relation: str  # 'count' | 'left_of' | 'list'

  def ground_truth(self) -> dict:
    return {
      "objects": [o.to_dict() for o in self.objects],
      "background": self.background,
      "relation": self.relation,
    }


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def make_scene(seed: int, index: int) -> Scene:
  """The scene of example `index` of the dataset with `seed`."""
  rng = np.random.default_rng([seed, index])
  kind = rng.choice(["count", "left_of", "list"], p=[0.35, 0.35, 0.30])
  color_names = list(COLORS)
  if kind == "count":
    n = int(rng.integers(1, 5))
    shape, color = str(rng.choice(SHAPES)), str(rng.choice(color_names))
    specs = [(shape, color)] * n
  elif kind == "left_of":
    n = 2
    while True:
      specs = [(str(rng.choice(SHAPES)), str(rng.choice(color_names))) for _ in range(2)]
      if specs[0] != specs[1]:
        break
  else:
    n = int(rng.integers(2, 5))
    specs = []
    while len(specs) < n:  # distinct (shape, colour) pairs, so each is named once
      s = (str(rng.choice(SHAPES)), str(rng.choice(color_names)))
      if s not in specs:
        specs.append(s)
  # Horizontal slots keep objects apart and make left/right unambiguous.
  slots = rng.permutation(4)[:n]
  objects = []
  for (shape, color), slot in zip(specs, slots):
    size = float(rng.uniform(0.07, 0.10))
    x = float((slot + 0.5) / 4 + rng.uniform(-0.02, 0.02))
    y = float(rng.uniform(0.25, 0.75))
    objects.append(ShapeObject(shape, color, x, y, size))
  objects.sort(key=lambda o: o.x)
  background = str(rng.choice(list(BACKGROUNDS)))

  if kind == "count":
    o = objects[0]
    caption = (
      f"{_article(o.color)} {o.color} {o.shape}"
      if n == 1
      else f"{NUMBERS[n]} {o.color} {PLURAL[o.shape]}"
    )
  elif kind == "left_of":
    left, right = objects
    if rng.random() < 0.5:
      caption = (
        f"{_article(left.color)} {left.color} {left.shape} to the left of "
        f"{_article(right.color)} {right.color} {right.shape}"
      )
    else:
      caption = (
        f"{_article(right.color)} {right.color} {right.shape} to the right of "
        f"{_article(left.color)} {left.color} {left.shape}"
      )
  else:
    names = [f"{_article(o.color)} {o.color} {o.shape}" for o in objects]
    caption = ", ".join(names[:-1]) + " and " + names[-1]
  return Scene(tuple(objects), background, caption, str(kind))


def render(scene: Scene, resolution: int, supersample: int = 4) -> np.ndarray:
  """RGB uint8 image of the scene at `resolution` x `resolution` (anti-aliased by supersampling)."""
  big = resolution * supersample
  img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(img)
  for o in scene.objects:
    cx, cy, r = o.x * big, o.y * big, o.size * big
    fill = COLORS[o.color]
    if o.shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
      draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
      draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  if supersample > 1:
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(img)


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def examples(seed: int, num_examples: int, resolution: int, start: int = 0) -> Iterator[dict]:
  """{'key', 'image' (PNG bytes), 'caption', 'ground_truth' (JSON)} for indices [start, start +
  n)."""
  for index in range(start, start + num_examples):
    scene = make_scene(seed, index)
    yield {
      "key": f"synthetic-{seed}-{index}",
      "image": encode_png(render(scene, resolution)),
      "caption": scene.caption,
      "ground_truth": json.dumps(scene.ground_truth()),
    }


def parse_caption(caption: str) -> List[Tuple[str, str]]:
  """(shape, colour) of every object a synthetic caption names, in caption order (for checks)."""
  words = caption.replace(",", " ").split()
  out = []
  counts = {v: k for k, v in NUMBERS.items()}
  i = 0
  while i < len(words):
    w = words[i]
    if w in ("a", "an") or w in counts:
      n = 1 if w in ("a", "an") else counts[w]
      color, shape = words[i + 1], words[i + 2]
      shape = {v: k for k, v in PLURAL.items()}.get(shape, shape)
      out.extend([(shape, color)] * n)
      i += 3
    else:
      i += 1
  return out
