"""The README's inpainting picture: the demo cascade keeps the left half of a held-out synthetic
render and draws the right half for a few prompts (`cascade.sample` with a mask, as `imagen-jax
sample --init_images F --mask F` does), at both stages.

  JAX_PLATFORMS=cpu .venv/bin/python docs/measure/inpaint_example.py --demo_dir out/demo \
    --out /tmp/inpaint --png docs/demo_inpainting.png
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from imagen_jax import images as imio
from imagen_jax.data import synthetic
from imagen_jax.gin_utils import parse_gin
from imagen_jax.sample import cascade as cascade_lib

PROMPTS = ("a red circle left of a blue square", "two green triangles", "a yellow square")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--demo_dir", default="out/demo")
  ap.add_argument("--out", required=True, help="a scratch folder (replaced)")
  ap.add_argument("--png", required=True)
  ap.add_argument("--scene", type=int, default=3, help="held-out scene index (seed 1000)")
  args = ap.parse_args()
  out = Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  known = synthetic.render(synthetic.make_scene(1000, args.scene), 64)
  mask = np.zeros_like(known)
  mask[:, :32] = 255  # white = keep: the left half
  for k in range(len(PROMPTS)):  # one copy per prompt: images pair with prompts one to one
    imio.save_png(out / "known" / f"k{k}.png", known)
  imio.save_png(out / "mask.png", mask)
  d = args.demo_dir
  parse_gin(
    ["runs/sample_demo.gin"],
    [f"VOCAB='{d}/spiece.model'", f"ENCODER='{d}/t5'", f"BASE_DIR='{d}/base'", f"SR_DIR='{d}/sr'"],
  )
  result = cascade_lib.sample(
    cascade_lib.cascade_config(),
    prompts=list(PROMPTS),
    out_dir=str(out / "samples"),
    init_images=str(out / "known"),
    masks=str(out / "mask.png"),
    progress=False,
  )
  by_stage = {st.name: st.files[0] for st in result.stages}
  size = 64
  rows, labels = [], []
  for name, files in by_stage.items():
    ims = [imio.read_image(out / "samples" / f) for f in files]
    f = size // ims[0].shape[0]
    rows.append([known, mask] + [im.repeat(f, 0).repeat(f, 1) for im in ims])
    labels.append(f"{name} {ims[0].shape[0]}px")
  imio.save_png(
    args.png,
    imio.grid(
      rows,
      ["known (64 px)", "mask (white: keep)"] + list(PROMPTS),
      labels,
      title="inpainting: each stage keeps the left half at its resolution",
    ),
  )
  print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
