"""Quality against steps for each sampler, on a trained base stage (the demo's, by default).

1. Convergence: for held-out synthetic captions (scene seed 1000) and one initial noise per image,
   every sampler (DDPM, DDIM, DPM-Solver++ 2M and 3M) at each step count is compared with a
   1000-step deterministic solution from the same noise (DDIM, eta = 0): the RMSE in 8-bit pixel
   units of the images as written (clipped to [-1, 1]), unthresholded and with dynamic
   thresholding, at guidance weight w; each setting's images/s (device-synchronised, compilation
   excluded: one compiled program per sampler family).
2. Alignment: the shapes scorer (`eval shapes`' metric) on more held-out captions for a few
   (sampler, steps) settings, dynamic thresholding at w.

  JAX_PLATFORMS=cpu .venv/bin/python docs/measure/sampler_steps.py --demo_dir out/demo \
    --num_prompts 4 --align_prompts 32 --json docs/bench/cpu_sampler_steps.json \
    --plot docs/sampling_steps.png
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from imagen_jax import images as imio
from imagen_jax.eval.tasks import shapes_eval
from imagen_jax.gin_utils import parse_gin
from imagen_jax.sample import cascade as cascade_lib
from imagen_jax.sample.settings import StageSettings
from imagen_jax.sample.stage_sampler import RunStats, image_keys

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m")
STEPS = (8, 12, 16, 25, 50, 100)
ALIGN = "ddpm:256,ddpm:25,ddim:25,dpmpp_2m:16,dpmpp_2m:25,dpmpp_3m:16"
REFERENCE_STEPS = 1000


def load_base(demo_dir: str, batch_size: int):
  parse_gin(
    ["runs/sample_demo.gin"],
    [
      f"VOCAB='{demo_dir}/spiece.model'",
      f"ENCODER='{demo_dir}/t5'",
      f"BASE_DIR='{demo_dir}/base'",
      f"SR_DIR='{demo_dir}/sr'",
    ],
  )
  return cascade_lib.prepare(
    cascade_lib.cascade_config(), only=["base"], batch_size=batch_size, progress=False
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--demo_dir", default="out/demo")
  ap.add_argument("--num_prompts", type=int, default=8)
  ap.add_argument("--guidance", type=float, default=3.0)
  ap.add_argument("--steps", default=",".join(map(str, STEPS)))
  ap.add_argument("--samplers", default=",".join(SAMPLERS))
  ap.add_argument("--spacings", default="logsnr,karras", help="extra DPM-Solver++ 2M spacings")
  ap.add_argument("--spacing_steps", default="8,16,25")
  ap.add_argument("--ddpm_steps", default="256", help="extra ancestral step counts (the paper's)")
  ap.add_argument("--align_prompts", type=int, default=32)
  ap.add_argument("--thresholdings", default="none,dynamic")
  ap.add_argument("--align", default=ALIGN, help="SAMPLER:STEPS settings scored for alignment")
  ap.add_argument("--json", required=True)
  ap.add_argument("--plot")
  args = ap.parse_args()

  cascade = load_base(args.demo_dir, args.num_prompts)
  st = cascade.stages[0]
  captions = [s.caption for s in shapes_eval.held_out_scenes(1000, 0, args.num_prompts)]
  text = cascade.encode(captions)
  keys = image_keys(range(args.num_prompts), st.index)
  w = args.guidance

  def run(setting, text=text, keys=keys):
    stats = RunStats()
    x = st.sampler.run(st.params, text.emb, text.mask, keys, setting, guided=True, stats=stats)
    return x, stats

  rows, refs = [], {}
  t0 = time.perf_counter()
  for thr in args.thresholdings.split(","):
    ref_setting = StageSettings(
      sampler="ddim", num_steps=REFERENCE_STEPS, guidance_scale=w, thresholding=thr
    )
    refs[thr], stats = run(ref_setting)
    refs[thr] = np.clip(refs[thr], -1.0, 1.0)
    print(f"reference {thr}: {stats.seconds:.0f}s", flush=True)
    steps = list(map(int, args.steps.split(",")))
    plan = [(s, n, "uniform") for s in args.samplers.split(",") for n in steps]
    plan += [("ddpm", n, "uniform") for n in map(int, filter(None, args.ddpm_steps.split(",")))]
    plan += [
      ("dpmpp_2m", n, sp)
      for sp in filter(None, args.spacings.split(","))
      for n in map(int, args.spacing_steps.split(","))
    ]
    for sampler, n, spacing in plan:
      if thr == "none" and sampler == "ddpm":
        continue  # stochastic: its distance to the ODE solution is not a convergence figure
      setting = StageSettings(
        sampler=sampler, num_steps=n, guidance_scale=w, thresholding=thr, spacing=spacing
      )
      x, stats = run(setting)
      rmse = float(np.sqrt(np.mean((np.clip(x, -1.0, 1.0) - refs[thr]) ** 2)) * 127.5)
      row = {
        "sampler": sampler,
        "spacing": spacing,
        "steps": n,
        "thresholding": thr,
        "guidance": w,
        "rmse_8bit": round(rmse, 3),
        "network_calls": n,
        "images_per_second": round(stats.images_per_second, 3),
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  scenes = shapes_eval.held_out_scenes(1000, 0, args.align_prompts)
  align_captions = [s.caption for s in scenes]
  align_text = cascade.encode(align_captions)
  align_keys = image_keys(range(args.align_prompts), st.index)
  alignment = []
  for item in filter(None, args.align.split(",")):
    sampler, n = item.split(":")
    setting = StageSettings(sampler=sampler, num_steps=int(n), guidance_scale=w)
    x, stats = run(setting, align_text, align_keys)
    agg = shapes_eval.score_images(imio.to_uint8(x), align_captions)["overall"]
    row = {
      "sampler": sampler,
      "steps": int(n),
      "guidance": w,
      "thresholding": "dynamic",
      **{k: round(float(v), 4) for k, v in agg.items()},
      "images_per_second": round(stats.images_per_second, 3),
    }
    alignment.append(row)
    print(json.dumps(row), flush=True)
  result = {
    "date": time.strftime("%Y-%m-%d"),
    "command": "docs/measure/sampler_steps.py "
    + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
    "stage": st.description,
    "checkpoint": st.checkpoint,
    "num_prompts": args.num_prompts,
    "reference": f"ddim eta=0, {REFERENCE_STEPS} steps, same initial noise",
    "seconds": round(time.perf_counter() - t0, 1),
    "rows": rows,
    "alignment_prompts": args.align_prompts,
    "alignment": alignment,
  }
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  if args.plot:
    plot(result, args.plot)


def plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colours = dict(zip(SAMPLERS, ("C0", "C1", "C2", "C3")))
  for ax, thr in zip(axes[:2], ("none", "dynamic")):
    for sampler in SAMPLERS:
      pts = [
        (r["steps"], r["rmse_8bit"])
        for r in result["rows"]
        if r["sampler"] == sampler and r["thresholding"] == thr and r["spacing"] == "uniform"
      ]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=sampler, color=colours[sampler])
    ax.set(
      xscale="log",
      yscale="log",
      xlabel="steps (network calls)",
      ylabel="RMSE to the 1000-step ODE solution (8-bit)",
      title=f"w = {result['rows'][0]['guidance']:g}, thresholding {thr}",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  ax = axes[2]
  for sampler in SAMPLERS:
    for metric, style in (("color", "-"), ("count", "--")):
      pts = sorted((r["steps"], r[metric]) for r in result["alignment"] if r["sampler"] == sampler)
      if pts:
        label = f"{sampler} {metric}"
        ax.plot(*zip(*pts), style, marker="o", label=label, color=colours[sampler])
  ax.set(
    xscale="log",
    xlabel="steps",
    ylabel="shapes alignment (colour solid, count dashed)",
    title=f"{result['alignment_prompts']} held-out captions, dynamic",
  )
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


if __name__ == "__main__":
  main()
