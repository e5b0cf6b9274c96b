"""`imagen-jax convert if`: pretrained DeepFloyd IF U-Nets (diffusers layout) -> run directories."""

from __future__ import annotations

import time

from imagen_jax.cli import common


def add_parsers(sub) -> None:
  group = sub.add_parser(
    "convert", help="pretrained weights of other projects -> run directories"
  ).add_subparsers(dest="convert_command", required=True)
  p = group.add_parser(
    "if",
    help="a DeepFloyd IF U-Net folder (diffusers: config.json + diffusion_pytorch_model*."
    "safetensors, e.g. IF-I-XL's or IF-II-L's unet/) -> a run directory that sample and "
    "train (init_from) take",
  )
  p.add_argument("--from", dest="src", required=True, help="the diffusers U-Net folder")
  p.add_argument("--to", dest="dst", required=True, help="new (empty) run directory")
  p.add_argument("--variant", help="weights variant to read (e.g. fp16); default the only one")
  p.add_argument("--image_size", type=int, help="output size (default the config's sample_size)")
  p.add_argument("--lowres_size", type=int, help="IF-II: low-res size (default image_size / 4)")
  p.add_argument(
    "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
  )
  p.set_defaults(fn=convert_if)


def convert_if(args) -> int:
  from imagen_jax.models import if_convert

  t0 = time.perf_counter()
  overrides = {"dtype": args.dtype}
  for name in ("image_size", "lowres_size"):
    if getattr(args, name) is not None:
      if getattr(args, name) < 1:
        raise common.UsageError(f"--{name} must be positive, got {getattr(args, name)}")
      overrides[name] = getattr(args, name)
  record = if_convert.convert(args.src, args.dst, args.variant, **overrides)
  cfg = record["config"]
  kind = (
    f"IF-II {cfg['lowres_size']}->{cfg['image_size']}px"
    if cfg["lowres_size"]
    else (f"IF-I {cfg['image_size']}px")
  )
  print(
    f"converted {args.src} -> {args.dst}: {kind}, {record['parameters'] / 1e6:.2f}M parameters, "
    f"in {time.perf_counter() - t0:.1f}s"
  )
  return 0
