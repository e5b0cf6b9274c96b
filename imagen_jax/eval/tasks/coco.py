"""The COCO FID-30K inputs from the user's COCO 2014 files: `num` val2014 images drawn at random
(seeded), one caption each, their images linked for the reference statistics. Outputs:
docs/outputs.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import numpy as np

from imagen_jax.errors import UserError
from imagen_jax.files import write_json


class CocoError(UserError):
  """Unreadable or inconsistent COCO files: one line, exit code 2."""


def make_prompts(annotations, images_dir, out_dir, *, num: int = 30000, seed: int = 0) -> dict:
  try:
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    images = {im["id"]: im["file_name"] for im in data["images"]}
    captions: Dict[int, List[str]] = {}
    for a in data["annotations"]:
      captions.setdefault(a["image_id"], []).append(" ".join(str(a["caption"]).split()))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CocoError(
      f"annotations {annotations}: not a COCO captions file ({type(e).__name__}: {e})"
    ) from None
  ids = sorted(i for i in images if captions.get(i))
  if num < 1 or num > len(ids):
    raise CocoError(f"num {num}: the annotations have {len(ids)} captioned images")
  img_dir = Path(images_dir)
  rng = np.random.default_rng(seed)
  chosen = [ids[k] for k in rng.choice(len(ids), size=num, replace=False)]
  missing = [images[i] for i in chosen if not (img_dir / images[i]).is_file()]
  if missing:
    raise CocoError(
      f"images_dir {images_dir}: {len(missing)} of the drawn images are missing (e.g. {missing[0]})"
    )
  out = Path(out_dir)
  ref = out / "ref_images"
  if ref.exists() and any(ref.iterdir()):
    raise CocoError(f"{ref} is not empty; choose a new out_dir")
  ref.mkdir(parents=True, exist_ok=True)
  rows = []
  for k, i in enumerate(chosen):
    caption = captions[i][int(rng.integers(len(captions[i])))]
    name = f"{k:05d}_{images[i]}"
    os.symlink((img_dir / images[i]).resolve(), ref / name)
    rows.append({"image_id": int(i), "file_name": images[i], "caption": caption})
  (out / "prompts.txt").write_text("\n".join(r["caption"] for r in rows) + "\n", encoding="utf-8")
  record = {
    "what": "COCO FID inputs",
    "annotations": str(annotations),
    "seed": seed,
    "num": num,
    "pairs": rows,
  }
  write_json(out / "coco_fid.json", record)
  return record
