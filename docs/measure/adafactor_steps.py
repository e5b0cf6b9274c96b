"""How far each optimizer setting moves a small base U-Net's weights at the paper's learning rate.

Trains the tiny base U-Net (gin_configs/models/tiny_base.gin, 32 px) for a few hundred steps on the
demo's embedding cache with Adam 1e-4, Adafactor with optax's parameter-scaled steps and Adafactor
with absolute steps (this project's default), all with the same data, seed, warm-up and clipping,
and prints for each: the loss (mean of the last 50 steps), the median relative change
||w - w0|| / ||w0|| of the non-zero-initialised tensors, and the RMS reached by the
zero-initialised ones (conv_out, each ResBlock's second conv, attention output projections, biases).

  JAX_PLATFORMS=cpu .venv/bin/python docs/measure/adafactor_steps.py --cache out/demo/cache \
    --steps 300 --json docs/bench/cpu_adafactor_steps.json
"""

from __future__ import annotations

import argparse
import json
import time

import gin
import jax
import numpy as np

from imagen_jax import partitioning
from imagen_jax.data.pipeline import StageDataConfig
from imagen_jax.diffusion import DiffusionConfig
from imagen_jax.gin_utils import parse_gin
from imagen_jax.models.unet import UNetConfig
from imagen_jax.train import setup as setup_lib
from imagen_jax.train.data import TaskSource, cached_task
from imagen_jax.train.optimizer import OptimizerConfig

SETTINGS = {
  "adam": dict(name="adam"),
  "adafactor_parameter_scaled": dict(name="adafactor", multiply_by_parameter_scale=True),
  "adafactor_absolute": dict(name="adafactor", multiply_by_parameter_scale=False),
}


def run(name: str, cache: str, steps: int, lr: float, batch: int) -> dict:
  gin.clear_config()
  parse_gin(["models/tiny_base.gin"], [])
  model = UNetConfig()
  opt = OptimizerConfig(
    learning_rate=lr, warmup_steps=20, decay_steps=None, clip_grad_norm=1.0, **SETTINGS[name]
  )
  mesh = partitioning.create_mesh(-1, 1, 1)
  spec = setup_lib.RunSpec(
    model_config=model,
    diffusion=DiffusionConfig(),
    optimizer=opt,
    global_batch=batch,
    mesh_shape=tuple(mesh.shape.values()),
    ema_decay=0.999,
    ema_warmup=True,
  )
  setup = setup_lib.TrainSetup(spec, mesh)
  state = setup.create_state(0)
  w0 = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), state.params)  # state is donated
  data = TaskSource(
    cached_task(cache_dir=cache), StageDataConfig(image_size=32, batch_size=batch, seed=0)
  )
  keys = ("image", "text_emb", "text_mask")
  first = next(data)
  shapes = {k: jax.ShapeDtypeStruct(first[k].shape, first[k].dtype) for k in keys}
  lowered, _ = setup.lower(shapes, state=state)
  step = lowered.compile()
  losses, t0 = [], time.perf_counter()
  batch_ = first
  for _ in range(steps):
    state, metrics = step(state, {k: batch_[k] for k in keys}, None)
    losses.append(float(metrics["loss_sum"]))
    batch_ = next(data)
  w = jax.tree_util.tree_map(np.asarray, state.params)
  rel, zero_rms = [], []
  for a, b in zip(jax.tree_util.tree_leaves(w0), jax.tree_util.tree_leaves(w)):
    n0 = float(np.linalg.norm(a))
    if n0 == 0.0:
      zero_rms.append(float(np.sqrt(np.mean(b**2))))
    else:
      rel.append(float(np.linalg.norm(b - a)) / n0)
  return {
    "setting": name,
    "learning_rate": lr,
    "steps": steps,
    "loss_last_50": float(np.mean(losses[-50:])),
    "loss_first_10": float(np.mean(losses[:10])),
    "median_relative_change": float(np.median(rel)),
    "zero_init_tensors": len(zero_rms),
    "zero_init_median_rms": float(np.median(zero_rms)) if zero_rms else None,
    "seconds": time.perf_counter() - t0,
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cache", required=True)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--json")
  args = p.parse_args()
  rows = [run(n, args.cache, args.steps, args.lr, args.batch) for n in SETTINGS]
  for r in rows:
    print(
      f"{r['setting']:<28} loss {r['loss_first_10']:.4f} -> {r['loss_last_50']:.4f}  "
      f"median |dw|/|w0| {r['median_relative_change']:.2e}  zero-init RMS "
      f"{r['zero_init_median_rms']:.2e}"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
