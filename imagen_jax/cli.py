"""The `imagen-jax` command line.

  imagen-jax t5 convert --from DIR --to DIR [--size SIZE] [--param_dtype bfloat16]
  imagen-jax t5 encode --checkpoint DIR --vocab SPM (--prompts P ... | --prompts_file F) [--max_length 128]
  imagen-jax cache-embeddings --gin_file FILE [--gin_file ...] [--gin.KEY=VALUE ...]
  imagen-jax train --gin_file FILE [--gin_file ...] [--gin.KEY=VALUE ...] [--coordinator_address H:P ...]
  imagen-jax sample --gin_file FILE (--prompts P ... | --prompts_file F) --out DIR [--stages base,sr]
      [--seed S] [--samples_per_prompt N] [--batch_size B] [--guidance [STAGE=]W1,W2 ...] [--steps ...]
      [--thresholding [STAGE=]none|static|dynamic[:P]] [--aug_level ...] [--sampler ...] [--checkpoint_step STAGE=N]
      [--lowres_images DIR] [--init_images DIR --strength S]
  imagen-jax compile-check --gin_file FILE --topology v4:4x4x8 [--num_slices N] [--per_chip_equivalent [SLICE]]
      [--what train|encoder] [--encoder_size xxl] [--mfu 0.5] [--json FILE] [--max_host_ram_gb G] [--gin.KEY=VALUE ...]
  imagen-jax bench --gin_file FILE [--what train|sample] [--batch_size B] [--repeats N] [--json FILE] [--gin.KEY=VALUE ...]
  imagen-jax eval shapes --gin_file FILE --out DIR [--checkpoints STAGE=RUN_DIR[@STEP] ...] [--num_prompts N]
      [--guidance 1,2,3,5,8] [--thresholding none,static,dynamic] [--baseline SHAPES_JSON] [--label NAME]
  imagen-jax eval drawbench --gin_file FILE --csv DRAWBENCH.csv --out DIR [--samples_per_prompt 8]
  imagen-jax eval drawbench-page --a DIR --b DIR --out PAGE_DIR [--key KEY.json]
  imagen-jax eval drawbench-tally ANSWERS.json ... --key KEY.json [--out DIR]
  imagen-jax eval convert-inception --from pt_inception-2015-12-05-6726825d.pth --to DIR
  imagen-jax eval fid-clip --gin_file FILE --prompts_file F --ref STATS --inception DIR --clip DIR --out DIR
      [--guidance 1,2,3,5,8] [--thresholding dynamic]
  imagen-jax eval coco-prompts --annotations captions_val2014.json --images val2014/ --out DIR [--num 30000]
  imagen-jax eval clip --samples DIR --prompts FILE --checkpoint HF_CLIP_DIR [--json F]
  imagen-jax eval fid --samples DIR --ref STATS.npz|DIR --weights DIR [--center_crop S] [--save_stats F] [--json F]
  imagen-jax eval fid-bench [--weights DIR] [--image_size 256] [--batch_size 64] [--json F]

Bad input (missing files, mismatched checkpoints, bad arguments) ends with a one-line error on stderr
and exit code 2; a training run stopped by too many non-finite steps in a row exits with code 3;
compile-check exits 0 when the step fits, 1 when it does not, 3 when it stopped before exhausting host RAM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional


class UsageError(Exception):
  """Bad input from the user: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
  """argparse with the CLI's one-line errors (argparse prints the whole usage block first)."""

  def error(self, message):
    self.exit(2, f"imagen-jax: error: {message} (see {self.prog} --help)\n")


def _t5_config_arg(args, **overrides):
  from imagen_jax.text import t5
  return None if args.size is None else t5.t5_config(args.size, **overrides)


def cmd_t5_convert(args) -> int:
  from imagen_jax.text import checkpoints
  overrides = {"param_dtype": args.param_dtype}
  config = _t5_config_arg(args, **overrides)
  t0 = time.perf_counter()
  config, params = checkpoints.load_any(args.src, config)
  if config.param_dtype != args.param_dtype:
    import dataclasses
    config = dataclasses.replace(config, param_dtype=args.param_dtype)
    params = checkpoints.cast_params(params, args.param_dtype)
  checkpoints.save_params(args.dst, config, params)
  arrays = checkpoints.flatten(params).values()
  n, nbytes = sum(v.size for v in arrays), sum(v.nbytes for v in arrays)
  print(f"converted {args.src} -> {args.dst}: {n / 1e6:.2f}M parameters, {nbytes / 2**30:.3f} GiB "
        f"({config.param_dtype}), d_model={config.d_model} layers={config.num_layers} heads={config.num_heads} "
        f"in {time.perf_counter() - t0:.1f}s")
  return 0


def cmd_t5_encode(args) -> int:
  import numpy as np

  from imagen_jax.text import checkpoints
  from imagen_jax.text.encoder import TextEncoder
  from imagen_jax.text.tokenizer import Tokenizer
  prompts = _read_prompts(args)
  try:
    tokenizer = Tokenizer(args.vocab, args.max_length)
  except (FileNotFoundError, ValueError) as e:
    raise UsageError(str(e)) from None
  config, params = checkpoints.load_any(args.checkpoint, _t5_config_arg(args))
  if tokenizer.vocab_size > config.vocab_size:
    raise UsageError(f"vocabulary has {tokenizer.vocab_size} pieces but the encoder only {config.vocab_size} rows")
  batch = tokenizer(prompts)
  t0 = time.perf_counter()
  encoder = TextEncoder(config, params, batch_size=args.batch_size)
  emb, mask = encoder.encode(batch.tokens)
  dt = time.perf_counter() - t0
  for i, prompt in enumerate(prompts):
    flag = " (truncated)" if batch.truncated[i] else ""
    print(f"[{i}] tokens={int(mask[i].sum())}{flag} |emb|={float(np.abs(emb[i][mask[i]]).mean()):.4f} {prompt[:60]!r}")
  s = batch.stats
  print(f"embeddings {tuple(emb.shape)} {emb.dtype}, mask {tuple(mask.shape)}; captions={s.captions} "
        f"truncated={s.truncated} empty={s.empty} invalid_utf8={s.invalid_utf8}; encode {dt:.2f}s")
  return 0


def cmd_cache_embeddings(args) -> int:
  from imagen_jax.data import cache, tasks
  from imagen_jax.data.sources import DataError
  try:
    tasks.register_source_task()
    summary = cache.cache_embeddings()
  except (DataError, ValueError) as e:
    raise UsageError(str(e).splitlines()[0]) from None
  print(f"cache {summary.line()}")
  return 0


def cmd_train(args) -> int:
  from imagen_jax.data.sources import DataError
  from imagen_jax.train import distributed, loop
  from imagen_jax.train.checkpoints import RunDirError
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  except ValueError as e:
    raise UsageError(str(e)) from None
  try:
    summary = loop.train()
  except (loop.TrainError, RunDirError, DataError, ValueError) as e:   # ValueError: a config's own validation
    raise UsageError(_one_line(e)) from None
  except loop.NonFiniteError as e:
    print(f"imagen-jax: stopped: {_one_line(e)}", file=sys.stderr)
    return 3
  last = f", loss {summary.history[-1][1]:.4f}" if summary.history else ""
  print(f"train: {summary.stopped} at step {summary.final_step}{last}; checkpoints {summary.checkpoints or 'none new'}")
  return 0


def _read_prompts(args) -> List[str]:
  prompts: List[str] = list(args.prompts or [])
  if args.prompts_file:
    try:
      prompts += [p for p in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if p.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise UsageError(f"cannot read prompts file {args.prompts_file}: {e}") from None
  if not prompts:
    raise UsageError("no prompts: give --prompts or --prompts_file")
  return prompts


def cmd_sample(args) -> int:
  from imagen_jax.sample import cascade, settings
  prompts = _read_prompts(args)
  flags = {f: getattr(args, f) for f in settings.FLAG_FIELDS}
  only = [x for x in (args.stages or "").split(",") if x] or None
  steps = {}
  for item in args.checkpoint_step or []:
    name, eq, value = item.partition("=")
    if not eq or not value.isdigit():
      raise UsageError(f"--checkpoint_step {item}: write STAGE=STEP, e.g. base=5000")
    steps[name] = int(value)
  try:
    result = cascade.sample(prompts=prompts, out_dir=args.out, seed=args.seed, samples_per_prompt=args.samples_per_prompt,
                            batch_size=args.batch_size, only=only, setting_flags=flags, checkpoint_steps=steps,
                            lowres_images=args.lowres_images, init_images=args.init_images, strength=args.strength,
                            grids=not args.no_grids,
                            record_extra={"command": ["imagen-jax"] + list(sys.argv[1:])})
  except ValueError as e:     # SampleError, SettingsError, RunDirError, ImageError and configs' own checks
    raise UsageError(_one_line(e)) from None
  grid = "no grids" if args.no_grids else f"grid {Path(result.out_dir) / 'grid.png'}"
  print(f"sample: wrote {len(result.jobs)} image(s) per stage setting to {result.out_dir}; {grid}; settings "
        f"{Path(result.out_dir) / 'settings.json'}")
  for st in result.stages:
    if len(st.settings) > 1 and not args.no_grids:
      print(f"sample: sweep grid of stage {st.name}: {Path(result.out_dir) / st.name / 'sweep.png'}")
  return 0


CHILD_ENV = "IMAGEN_COMPILE_CHECK_CHILD"


def cmd_compile_check(args) -> int:
  """Compiles in a child process watched for host RAM (unless --max_host_ram_gb 0, or this is the child)."""
  import os
  if args.max_host_ram_gb != 0 and not os.environ.get(CHILD_ENV):
    return _watch_compile_check(args)
  import json
  from imagen_jax.train import compile_check as cc
  try:
    if args.what == "encoder":
      run = cc.train_run_from_gin() if _has_network() else None
      batch = run.global_batch if run else 2048
      mesh = run.mesh_shape if run else (-1, 1, 1)
      report = cc.check_encoder(args.encoder_size, args.topology, global_batch=batch, mesh_shape=mesh,
                                num_slices=args.num_slices, mfu=args.mfu)
    else:
      pce = args.per_chip_equivalent
      if pce == "auto":
        pce = cc.SMALL_SLICES[cc.generation(args.topology)]
      report = cc.check_train(cc.train_run_from_gin(), args.topology, num_slices=args.num_slices, mfu=args.mfu,
                              per_chip_equivalent=pce, count_flops=not args.no_flops)
  except cc.CompileCheckError as e:
    raise UsageError(str(e)) from None
  print(cc.format_report(report), flush=True)
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
  return 0 if report.fits else 1


def _has_network() -> bool:
  from imagen_jax import models
  try:
    models.model_config()
    return True
  except Exception:
    return False


def _watch_compile_check(args) -> int:
  """Runs this command again in a child process and polls its resident memory; stops it, with one line,
  before the machine runs out (the kernel's OOM killer would end it with no word)."""
  import json
  import os
  import subprocess
  from imagen_jax.train import compile_check as cc
  avail = cc.available_bytes() or 0.0
  limit = args.max_host_ram_gb * 2 ** 30 if args.max_host_ram_gb and args.max_host_ram_gb > 0 else avail - 0.75 * 2 ** 30
  import imagen_jax
  env = dict(os.environ, **{CHILD_ENV: "1"})
  if imagen_jax.USER_TF_CPP_MIN_LOG_LEVEL is None:      # `import jax` set it here; the child decides afresh
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  child = subprocess.Popen([sys.executable, "-m", "imagen_jax.cli"] + args.argv, env=env)
  peak = 0.0
  while child.poll() is None:
    rss = cc.rss_bytes(child.pid) or 0.0
    peak = max(peak, rss)
    left = cc.available_bytes()
    if rss > limit or (left is not None and left < 0.5 * 2 ** 30):
      child.kill()
      child.wait()
      print(f"imagen-jax: {cc.out_of_host_ram_line(peak, limit, args.per_chip_equivalent is not None)}", file=sys.stderr)
      return 3
    time.sleep(0.25)
  print(f"  peak host RAM of the compile: {peak / 2 ** 30:.2f} GiB", flush=True)
  if args.json and child.returncode in (0, 1) and Path(args.json).exists():
    record = json.loads(Path(args.json).read_text())
    record["peak_host_rss"] = peak
    Path(args.json).write_text(json.dumps(record, indent=1))
  return child.returncode


def cmd_bench(args) -> int:
  from imagen_jax import bench
  from imagen_jax.train import compile_check as cc
  try:
    bench.check_counts(args.repeats, args.warmup)      # before minutes of compiling
    run = cc.train_run_from_gin()
  except ValueError as e:             # CompileCheckError, bad counts
    raise UsageError(_one_line(e)) from None
  try:
    if args.what == "train":
      result = bench.bench_train(run, repeats=args.repeats, warmup=args.warmup)
    else:
      result = bench.bench_sample(run, batch_size=args.batch_size, num_steps=args.num_steps, guidance=args.guidance,
                                  repeats=args.repeats, warmup=args.warmup)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  return _report_bench(f"bench {args.what}", result, args.json)


def _report_bench(title: str, result, json_path: Optional[str]) -> int:
  from imagen_jax import bench
  print(f"{title}:")
  print(bench.format_table(result))
  if json_path:
    bench.write_json(result, json_path)
    print(f"bench: wrote {json_path}")
  return 0


def _checkpoint_flags(items) -> dict:
  """--checkpoints STAGE=RUN_DIR[@STEP] ... -> ({stage: run_dir}, {stage: step})."""
  dirs, steps = {}, {}
  for item in items or []:
    for part in item.split(","):
      name, eq, value = part.partition("=")
      if not eq or not name or not value:
        raise UsageError(f"--checkpoints {part}: write STAGE=RUN_DIR or STAGE=RUN_DIR@STEP, e.g. base=out/demo/base")
      path, at, step = value.rpartition("@") if "@" in value else (value, "", "")
      if at and not step.isdigit():
        raise UsageError(f"--checkpoints {part}: the step after @ must be a number")
      dirs[name] = path
      if at:
        steps[name] = int(step)
  return {"run_dirs": dirs, "checkpoint_steps": steps}


def _float_list(text: str, flag: str) -> List[float]:
  try:
    return [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise UsageError(f"{flag} {text}: not a comma-separated list of numbers") from None


def _load_cascade(args):
  from imagen_jax.sample import cascade
  flags = {"steps": args.steps or []}
  return cascade.configured(batch_size=args.batch_size, setting_flags=flags, **_checkpoint_flags(args.checkpoints))


def cmd_eval_shapes(args) -> int:
  from imagen_jax.eval import shapes_eval
  try:
    baselines = [shapes_eval.read_result(b) for b in args.baseline or []]
    result = shapes_eval.evaluate(
        _load_cascade(args), args.out, num_prompts=args.num_prompts, seed=args.seed, start=args.start,
        guidance=_float_list(args.guidance, "--guidance"), thresholding=[t for t in args.thresholding.split(",") if t],
        sweep_stage=args.sweep_stage, label=args.label, train_seed=args.train_seed,
        train_examples=args.train_examples, baselines=baselines, save_images=not args.no_images,
        command=["imagen-jax"] + list(args.argv))
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  from imagen_jax.eval.shapes_eval import summary_table
  print(summary_table(result, baselines))
  for stage, b in result["best"].items():
    print(f"eval shapes: {stage}: best all-correct {b['all']:.3f} at w={b['guidance']:g} {b['thresholding']}")
  print(f"eval shapes: wrote {Path(args.out) / 'shapes.json'} and plots in {args.out} ({result['seconds']:.0f}s)")
  return 0


def cmd_eval_drawbench(args) -> int:
  from imagen_jax.eval import drawbench
  try:
    prompts = drawbench.load_prompts(args.csv)
    if args.limit:
      prompts = prompts[: args.limit]
    manifest = drawbench.sample_prompts(_load_cascade(args), prompts, args.out, samples_per_prompt=args.samples_per_prompt,
                                        seed=args.seed, label=args.label, command=["imagen-jax"] + list(args.argv))
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  print(f"eval drawbench: {len(manifest['prompts'])} prompts x {args.samples_per_prompt} samples in {args.out}")
  return 0


def cmd_eval_drawbench_page(args) -> int:
  from imagen_jax.eval import drawbench
  try:
    key = drawbench.write_page(args.a, args.b, args.out, key_path=args.key, seed=args.seed)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  key_path = args.key or drawbench.default_key_path(args.out)
  print(f"eval drawbench-page: {len(key['prompts'])} prompts; open {Path(args.out) / 'index.html'} in a browser "
        f"(send raters the folder); the key (which side is which) is {key_path}: keep it away from raters")
  return 0


def cmd_eval_drawbench_tally(args) -> int:
  import json

  from imagen_jax.eval import drawbench
  try:
    key = drawbench._read_json(Path(args.key), "key")
    if key.get("what") != "drawbench page key":
      raise drawbench.DrawBenchError(f"{args.key}: not a key written by `imagen-jax eval drawbench-page`")
    result = drawbench.tally(args.answers, key, resamples=args.resamples, seed=args.seed)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  print(drawbench.format_tally(result))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tally.json").write_text(json.dumps(result, indent=1))
  drawbench.plot_tally(out / "tally.png", result)
  print(f"eval drawbench-tally: wrote {out / 'tally.json'} and {out / 'tally.png'}")
  return 0


def cmd_eval_convert_inception(args) -> int:
  from imagen_jax.eval import inception
  try:
    out = inception.convert(args.src, args.dst)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  print(f"eval convert-inception: wrote {out} (safetensors; the only file `imagen-jax eval fid` reads)")
  return 0


def cmd_eval_fid(args) -> int:
  import json

  from imagen_jax.eval import fid, frechet, inception
  try:
    extractor = inception.FeatureExtractor(inception.load(args.weights), batch_size=args.batch_size,
                                           resize=args.resize)
    t0 = time.perf_counter()
    sample_feats = fid.folder_features(args.samples, extractor, image_size=args.image_size, what="samples")
    seconds = time.perf_counter() - t0
    samples = frechet.Stats.of(sample_feats)
    ref = fid.reference_stats(args.ref, extractor, center_crop=args.center_crop)
    value = frechet.frechet_distance(samples, ref)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  if args.save_stats:
    samples.save(args.save_stats)
  result = {"fid": value, "samples": str(args.samples), "num_samples": samples.count, "ref": str(args.ref),
            "num_ref": ref.count, "resize": args.resize, "sample_images_per_second": samples.count / seconds}
  print(f"FID {value:.4f} ({samples.count} samples from {args.samples} against {ref.count if ref.count >= 0 else '?'} "
        f"reference images, {args.ref}); features at {result['sample_images_per_second']:.1f} images/s")
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
  return 0


def cmd_eval_fid_bench(args) -> int:
  from imagen_jax import bench
  try:
    bench.check_counts(args.repeats, args.warmup)
    result = bench.bench_fid(batch_size=args.batch_size, image_size=args.image_size, resize=args.resize,
                             weights=args.weights, repeats=args.repeats, warmup=args.warmup)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  return _report_bench("bench fid features", result, args.json)


def cmd_eval_clip(args) -> int:
  import json

  import numpy as np

  from imagen_jax.eval import clip
  from imagen_jax.sample import images as imio
  try:
    files = imio.image_files(args.samples) if Path(args.samples).is_dir() else []
    if not files:
      raise UsageError(f"--samples {args.samples}: no images (png, jpg, jpeg, webp)")
    prompts = _read_prompts(argparse.Namespace(prompts=None, prompts_file=args.prompts))
    if len(files) % len(prompts):
      raise UsageError(f"{len(files)} images but {len(prompts)} prompts: give one prompt per image, or per "
                       "equal group of consecutive images (sorted by name)")
    per = len(files) // len(prompts)
    pair_prompts = [prompts[k // per] for k in range(len(files))]
    model = clip.load(args.checkpoint)
    t0 = time.perf_counter()
    mean, scores = clip.clip_score(model, files, pair_prompts, batch_size=args.batch_size)   # read batch by batch
    seconds = time.perf_counter() - t0
  except ValueError as e:         # ClipError, ImageError
    raise UsageError(_one_line(e)) from None
  per_prompt = {p: float(np.mean([s for s, q in zip(scores, pair_prompts) if q == p])) for p in dict.fromkeys(prompts)}
  print(f"CLIP score {mean:.3f} over {len(files)} (image, prompt) pairs ({per} image(s) per prompt); "
        f"{len(files) / seconds:.1f} pairs/s")
  if args.json:
    Path(args.json).write_text(json.dumps({"clip_score": mean, "pairs": len(files), "images_per_prompt": per,
                                           "per_prompt": per_prompt, "checkpoint": str(args.checkpoint),
                                           "samples": str(args.samples)}, indent=1))
  return 0


def cmd_eval_fid_clip(args) -> int:
  from imagen_jax.eval import clip, fid, inception, quality
  try:
    prompts = _read_prompts(argparse.Namespace(prompts=None, prompts_file=args.prompts_file))
    extractor = inception.FeatureExtractor(inception.load(args.inception), batch_size=args.batch_size)
    ref = fid.reference_stats(args.ref, extractor)
    clip_model = clip.load(args.clip)
    result = quality.evaluate(_load_cascade(args), prompts, args.out, ref=ref, extractor=extractor,
                              clip_model=clip_model, guidance=_float_list(args.guidance, "--guidance"),
                              thresholding=[t for t in args.thresholding.split(",") if t], seed=args.seed,
                              sweep_stage=args.sweep_stage, label=args.label, save_images=args.save_images,
                              command=["imagen-jax"] + list(args.argv))
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  for r in result["rows"]:
    m = r["metrics"]["overall"]
    print(f"w={r['guidance']:g} {r['thresholding']}: FID {m['fid']:.3f}  CLIP score {m['clip']:.3f}")
  print(f"eval fid-clip: wrote {Path(args.out) / 'fid_clip.json'} and {Path(args.out) / 'fid_vs_clip.png'}")
  return 0


def cmd_eval_coco_prompts(args) -> int:
  from imagen_jax.eval import coco
  try:
    record = coco.make_prompts(args.annotations, args.images, args.out, num=args.num, seed=args.seed)
  except ValueError as e:
    raise UsageError(_one_line(e)) from None
  out = Path(args.out)
  print(f"eval coco-prompts: {record['num']} captions in {out / 'prompts.txt'}, their images linked in "
        f"{out / 'ref_images'}, the pairs in {out / 'coco_fid.json'}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="imagen-jax", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  t5p = sub.add_parser("t5", help="the frozen T5 text encoder")
  t5sub = t5p.add_subparsers(dest="t5_command", required=True)
  from imagen_jax.text.t5 import T5_SIZES
  sizes = sorted(T5_SIZES)

  conv = t5sub.add_parser("convert", help="Hugging Face / T5X checkpoint -> orbax checkpoint for fast loading")
  conv.add_argument("--from", dest="src", required=True, help="HF directory, T5X checkpoint dir, or ours")
  conv.add_argument("--to", dest="dst", required=True, help="new (empty) output directory")
  conv.add_argument("--size", choices=sizes, help="encoder size (required for T5X; checked against HF config.json)")
  conv.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
  conv.set_defaults(fn=cmd_t5_convert)

  enc = t5sub.add_parser("encode", help="tokenize and encode prompts; print shapes, mask lengths, truncation")
  enc.add_argument("--checkpoint", required=True)
  enc.add_argument("--size", choices=sizes)
  enc.add_argument("--vocab", required=True, help="sentencepiece model (cc_all.32000.100extra for T5 v1.1)")
  enc.add_argument("--prompts", nargs="*")
  enc.add_argument("--prompts_file")
  enc.add_argument("--max_length", type=int, default=128)
  enc.add_argument("--batch_size", type=int, default=16)
  enc.set_defaults(fn=cmd_t5_encode)

  cache = sub.add_parser("cache-embeddings", help="encode a task's captions once and write the embedding cache")
  _gin_command(cache, cmd_cache_embeddings, ("imagen_jax.data.cache", "imagen_jax.data.tasks"),
               example="runs/cache_synthetic.gin")
  tr = sub.add_parser("train", help="train one cascade stage from a gin run config (resumes automatically)")
  _gin_command(tr, cmd_train, TRAIN_GIN_MODULES, example="runs/demo_base.gin")
  tr.add_argument("--coordinator_address", help="multi-host: host:port of process 0 (or IMAGEN_COORDINATOR_ADDRESS; "
                  "TPU pods and SLURM are detected)")
  tr.add_argument("--num_processes", type=int, help="multi-host: number of processes (or IMAGEN_NUM_PROCESSES)")
  tr.add_argument("--process_id", type=int, help="multi-host: this process's index (or IMAGEN_PROCESS_ID)")

  sp = sub.add_parser("sample", help="sample a cascade (or part of it) from training runs: PNGs, grids, sweeps")
  _gin_command(sp, cmd_sample, SAMPLE_GIN_MODULES, example="runs/sample_demo.gin")
  sp.add_argument("--prompts", nargs="*", help="prompt texts")
  sp.add_argument("--prompts_file", help="a text file, one prompt per line")
  sp.add_argument("--out", required=True, help="output directory (new or empty)")
  sp.add_argument("--stages", help="comma-separated contiguous stages to run (default: the whole cascade)")
  sp.add_argument("--seed", type=int, default=0, help="image (prompt k, sample j) gets seed + k * "
                  "samples_per_prompt + j (settings.json lists every image's seed)")
  sp.add_argument("--samples_per_prompt", type=int, default=1, help="images per prompt (or per input image)")
  sp.add_argument("--batch_size", type=int, default=8, help="images per device batch call (rounded up to a "
                  "multiple of the local device count)")
  for flag, what in (("guidance", "guidance weight(s) w"), ("steps", "sampling step count(s)"),
                     ("thresholding", "none | static | dynamic[:PERCENTILE], or a list"),
                     ("aug_level", "SR noise-conditioning augmentation level(s) in [0, 1]"),
                     ("sampler", "ddpm | ddim"), ("ddim_eta", "DDIM stochasticity in [0, 1]")):
    sp.add_argument(f"--{flag}", action="append", metavar="[STAGE=]V[,V...]",
                    help=f"{what}; several comma-separated values make a sweep grid")
  sp.add_argument("--checkpoint_step", action="append", metavar="STAGE=STEP", help="a checkpoint other than the latest")
  sp.add_argument("--lowres_images", help="folder of low-resolution inputs for a cascade that starts at an SR stage")
  sp.add_argument("--init_images", help="img2img: folder of images the first stage starts from")
  sp.add_argument("--no_grids", action="store_true", help="write no grid images (large runs, e.g. COCO FID-30K: the "
                  "stage folders then hold only samples)")
  sp.add_argument("--strength", type=float, default=0.8, help="img2img: start at t = strength (0: the image, "
                  "1: pure noise)")

  cc = sub.add_parser("compile-check", help="compile a run's train step (or the T5 encoder) for a TPU topology on "
                      "this host (libtpu, no TPU): memory per chip, FLOPs, projected step time")
  _gin_command(cc, cmd_compile_check, TRAIN_GIN_MODULES, example="runs/train_base_64.gin",
               optional_macros=RUN_ONLY_MACROS)
  cc.add_argument("--topology", required=True, help="e.g. v4:4x4x8 (128 v4 chips), v5p:4x4x4, v6e:16x16, v5e:2x2")
  cc.add_argument("--num_slices", type=int, default=1, help="multi-slice: number of such slices")
  cc.add_argument("--per_chip_equivalent", nargs="?", const="auto", default=None, metavar="SLICE",
                  help="compile the same per-chip program on a small slice (default the generation's smallest) "
                  "and derive the full topology's figures")
  cc.add_argument("--what", choices=["train", "encoder"], default="train")
  cc.add_argument("--encoder_size", default="xxl", help="T5 size for --what encoder (bf16 parameters)")
  cc.add_argument("--mfu", type=float, default=0.5, help="the MFU the projected step time is stated at")
  cc.add_argument("--json", help="write the report as JSON here")
  cc.add_argument("--no_flops", action="store_true", help="skip the unscanned lowering that counts FLOPs")
  cc.add_argument("--max_host_ram_gb", type=float, default=-1, help="stop the compile at this much host RAM "
                  "(default: what the machine has free, less 0.75 GiB; 0: no watch)")

  bp = sub.add_parser("bench", help="throughput of a stage's train step or sampling on the local devices: step "
                      "time, images/s, TFLOP/s, MFU (synthetic in-memory batches)")
  _gin_command(bp, cmd_bench, TRAIN_GIN_MODULES, example="runs/demo_base.gin", optional_macros=RUN_ONLY_MACROS)
  bp.add_argument("--what", choices=["train", "sample"], default="train")
  bp.add_argument("--repeats", type=int, default=10, help="timed calls (the median is reported)")
  bp.add_argument("--warmup", type=int, default=2, help="untimed calls after the compiling one")
  bp.add_argument("--batch_size", type=int, default=8, help="sample: images per batch (train: BATCH_SIZE in gin)")
  bp.add_argument("--num_steps", type=int, default=16, help="sample: sampling steps per run")
  bp.add_argument("--guidance", type=float, default=5.0, help="sample: guidance weight (the guided program)")
  bp.add_argument("--json", help="write the result as JSON here")

  ev = sub.add_parser("eval", help="evaluations: shapes alignment sweeps, DrawBench sampling / rating page / tally")
  evsub = ev.add_subparsers(dest="eval_command", required=True)
  for name, fn, helptext in (("shapes", cmd_eval_shapes, "alignment of a cascade on held-out synthetic captions over "
                              "a guidance x thresholding sweep: JSON and plots"),
                             ("fid-clip", cmd_eval_fid_clip, "FID and CLIP score of a cascade over a guidance x "
                              "thresholding sweep: JSON and the FID-against-CLIP plot"),
                             ("drawbench", cmd_eval_drawbench, "sample every DrawBench prompt with one cascade "
                              "(resumable)")):
    e = evsub.add_parser(name, help=helptext)
    _gin_command(e, fn, SAMPLE_GIN_MODULES, example="runs/sample_demo.gin", optional_macros=RUN_DIR_MACROS)
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--checkpoints", action="append", metavar="STAGE=RUN_DIR[@STEP]",
                   help="the run (and step) each stage samples from, replacing the gin config's")
    e.add_argument("--steps", action="append", metavar="[STAGE=]N", help="sampling steps (per stage)")
    e.add_argument("--batch_size", type=int, default=8, help="images per sampler call")
    e.add_argument("--label", default=None if name == "drawbench" else "model", help="the model's name in outputs")
  sh = evsub.choices["shapes"]
  sh.add_argument("--num_prompts", type=int, default=64, help="held-out captions")
  sh.add_argument("--seed", type=int, default=1000, help="scene seed of the held-out captions (training uses 0)")
  sh.add_argument("--start", type=int, default=0, help="first scene index")
  sh.add_argument("--guidance", default="1,2,3,5,8", help="guidance weights of the swept stage")
  sh.add_argument("--thresholding", default="none,static,dynamic", help="none, static, dynamic[:PERCENTILE]")
  sh.add_argument("--sweep_stage", help="the stage swept (default the first)")
  sh.add_argument("--train_seed", type=int, default=0, help="the training data's scene seed")
  sh.add_argument("--train_examples", type=int, default=0, help="training scenes, to count unseen captions (0: skip)")
  sh.add_argument("--baseline", action="append", metavar="SHAPES_JSON", help="another run's shapes.json (or its "
                  "folder), drawn dashed in the plots")
  sh.add_argument("--no_images", action="store_true", help="do not write every image")
  fc = evsub.choices["fid-clip"]
  fc.add_argument("--prompts_file", required=True, help="one prompt per line (e.g. COCO captions)")
  fc.add_argument("--ref", required=True, help="reference statistics (.npz) or a folder of reference images")
  fc.add_argument("--inception", required=True, help="converted FID Inception weights (convert-inception)")
  fc.add_argument("--clip", required=True, help="Hugging Face CLIP checkpoint folder")
  fc.add_argument("--guidance", default="1,2,3,5,8", help="guidance weights of the swept stage")
  fc.add_argument("--thresholding", default="dynamic", help="none, static, dynamic[:PERCENTILE]")
  fc.add_argument("--sweep_stage", help="the stage swept (default the first)")
  fc.add_argument("--seed", type=int, default=0, help="image k has seed + k")
  fc.add_argument("--save_images", action="store_true", help="write the last stage's images per setting")
  db = evsub.choices["drawbench"]
  db.add_argument("--csv", required=True, help="DrawBench CSV (header Prompts,Category)")
  db.add_argument("--samples_per_prompt", type=int, default=8)
  db.add_argument("--seed", type=int, default=0, help="image j of prompt k has seed + k * samples_per_prompt + j")
  db.add_argument("--limit", type=int, default=0, help="only the first N prompts (0: all)")
  pg = evsub.add_parser("drawbench-page", help="a static side-by-side rating page for two sample folders")
  pg.add_argument("--a", required=True, help="model A's `eval drawbench` folder")
  pg.add_argument("--b", required=True, help="model B's `eval drawbench` folder")
  pg.add_argument("--out", required=True, help="new page folder (index.html + img/)")
  pg.add_argument("--key", help="where to write the un-blinding key (default: OUT-key.json beside the folder)")
  pg.add_argument("--seed", type=int, default=None, help="seed of the left/right draws (default: random)")
  pg.set_defaults(fn=cmd_eval_drawbench_page)
  ta = evsub.add_parser("drawbench-tally", help="un-blind raters' answers: preference rates per category with "
                        "bootstrap 95% intervals, table and bar chart")
  ta.add_argument("answers", nargs="+", help="answer files downloaded from the page")
  ta.add_argument("--key", required=True, help="the page's key file (drawbench-page wrote it)")
  ta.add_argument("--out", default="drawbench_tally", help="folder for tally.json and tally.png")
  ta.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
  ta.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  ta.set_defaults(fn=cmd_eval_drawbench_tally)
  ci = evsub.add_parser("convert-inception", help="the published FID Inception weights (pytorch-fid's "
                        ".pth) -> safetensors, once (needs PyTorch)")
  ci.add_argument("--from", dest="src", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  ci.add_argument("--to", dest="dst", required=True, help="output folder")
  ci.set_defaults(fn=cmd_eval_convert_inception)
  fi = evsub.add_parser("fid", help="FID of a folder of samples against reference statistics or images")
  fi.add_argument("--samples", required=True, help="folder of generated images (one size)")
  fi.add_argument("--ref", required=True, help="reference statistics (.npz with mu, sigma) or a folder of images")
  fi.add_argument("--weights", required=True, help="folder (or file) written by convert-inception")
  fi.add_argument("--image_size", type=int, help="check that the samples are this size")
  fi.add_argument("--center_crop", type=int, help="reference images: central square resized to this size (bicubic)")
  fi.add_argument("--resize", choices=["tf1", "pytorch"], default="tf1", help="299x299 bilinear resize: TensorFlow "
                  "1's (original FID, torch-fidelity) or PyTorch's (pytorch-fid)")
  fi.add_argument("--batch_size", type=int, default=64)
  fi.add_argument("--save_stats", help="write the samples' statistics (.npz) here")
  fi.add_argument("--json", help="write the result as JSON here")
  fi.set_defaults(fn=cmd_eval_fid)
  fb = evsub.add_parser("fid-bench", help="throughput of FID feature extraction on the local devices: images/s, "
                        "TFLOP/s, MFU (random uint8 images; random weights unless --weights)")
  fb.add_argument("--weights", help="converted Inception weights (default: random; the speed is the same)")
  fb.add_argument("--image_size", type=int, default=256, help="input size (resized to 299 inside)")
  fb.add_argument("--batch_size", type=int, default=64)
  fb.add_argument("--resize", choices=["tf1", "pytorch"], default="tf1")
  fb.add_argument("--repeats", type=int, default=5, help="timed calls (the median is reported)")
  fb.add_argument("--warmup", type=int, default=1, help="untimed calls, the compiling one included")
  fb.add_argument("--json", help="write the result as JSON here")
  fb.set_defaults(fn=cmd_eval_fid_bench)
  co = evsub.add_parser("coco-prompts", help="COCO FID-30K inputs: N random val2014 images, one caption each "
                        "(prompts.txt) and links to the images (ref_images/)")
  co.add_argument("--annotations", required=True, help="captions_val2014.json")
  co.add_argument("--images", required=True, help="the val2014/ image folder")
  co.add_argument("--out", required=True, help="output folder")
  co.add_argument("--num", type=int, default=30000)
  co.add_argument("--seed", type=int, default=0)
  co.set_defaults(fn=cmd_eval_coco_prompts)
  cl = evsub.add_parser("clip", help="CLIP score (100 x cosine, clipped at 0) of images against their prompts")
  cl.add_argument("--samples", required=True, help="folder of images (sorted by name)")
  cl.add_argument("--prompts", required=True, help="text file, one prompt per image or per equal group of images")
  cl.add_argument("--checkpoint", required=True, help="Hugging Face CLIP folder (config.json, model.safetensors, "
                  "tokenizer.json)")
  cl.add_argument("--batch_size", type=int, default=64)
  cl.add_argument("--json", help="write the result as JSON here")
  cl.set_defaults(fn=cmd_eval_clip)
  return parser


# The modules whose configurables a training run's gin files bind.
TRAIN_GIN_MODULES = ("imagen_jax.models", "imagen_jax.diffusion", "imagen_jax.train.loop", "imagen_jax.train.optimizer",
                     "imagen_jax.train.data", "imagen_jax.data.pipeline", "imagen_jax.data.tasks",
                     "imagen_jax.sample.hook")


# What a training run's gin needs only to run (compile-check and bench build the step without them).
RUN_ONLY_MACROS = ("MODEL_DIR", "TRAIN_DATA")


# The sampling configs' run directories: the evaluations may give them with --checkpoints instead.
RUN_DIR_MACROS = ("BASE_DIR", "SR_DIR", "SR256_DIR", "SR1024_DIR")


# The modules whose configurables a sampling config binds.
SAMPLE_GIN_MODULES = ("imagen_jax.sample.cascade",)


def _gin_command(parser: argparse.ArgumentParser, fn, modules, example: str, optional_macros=()) -> None:
  """A gin-configured command: `--gin_file` (repeatable) plus `--gin.KEY=VALUE`; `main` imports `modules`
  (which register the configurables), parses and finalizes the config before calling `fn`. Required
  macros in `optional_macros` may stay unset (the command does not use them)."""
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file, relative to gin_configs/ or a path (repeatable)")
  parser.set_defaults(fn=fn, gin_modules=tuple(modules), gin_example=example, gin_optional=tuple(optional_macros))


def _setup_gin(args) -> None:
  import importlib

  from imagen_jax import gin_utils
  if getattr(args, "gin_modules", None) is None:
    if args.gin_bindings:
      raise UsageError(f"{args.command} takes no --gin.KEY=VALUE bindings")
    return
  if not args.gin_file:
    raise UsageError(f"{args.command} needs at least one --gin_file (e.g. {args.gin_example})")
  for module in args.gin_modules:
    importlib.import_module(module)
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, finalize=True, optional_macros=args.gin_optional)


def main(argv: Optional[List[str]] = None) -> int:
  """Every command passes through here: bad input of any command (arguments, gin files and bindings,
  checkpoints, data) ends as one line `imagen-jax: error: ...` on stderr and exit code 2."""
  from imagen_jax.gin_utils import GinConfigError, bindings_from_flags, from_gin_runtime_error
  from imagen_jax.text.checkpoints import CheckpointError
  full_argv = list(sys.argv[1:] if argv is None else argv)      # as given: a watched child runs it again
  try:
    argv, bindings = bindings_from_flags(full_argv)
  except GinConfigError as e:
    print(f"imagen-jax: error: {_one_line(e)}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(argv)
  args.gin_bindings = bindings
  args.argv = full_argv
  try:
    try:
      _setup_gin(args)
      return args.fn(args)
    except RuntimeError as e:
      raise from_gin_runtime_error(e) or e
  except (UsageError, GinConfigError, CheckpointError, FileNotFoundError) as e:
    print(f"imagen-jax: error: {_one_line(e)}", file=sys.stderr)
    return 2
  finally:
    if getattr(args, "gin_modules", None) is not None:
      # Leave gin as a fresh process has it (unlocked, empty): a second main() in the same process (a notebook,
      # a test) may import modules that register configurables, which gin refuses while the config is locked.
      import gin
      gin.clear_config()


def _one_line(e: BaseException) -> str:
  """The first line (gin appends "In call to configurable ..." lines to errors raised inside one)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


if __name__ == "__main__":
  sys.exit(main())
