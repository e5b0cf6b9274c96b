"""`imagen-jax sample`: a cascade (or a contiguous part of it) from training runs."""

from __future__ import annotations

from pathlib import Path

from imagen_jax.cli import common


def add_parsers(sub) -> None:
  p = sub.add_parser(
    "sample", help="sample a cascade (or part of it) from training runs: PNGs, grids, sweeps"
  )
  common.gin_command(p, sample, common.SAMPLE_GIN_MODULES, example="runs/sample_demo.gin")
  p.add_argument("--prompts", nargs="*", help="prompt texts")
  p.add_argument("--prompts_file", help="a text file, one prompt per line")
  p.add_argument("--out", required=True, help="output directory (new or empty)")
  p.add_argument(
    "--stages", help="comma-separated contiguous stages to run (default: the whole cascade)"
  )
  p.add_argument(
    "--seed",
    type=int,
    default=0,
    help="image (prompt k, sample j) gets seed + k * "
    "samples_per_prompt + j (settings.json lists every image's seed)",
  )
  p.add_argument(
    "--samples_per_prompt", type=int, default=1, help="images per prompt (or per input image)"
  )
  p.add_argument(
    "--batch_size",
    type=int,
    default=8,
    help="images per device batch call (rounded up to a multiple of the local device count)",
  )
  add_setting_flags(
    p, ("guidance", "steps", "thresholding", "aug_level", "sampler", "spacing", "ddim_eta")
  )
  common.add_negative_flags(p)
  p.add_argument(
    "--checkpoint_step",
    action="append",
    metavar="STAGE=STEP",
    help="a checkpoint other than the latest",
  )
  p.add_argument(
    "--lowres_images",
    help="folder of low-resolution inputs for a cascade that starts at an SR stage",
  )
  p.add_argument(
    "--init_images",
    help="img2img: folder of images the first stage starts from; with --mask: the image(s) to "
    "inpaint (a file or a folder, any square size)",
  )
  p.add_argument(
    "--mask",
    help="inpainting: a mask image (or a folder, one per --init_images image); white = keep "
    "(see --mask_keep); every stage keeps the known region at its resolution",
  )
  p.add_argument(
    "--mask_keep",
    choices=("white", "black"),
    default="white",
    help="which pixels of the mask are kept (the rest is generated)",
  )
  p.add_argument(
    "--resample",
    type=int,
    default=1,
    help="inpainting: RePaint resampling, runs per step (jump length 1; 1 = none)",
  )
  p.add_argument(
    "--no_grids",
    action="store_true",
    help="write no grid images (large runs, e.g. COCO FID-30K: "
    "the stage folders then hold only samples)",
  )
  p.add_argument(
    "--strength",
    type=float,
    default=0.8,
    help="img2img: start at t = strength (0: the image, 1: pure noise)",
  )


SETTING_HELP = {
  "guidance": "guidance weight(s) w",
  "steps": "sampling step count(s)",
  "thresholding": "none | static | dynamic[:PERCENTILE], or a list",
  "aug_level": "SR noise-conditioning augmentation level(s) in [0, 1]",
  "sampler": "ddpm | ddim | dpmpp_2m | dpmpp_3m | dpmpp_2m_sde",
  "spacing": "step spacing: uniform (in t) | logsnr | karras",
  "ddim_eta": "DDIM stochasticity in [0, 1]",
}


def add_setting_flags(parser, flags) -> None:
  """The per-stage setting flags `--FLAG [STAGE=]V[,V...]` (repeatable; several values make a
  sweep)."""
  for flag in flags:
    parser.add_argument(
      f"--{flag}",
      action="append",
      metavar="[STAGE=]V[,V...]",
      help=f"{SETTING_HELP[flag]}; several comma-separated values make a sweep grid",
    )


def sample(args) -> int:
  import sys

  from imagen_jax.sample import cascade

  result = cascade.sample(
    cascade.cascade_config(),
    prompts=common.prompts(args.prompts, args.prompts_file),
    out_dir=args.out,
    seed=args.seed,
    samples_per_prompt=args.samples_per_prompt,
    batch_size=args.batch_size,
    only=common.name_list(args.stages or "") or None,
    overrides=common.setting_overrides(args),
    checkpoint_steps=common.checkpoint_steps(args.checkpoint_step),
    lowres_images=args.lowres_images,
    init_images=args.init_images,
    strength=args.strength,
    negative_prompts=common.negative_prompts(args),
    masks=args.mask,
    mask_keep=args.mask_keep,
    resample=args.resample,
    grids=not args.no_grids,
    record_extra={"command": ["imagen-jax"] + list(sys.argv[1:])},
  )
  grid = "no grids" if args.no_grids else f"grid {Path(result.out_dir) / 'grid.png'}"
  print(
    f"sample: wrote {len(result.jobs)} image(s) per stage setting to {result.out_dir}; {grid}; "
    "settings "
    f"{Path(result.out_dir) / 'settings.json'}"
  )
  for st in result.stages:
    if len(st.settings) > 1 and not args.no_grids:
      print(
        f"sample: sweep grid of stage {st.name}: {Path(result.out_dir) / st.name / 'sweep.png'}"
      )
  return 0
