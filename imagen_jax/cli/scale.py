"""`imagen-jax compile-check` and `imagen-jax bench`: a stage at scale, compiled for TPU pods or
timed here."""

from __future__ import annotations

import os
import sys

from imagen_jax.cli import common


def add_parsers(sub) -> None:
  p = sub.add_parser(
    "compile-check",
    help="compile a run's train step (or the T5 encoder) for a TPU topology "
    "on this host (libtpu, no TPU): memory per chip, FLOPs, projected step time",
  )
  common.gin_command(
    p,
    compile_check,
    common.TRAIN_GIN_MODULES,
    example="runs/train_base_64.gin",
    optional_macros=common.RUN_ONLY_MACROS,
  )
  p.add_argument(
    "--topology", required=True, help="e.g. v4:4x4x8 (128 v4 chips), v5p:4x4x4, v6e:16x16, v5e:2x2"
  )
  p.add_argument("--num_slices", type=int, default=1, help="multi-slice: number of such slices")
  p.add_argument(
    "--per_chip_equivalent",
    nargs="?",
    const="auto",
    default=None,
    metavar="SLICE",
    help="compile the same per-chip program on a small slice (default the generation's smallest) "
    "and derive the full topology's figures",
  )
  p.add_argument("--what", choices=["train", "encoder"], default="train")
  p.add_argument(
    "--encoder_size", default="xxl", help="T5 size for --what encoder (bf16 parameters)"
  )
  p.add_argument(
    "--mfu", type=float, default=0.5, help="the MFU the projected step time is stated at"
  )
  p.add_argument("--json", help="write the report as JSON here")
  p.add_argument(
    "--no_flops", action="store_true", help="skip the unscanned lowering that counts FLOPs"
  )
  p.add_argument(
    "--max_host_ram_gb",
    type=float,
    default=-1,
    help="stop the compile at this much host RAM "
    "(default: what the machine has free, less 0.75 GiB; 0: no watch)",
  )
  p = sub.add_parser(
    "bench",
    help="throughput of a stage's train step or sampling on the local devices: step "
    "time, images/s, TFLOP/s, MFU (synthetic in-memory batches)",
  )
  common.gin_command(
    p,
    bench,
    common.TRAIN_GIN_MODULES,
    example="runs/demo_base.gin",
    optional_macros=common.RUN_ONLY_MACROS,
  )
  p.add_argument("--what", choices=["train", "sample"], default="train")
  p.add_argument("--repeats", type=int, default=10, help="timed calls (the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after the compiling one")
  p.add_argument(
    "--batch_size", type=int, default=8, help="sample: images per batch (train: BATCH_SIZE in gin)"
  )
  p.add_argument("--num_steps", type=int, default=16, help="sample: sampling steps per run")
  p.add_argument(
    "--guidance", type=float, default=5.0, help="sample: guidance weight (the guided program)"
  )
  p.add_argument("--json", help="write the result as JSON here")


def compile_check(args) -> int:
  """Compiles in a child process watched for host RAM (unless --max_host_ram_gb 0, or this is the
  child)."""
  from imagen_jax.scale import watch

  if args.max_host_ram_gb != 0 and not os.environ.get(watch.CHILD_ENV):
    return _watched(args)
  from imagen_jax.scale import compile_check as cc

  report = cc.run(
    what=args.what,
    topology=args.topology,
    num_slices=args.num_slices,
    mfu=args.mfu,
    per_chip_equivalent=args.per_chip_equivalent,
    count_flops=not args.no_flops,
    encoder_size=args.encoder_size,
    json_path=args.json,
  )
  print(cc.format_report(report), flush=True)
  return 0 if report.fits else 1


def _watched(args) -> int:
  import imagen_jax
  from imagen_jax.scale import watch

  env = dict(os.environ)
  if (
    imagen_jax.USER_TF_CPP_MIN_LOG_LEVEL is None
  ):  # `import jax` set it here; the child decides afresh
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  limit = watch.limit_bytes(args.max_host_ram_gb)
  res = watch.run_watched([sys.executable, "-m", "imagen_jax.cli"] + args.argv, limit, env=env)
  if res.stopped:
    print(
      "imagen-jax: "
      f"{watch.out_of_host_ram_line(res.peak_rss, limit, args.per_chip_equivalent is not None)}",
      file=sys.stderr,
    )
    return 3
  print(f"  peak host RAM of the compile: {res.peak_rss / 2**30:.2f} GiB", flush=True)
  if args.json and res.returncode in (0, 1):
    watch.record_peak(args.json, res.peak_rss)
  return res.returncode


def bench(args) -> int:
  from imagen_jax.scale import bench as bench_lib

  result = bench_lib.run(
    what=args.what,
    repeats=args.repeats,
    warmup=args.warmup,
    batch_size=args.batch_size,
    num_steps=args.num_steps,
    guidance=args.guidance,
    json_path=args.json,
  )
  report(f"bench {args.what}", result, args.json)
  return 0


def report(title: str, result, json_path) -> None:
  """Prints a benchmark's table (and where its JSON went)."""
  from imagen_jax.scale import bench as bench_lib

  print(f"{title}:")
  print(bench_lib.format_table(result))
  if json_path:
    print(f"bench: wrote {json_path}")
