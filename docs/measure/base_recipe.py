"""Base-stage recipe sweep: train the demo's tiny base U-Net in-process and score held-out captions.

Holds the demo's embedding cache (3000 synthetic scenes at 32 px) in memory, trains one recipe
(objective, learning rate and decay, batch, width) with the project's own train step on every local
device, and at the given steps prints and records
  - a text-reliance probe: the x0 error at t = 0.5 / 0.8 / 0.9 / 0.95 with each image's own caption
    divided by the error with another image's caption (1.00: the caption is not used), and
  - `eval shapes` alignment on held-out captions (scene seed 1000) at each guidance weight.
This is how docs/findings.md ("The base stage, 2026-12-06") chose the demo's base recipe; the CLI
equivalent of one run is `imagen-jax train --gin_file=runs/demo_base.gin ...` followed by
`imagen-jax eval shapes`.

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python \
    docs/measure/base_recipe.py --demo_dir out/demo --name eps_const --objective eps --decay 0 \
    --steps 1000 --evals 500,1000 --guidance 3,5 --json docs/eval/issue20/base_eps_const.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from imagen_jax import batch_keys as K
from imagen_jax import partitioning
from imagen_jax.diffusion import DiffusionConfig, process, samplers
from imagen_jax.eval.metrics import shapes
from imagen_jax.eval.tasks.shapes_eval import held_out_scenes
from imagen_jax.models.unet import UNet, UNetConfig
from imagen_jax.text.encoder import encode_prompts
from imagen_jax.train import optimizer as optim
from imagen_jax.train.data import InMemorySource, TaskSource
from imagen_jax.train.setup import RunSpec, TrainSetup

PROBE_TIMES = (0.5, 0.8, 0.9, 0.95)


def load_cache(demo_dir: str, num: int, size: int) -> dict:
  """Reads `num` examples of the demo's embedding cache at `size` px into host memory."""
  from imagen_jax.data import pipeline, tasks

  tasks.register_cached_task("base_recipe_cache", os.path.join(demo_dir, "cache"), None)
  cfg = pipeline.StageDataConfig(image_size=size, batch_size=100, shuffle_buffer=1)
  src = TaskSource("base_recipe_cache", cfg)
  out = {K.IMAGE: [], K.TEXT_EMB: [], K.TEXT_MASK: []}
  for _ in range(num // 100):
    batch = next(src)
    for k in out:
      out[k].append(batch[k])
  return {
    k: np.concatenate(v).astype(bool if k == K.TEXT_MASK else np.float32) for k, v in out.items()
  }


def text_reliance(apply_fn, params, diff: DiffusionConfig, data: dict) -> list:
  """x0 error with the right caption / with another image's caption, at PROBE_TIMES.

  Args:
    apply_fn: (params, z_t, log_snr, cond) -> the network's prediction.
    params: the network's parameters.
    diff: the diffusion settings the network was trained with.
    data: the training arrays; the last 64 examples are probed.

  Returns:
    One dict per time with the two errors and their ratio.
  """
  img, emb, mask = (data[k][-64:] for k in (K.IMAGE, K.TEXT_EMB, K.TEXT_MASK))
  other = np.roll(np.arange(len(img)), 1)
  rows = []
  for t in PROBE_TIMES:
    tt = jnp.full((len(img),), t)
    log_snr = diff.schedule.log_snr(tt)
    alpha, sigma = (process.bcast(v, img) for v in diff.schedule.alpha_sigma(tt))
    z_t = process.diffuse(img, jax.random.normal(jax.random.PRNGKey(0), img.shape), alpha, sigma)
    errs = []
    for idx in (np.arange(len(img)), other):
      pred = apply_fn(params, z_t, log_snr, {K.TEXT_EMB: emb[idx], K.TEXT_MASK: mask[idx]})
      x0, _ = process.prediction_to_x0_eps(pred, z_t, alpha, sigma, diff.objective)
      errs.append(float(jnp.mean((x0 - img) ** 2)))
    rows.append({"t": t, "right": errs[0], "other": errs[1], "ratio": errs[0] / errs[1]})
  return rows


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--demo_dir", default="out/demo", help="a `make demo` output (cache/, spiece.model, t5/)"
  )
  p.add_argument("--name", required=True)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument(
    "--evals", default="", help="comma-separated steps to evaluate at (default: the last)"
  )
  p.add_argument("--batch", type=int, default=12)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument(
    "--decay", type=int, default=0, help="cosine decay steps; 0: constant after warm-up"
  )
  p.add_argument("--ema", type=float, default=0.999)
  p.add_argument("--objective", default="eps", choices=["eps", "v", "x0"])
  p.add_argument("--channels", type=int, default=32)
  p.add_argument("--channel_mult", default="1,2")
  p.add_argument("--attention_resolutions", default="16")
  p.add_argument("--num_prompts", type=int, default=64)
  p.add_argument("--guidance", default="3")
  p.add_argument("--sampler", default="dpmpp_2m_sde")
  p.add_argument("--sample_steps", type=int, default=25)
  p.add_argument("--thresholding", default="dynamic")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the run's evaluations here")
  a = p.parse_args()

  data = load_cache(a.demo_dir, 3000, 32)
  captions = [s.caption for s in held_out_scenes(1000, 0, a.num_prompts)]
  held = encode_prompts(
    captions,
    os.path.join(a.demo_dir, "spiece.model"),
    os.path.join(a.demo_dir, "t5"),
    max_length=16,
  )
  model_cfg = UNetConfig(
    image_size=32,
    model_channels=a.channels,
    channel_mult=tuple(int(v) for v in a.channel_mult.split(",")),
    num_res_blocks=1,
    attention_resolutions=tuple(int(v) for v in a.attention_resolutions.split(",")),
    head_dim=16,
    pool_heads=2,
    norm_groups=8,
    text_embed_dim=32,
    max_text_length=16,
  )
  diff = DiffusionConfig(objective=a.objective, cond_drop_prob=0.1)
  opt = optim.OptimizerConfig(
    name="adam",
    learning_rate=a.lr,
    warmup_steps=a.warmup,
    decay_steps=a.decay or None,
    clip_grad_norm=1.0,
  )
  mesh = partitioning.create_mesh()
  setup = TrainSetup(RunSpec(model_cfg, diff, opt, a.batch, ema_decay=a.ema), mesh)
  state = setup.create_state(a.seed)
  train_step = setup.signature().jit()
  source = InMemorySource(data, a.batch, seed=a.seed)
  model = UNet(model_cfg)
  apply_fn = jax.jit(lambda prm, z, ls, c: model.apply({"params": prm}, z, ls, c))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731

  @jax.jit
  def sample(params, keys, emb, mask, w):
    return samplers.sample(
      lambda z, ls, c: model.apply({"params": params}, z, ls, c),
      keys,
      (emb.shape[0], 32, 32, 3),
      {K.TEXT_EMB: emb, K.TEXT_MASK: mask},
      schedule=diff.schedule,
      num_steps=a.sample_steps,
      objective=a.objective,
      sampler=a.sampler,
      guidance_scale=w,
      thresholding_method=a.thresholding,
    )

  evals = {int(v) for v in a.evals.split(",") if v} or {a.steps}
  log = {
    "args": vars(a),
    "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
    "evals": [],
  }
  losses, train_s = [], 0.0
  for i in range(1, a.steps + 1):
    t0 = time.time()
    state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in next(source).items()}, None)
    losses.append(metrics["loss_sum"])
    if i % 50 == 0:
      print(f"{a.name} step {i} loss {np.mean([float(x) for x in losses[-50:]]):.4f}", flush=True)
    train_s += time.time() - t0
    if i not in evals:
      continue
    probe = text_reliance(apply_fn, state.ema_params, diff, data)
    print(
      f"{a.name} step {i} text reliance (x0 error right/other caption): "
      + "  ".join(f"t={r['t']:.2f} {r['ratio']:.3f}" for r in probe),
      flush=True,
    )
    for w in (float(v) for v in a.guidance.split(",")):
      keys = jax.random.split(jax.random.PRNGKey(123), len(captions))
      ims = sample(
        state.ema_params,
        shard(keys),
        shard(jnp.asarray(held.emb)),
        shard(jnp.asarray(held.mask)),
        w,
      )
      ims = np.asarray(jnp.clip((ims + 1) * 127.5, 0, 255).round().astype(jnp.uint8))
      agg = shapes.aggregate([shapes.score(im, c) for im, c in zip(ims, captions)])["overall"]
      row = {
        "step": i,
        "w": w,
        "train_s": round(train_s),
        "text_reliance": probe,
        **{k: round(v, 3) for k, v in agg.items()},
      }
      log["evals"].append(row)
      print(f"{a.name} step {i} w {w:g}: " + json.dumps({k: row[k] for k in agg}), flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(log, f, indent=1)


if __name__ == "__main__":
  main()
