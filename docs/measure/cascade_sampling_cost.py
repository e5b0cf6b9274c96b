"""Sampling cost per image of the paper-size cascade: network evaluations and FLOPs per stage.

For each paper-size stage network (gin_configs/models/), XLA's cost analysis of one guided network
evaluation (the doubled batch of one image: conditional + unconditional half), from the lowered
program with abstract parameters (nothing is allocated or run), times the steps of each sampler
setting.

  JAX_PLATFORMS=cpu .venv/bin/python docs/measure/cascade_sampling_cost.py \
    --json docs/bench/cascade_sampling_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import flax.linen as nn
import gin
import jax

from imagen_jax import models
from imagen_jax.gin_utils import parse_gin
from imagen_jax.scale import flops as flops_lib

# (stage, network gin, config, the resolution it samples at: the 1024 stage trains on 256 crops)
STAGES = (
  ("base 64", "models/base_64_2b.gin", "UNetConfig", 64),
  ("sr 64->256", "models/sr_256_600m.gin", "EfficientUNetConfig", 256),
  ("sr 256->1024", "models/sr_1024_400m.gin", "EfficientUNetConfig", 1024),
)
# (label, steps per stage): the paper's 256 ancestral steps, and DPM-Solver++ at 25.
SETTINGS = (("ddpm 256 steps (the paper)", 256), ("dpmpp_2m 25 steps", 25))


def guided_eval_flops(gin_file: str, config_name: str, size: int):
  gin.clear_config()
  parse_gin([gin_file], [])
  cfg = {"UNetConfig": models.UNetConfig, "EfficientUNetConfig": models.EfficientUNetConfig}[
    config_name
  ]()
  cfg = dataclasses.replace(cfg, scan_layers=False)  # a scanned body is counted once
  model = models.build_model(cfg)
  z, log_snr, cond = models.example_inputs(cfg, 2, image_size=size)
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a, deterministic=True))
  lowered = apply.lower(nn.unbox(models.abstract_params(cfg)), z, log_snr, cond)
  params = sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(models.abstract_params(cfg))))
  return cfg, flops_lib.compiled_flops(lowered), params


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", required=True)
  args = ap.parse_args()
  rows = []
  for name, gin_file, config_name, size in STAGES:
    t0 = time.perf_counter()
    cfg, flops, params = guided_eval_flops(gin_file, config_name, size)
    row = {
      "stage": name,
      "gin": gin_file,
      "parameters": int(params),
      "image_size": size,
      "guided_eval_flops": flops,
      "per_image": {
        label: {"network_evaluations": steps, "flops": flops * steps if flops else None}
        for label, steps in SETTINGS
      },
      "lowering_seconds": round(time.perf_counter() - t0, 1),
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
  total = {label: sum(r["per_image"][label]["flops"] or 0 for r in rows) for label, _ in SETTINGS}
  result = {"date": time.strftime("%Y-%m-%d"), "stages": rows, "cascade_flops_per_image": total}
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(total))


if __name__ == "__main__":
  main()
