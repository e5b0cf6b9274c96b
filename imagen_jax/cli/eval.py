"""`imagen-jax eval ...`: alignment and quality sweeps, DrawBench, FID, CLIP score and their
inputs."""

from __future__ import annotations

from pathlib import Path

from imagen_jax.cli import common
from imagen_jax.cli.sample import add_setting_flags

SR_SETTING_FLAGS = ("steps", "guidance", "aug_level", "thresholding")
# The setting flags of the commands that sample a whole cascade (guidance and thresholding are
# their sweep's own options).
CASCADE_FLAGS = ("steps", "sampler", "spacing")


def add_parsers(sub) -> None:
  ev = sub.add_parser(
    "eval",
    help="evaluations: shapes alignment and FID/CLIP sweeps, DrawBench sampling, "
    "rating page and tally, FID, CLIP score",
  )
  group = ev.add_subparsers(dest="eval_command", required=True)
  for name, fn, helptext in (
    (
      "shapes",
      shapes,
      "alignment of a cascade on held-out synthetic captions over a guidance x thresholding "
      "sweep: JSON and plots",
    ),
    (
      "fid-clip",
      fid_clip,
      "FID and CLIP score of a cascade over a guidance x thresholding sweep: JSON and the "
      "FID-against-CLIP plot",
    ),
    ("drawbench", drawbench, "sample every DrawBench prompt with one cascade (resumable)"),
    (
      "sr-conditioning",
      sr_conditioning,
      "does an SR stage follow its input: x0 error against t with its own, another image's and "
      "a zero low-res input, and the downsample consistency of its samples",
    ),
  ):
    p = group.add_parser(name, help=helptext)
    common.gin_command(
      p,
      fn,
      common.SAMPLE_GIN_MODULES,
      example="runs/sample_demo.gin",
      optional_macros=common.RUN_DIR_MACROS,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
      "--checkpoints",
      action="append",
      metavar="STAGE=RUN_DIR[@STEP]",
      help="the run (and step) each stage samples from, replacing the gin config's",
    )
    add_setting_flags(p, SR_SETTING_FLAGS if name == "sr-conditioning" else CASCADE_FLAGS)
    if name in ("shapes", "fid-clip"):
      common.add_negative_flags(p)
    if name == "drawbench":
      p.add_argument("--negative_prompt", help="a negative prompt for every prompt")
    p.add_argument("--batch_size", type=int, default=8, help="images per sampler call")
    p.add_argument(
      "--label",
      default=None if name == "drawbench" else "model",
      help="the model's name in outputs",
    )
    if name in ("shapes", "fid-clip"):
      p.add_argument("--guidance", default="1,2,3,5,8", help="guidance weights of the swept stage")
      p.add_argument("--sweep_stage", help="the stage swept (default the first)")
  _add_sweep_options(group)
  _add_drawbench_tools(group)
  _add_metric_tools(group)


def _add_sweep_options(group) -> None:
  """The options of eval shapes, fid-clip and drawbench beyond the shared ones."""
  p = group.choices["shapes"]
  p.add_argument("--num_prompts", type=int, default=64, help="held-out captions")
  p.add_argument(
    "--seed", type=int, default=1000, help="scene seed of the held-out captions (training uses 0)"
  )
  p.add_argument("--start", type=int, default=0, help="first scene index")
  p.add_argument(
    "--thresholding", default="none,static,dynamic", help="none, static, dynamic[:PERCENTILE]"
  )
  p.add_argument("--train_seed", type=int, default=0, help="the training data's scene seed")
  p.add_argument(
    "--train_examples",
    type=int,
    default=0,
    help="training scenes, to count unseen captions (0: skip)",
  )
  p.add_argument(
    "--baseline",
    action="append",
    metavar="SHAPES_JSON",
    help="another run's shapes.json (or its folder), drawn dashed in the plots",
  )
  p.add_argument("--no_images", action="store_true", help="do not write every image")
  p = group.choices["fid-clip"]
  p.add_argument("--prompts_file", required=True, help="one prompt per line (e.g. COCO captions)")
  p.add_argument(
    "--ref", required=True, help="reference statistics (.npz) or a folder of reference images"
  )
  p.add_argument(
    "--inception", required=True, help="converted FID Inception weights (convert-inception)"
  )
  p.add_argument("--clip", required=True, help="Hugging Face CLIP checkpoint folder")
  p.add_argument("--thresholding", default="dynamic", help="none, static, dynamic[:PERCENTILE]")
  p.add_argument("--seed", type=int, default=0, help="image k has seed + k")
  p.add_argument(
    "--save_images", action="store_true", help="write the last stage's images per setting"
  )
  p = group.choices["sr-conditioning"]
  p.add_argument("--stage", help="the SR stage measured (default the last SR stage)")
  p.add_argument("--num_images", type=int, default=32, help="held-out scenes")
  p.add_argument(
    "--seed", type=int, default=1000, help="scene seed of the held-out scenes (training uses 0)"
  )
  p.add_argument("--times", default="0.5,0.7,0.8,0.9,0.95,0.99", help="the t of the x0-error curve")
  p.add_argument(
    "--no_cascade",
    action="store_true",
    help="load only the SR stage (--stage) and measure it on the held-out renders alone",
  )
  p.add_argument("--no_images", action="store_true", help="do not write the input/output grids")
  p = group.choices["drawbench"]
  p.add_argument("--csv", required=True, help="DrawBench CSV (header Prompts,Category)")
  p.add_argument("--samples_per_prompt", type=int, default=8)
  p.add_argument(
    "--seed", type=int, default=0, help="image j of prompt k has seed + k * samples_per_prompt + j"
  )
  p.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")


def _add_drawbench_tools(group) -> None:
  """drawbench-page and drawbench-tally."""
  p = group.add_parser(
    "drawbench-page", help="a static side-by-side rating page for two sample folders"
  )
  p.add_argument("--a", required=True, help="model A's `eval drawbench` folder")
  p.add_argument("--b", required=True, help="model B's `eval drawbench` folder")
  p.add_argument("--out", required=True, help="new page folder (index.html + img/)")
  p.add_argument(
    "--key", help="where to write the un-blinding key (default: OUT-key.json beside the folder)"
  )
  p.add_argument(
    "--seed", type=int, default=None, help="seed of the left/right draws (default: random)"
  )
  p.set_defaults(fn=drawbench_page)
  p = group.add_parser(
    "drawbench-tally",
    help="un-blind raters' answers: preference rates per category with "
    "bootstrap 95%% intervals, table and bar chart",
  )
  p.add_argument("answers", nargs="+", help="answer files downloaded from the page")
  p.add_argument("--key", required=True, help="the page's key file (drawbench-page wrote it)")
  p.add_argument("--out", default="drawbench_tally", help="folder for tally.json and tally.png")
  p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  p.set_defaults(fn=drawbench_tally)


def _add_metric_tools(group) -> None:
  """convert-inception, fid, fid-bench, coco-prompts and clip."""
  p = group.add_parser(
    "convert-inception",
    help="the published FID Inception weights (pytorch-fid's .pth) -> "
    "safetensors, once (needs PyTorch)",
  )
  p.add_argument("--from", dest="src", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  p.add_argument("--to", dest="dst", required=True, help="output folder")
  p.set_defaults(fn=convert_inception)
  p = group.add_parser(
    "fid", help="FID of a folder of samples against reference statistics or images"
  )
  p.add_argument("--samples", required=True, help="folder of generated images (one size)")
  p.add_argument(
    "--ref", required=True, help="reference statistics (.npz with mu, sigma) or a folder of images"
  )
  p.add_argument("--weights", required=True, help="folder (or file) written by convert-inception")
  p.add_argument("--image_size", type=int, help="check that the samples are this size")
  p.add_argument(
    "--center_crop",
    type=int,
    help="reference images: central square resized to this size (bicubic)",
  )
  p.add_argument(
    "--resize",
    choices=["tf1", "pytorch"],
    default="tf1",
    help="299x299 bilinear resize: "
    "TensorFlow 1's (original FID, torch-fidelity) or PyTorch's (pytorch-fid)",
  )
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--save_stats", help="write the samples' statistics (.npz) here")
  p.add_argument("--json", help="write the result as JSON here")
  p.set_defaults(fn=fid)
  p = group.add_parser(
    "fid-bench",
    help="throughput of FID feature extraction on the local devices: images/s, "
    "TFLOP/s, MFU (random uint8 images; random weights unless --weights)",
  )
  p.add_argument(
    "--weights", help="converted Inception weights (default: random; the speed is the same)"
  )
  p.add_argument("--image_size", type=int, default=256, help="input size (resized to 299 inside)")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--resize", choices=["tf1", "pytorch"], default="tf1")
  p.add_argument("--repeats", type=int, default=5, help="timed calls (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls, the compiling one included")
  p.add_argument("--json", help="write the result as JSON here")
  p.set_defaults(fn=fid_bench)
  p = group.add_parser(
    "coco-prompts",
    help="COCO FID-30K inputs: N random val2014 images, one caption each "
    "(prompts.txt) and links to the images (ref_images/)",
  )
  p.add_argument("--annotations", required=True, help="captions_val2014.json")
  p.add_argument("--images", required=True, help="the val2014/ image folder")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--num", type=int, default=30000)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(fn=coco_prompts)
  p = group.add_parser(
    "clip", help="CLIP score (100 x cosine, clipped at 0) of images against their prompts"
  )
  p.add_argument("--samples", required=True, help="folder of images (sorted by name)")
  p.add_argument(
    "--prompts", required=True, help="text file, one prompt per image or per equal group of images"
  )
  p.add_argument(
    "--checkpoint",
    required=True,
    help="Hugging Face CLIP folder (config.json, model.safetensors, tokenizer.json)",
  )
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--json", help="write the result as JSON here")
  p.set_defaults(fn=clip)


def _cascade(args, flags=None, only=None):
  """The cascade the sampling gin config describes (or its stages `only`, the first given low-res
  inputs), with --checkpoints, the setting flags and --batch_size applied."""
  from imagen_jax.sample import cascade

  return cascade.prepare(
    cascade.cascade_config(),
    only=only,
    has_lowres_input=only is not None,
    batch_size=args.batch_size,
    overrides=common.setting_overrides(args, CASCADE_FLAGS if flags is None else flags),
    **common.checkpoints(args.checkpoints),
  )


def shapes(args) -> int:
  from imagen_jax.eval.tasks import shapes_eval

  baselines = [shapes_eval.read_result(b) for b in args.baseline or []]
  result = shapes_eval.evaluate(
    _cascade(args),
    args.out,
    num_prompts=args.num_prompts,
    seed=args.seed,
    start=args.start,
    guidance=common.float_list(args.guidance, "--guidance"),
    thresholding=common.name_list(args.thresholding),
    sweep_stage=args.sweep_stage,
    label=args.label,
    train_seed=args.train_seed,
    train_examples=args.train_examples,
    baselines=baselines,
    save_images=not args.no_images,
    command=common.command_line(args),
    negative_prompts=common.negative_prompts(args),
  )
  print(shapes_eval.summary_table(result, baselines))
  for stage, b in result["best"].items():
    print(
      f"eval shapes: {stage}: best all-correct {b['all']:.3f} at w={b['guidance']:g} "
      f"{b['thresholding']}"
    )
  print(
    f"eval shapes: wrote {Path(args.out) / 'shapes.json'} and plots in {args.out} "
    f"({result['seconds']:.0f}s)"
  )
  return 0


def fid_clip(args) -> int:
  from imagen_jax.eval.tasks import fid_clip as quality

  result = quality.evaluate(
    _cascade(args),
    common.prompts(None, args.prompts_file),
    args.out,
    ref=args.ref,
    inception_weights=args.inception,
    clip_checkpoint=args.clip,
    guidance=common.float_list(args.guidance, "--guidance"),
    thresholding=common.name_list(args.thresholding),
    batch_size=args.batch_size,
    seed=args.seed,
    sweep_stage=args.sweep_stage,
    label=args.label,
    save_images=args.save_images,
    command=common.command_line(args),
    negative_prompts=common.negative_prompts(args),
  )
  for r in result["rows"]:
    m = r["metrics"]["overall"]
    print(
      f"w={r['guidance']:g} {r['thresholding']}: FID {m['fid']:.3f}  CLIP score {m['clip']:.3f}"
    )
  print(
    f"eval fid-clip: wrote {Path(args.out) / 'fid_clip.json'} and "
    f"{Path(args.out) / 'fid_vs_clip.png'}"
  )
  return 0


def drawbench(args) -> int:
  from imagen_jax.eval.tasks import drawbench as db

  prompts = db.load_prompts(args.csv)
  manifest = db.sample_prompts(
    _cascade(args),
    prompts[: args.limit] if args.limit else prompts,
    args.out,
    samples_per_prompt=args.samples_per_prompt,
    seed=args.seed,
    label=args.label,
    command=common.command_line(args),
    negative_prompt=args.negative_prompt,
  )
  print(
    f"eval drawbench: {len(manifest['prompts'])} prompts x {args.samples_per_prompt} samples in "
    f"{args.out}"
  )
  return 0


def drawbench_page(args) -> int:
  from imagen_jax.eval.tasks import drawbench as db

  key = db.write_page(args.a, args.b, args.out, key_path=args.key, seed=args.seed)
  key_path = args.key or db.default_key_path(args.out)
  print(
    f"eval drawbench-page: {len(key['prompts'])} prompts; open {Path(args.out) / 'index.html'} in "
    "a browser "
    f"(send raters the folder); the key (which side is which) is {key_path}: keep it away from "
    "raters"
  )
  return 0


def drawbench_tally(args) -> int:
  from imagen_jax.eval.tasks import drawbench as db

  result = db.tally_files(
    args.answers, args.key, args.out, resamples=args.resamples, seed=args.seed
  )
  print(db.format_tally(result))
  print(
    f"eval drawbench-tally: wrote {Path(args.out) / 'tally.json'} and "
    f"{Path(args.out) / 'tally.png'}"
  )
  return 0


def convert_inception(args) -> int:
  from imagen_jax.eval.networks import inception

  out = inception.convert(args.src, args.dst)
  print(
    f"eval convert-inception: wrote {out} (safetensors; the only file `imagen-jax eval fid` reads)"
  )
  return 0


def fid(args) -> int:
  from imagen_jax.eval.metrics import fid as fid_lib

  r = fid_lib.evaluate(
    args.samples,
    args.ref,
    args.weights,
    image_size=args.image_size,
    center_crop=args.center_crop,
    resize=args.resize,
    batch_size=args.batch_size,
    save_stats=args.save_stats,
    json_path=args.json,
  )
  num_ref = r["num_ref"] if r["num_ref"] >= 0 else "?"
  print(
    f"FID {r['fid']:.4f} ({r['num_samples']} samples from {args.samples} against {num_ref} "
    "reference images, "
    f"{args.ref}); features at {r['sample_images_per_second']:.1f} images/s"
  )
  return 0


def fid_bench(args) -> int:
  from imagen_jax.cli.scale import report
  from imagen_jax.scale import bench

  result = bench.bench_fid(
    batch_size=args.batch_size,
    image_size=args.image_size,
    resize=args.resize,
    weights=args.weights,
    repeats=args.repeats,
    warmup=args.warmup,
    json_path=args.json,
  )
  report("bench fid features", result, args.json)
  return 0


def coco_prompts(args) -> int:
  from imagen_jax.eval.tasks import coco

  record = coco.make_prompts(args.annotations, args.images, args.out, num=args.num, seed=args.seed)
  out = Path(args.out)
  print(
    f"eval coco-prompts: {record['num']} captions in {out / 'prompts.txt'}, their images linked in "
    f"{out / 'ref_images'}, the pairs in {out / 'coco_fid.json'}"
  )
  return 0


def clip(args) -> int:
  from imagen_jax.eval.networks import clip as clip_lib

  r = clip_lib.score_folder(
    args.samples, args.prompts, args.checkpoint, batch_size=args.batch_size, json_path=args.json
  )
  print(
    f"CLIP score {r['clip_score']:.3f} over {r['pairs']} (image, prompt) pairs "
    f"({r['images_per_prompt']} "
    f"image(s) per prompt); {r['pairs_per_second']:.1f} pairs/s"
  )
  return 0


def sr_conditioning(args) -> int:
  from imagen_jax.eval.tasks import sr_conditioning as src

  if args.no_cascade and not args.stage:
    raise common.UsageError("--no_cascade needs --stage (the SR stage to load)")
  times = common.float_list(args.times, "--times")  # checked before any stage is loaded
  result = src.evaluate(
    _cascade(args, SR_SETTING_FLAGS, only=[args.stage] if args.no_cascade else None),
    args.out,
    stage=args.stage,
    num_images=args.num_images,
    seed=args.seed,
    times=times,
    label=args.label,
    save_images=not args.no_images,
    command=common.command_line(args),
  )
  for what, s in result["samples"].items():
    print(
      f"eval sr-conditioning: samples from {what}: {s['psnr_own_db']:.1f} dB against their own "
      f"inputs, {s['psnr_mismatched_db']:.1f} dB against another's ({s['margin_db']:+.1f} dB)"
    )
  print(f"eval sr-conditioning: wrote {Path(args.out) / 'sr_conditioning.json'}")
  return 0
