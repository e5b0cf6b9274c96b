"""The `imagen-jax` command line.

  imagen-jax t5 convert --from DIR --to DIR [--size SIZE] [--param_dtype bfloat16]
  imagen-jax t5 encode --checkpoint DIR --vocab SPM (--prompts P ... | --prompts_file F) [--max_length 128]
  imagen-jax cache-embeddings --gin_file FILE [--gin_file ...] [--gin.KEY=VALUE ...]
  imagen-jax train --gin_file FILE [--gin_file ...] [--gin.KEY=VALUE ...] [--coordinator_address H:P ...]
  imagen-jax sample --gin_file FILE (--prompts P ... | --prompts_file F) --out DIR [--stages base,sr]
      [--seed S] [--samples_per_prompt N] [--batch_size B] [--guidance [STAGE=]W1,W2 ...] [--steps ...]
      [--thresholding [STAGE=]none|static|dynamic[:P]] [--aug_level ...] [--sampler ...] [--checkpoint_step STAGE=N]
      [--lowres_images DIR] [--init_images DIR --strength S]

Bad input (missing files, mismatched checkpoints, bad arguments) ends with a one-line error on stderr
and exit code 2; a training run stopped by too many non-finite steps in a row exits with code 3.
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
                            record_extra={"command": ["imagen-jax"] + list(sys.argv[1:])})
  except ValueError as e:     # SampleError, SettingsError, RunDirError, ImageError and configs' own checks
    raise UsageError(_one_line(e)) from None
  print(f"sample: wrote {len(result.jobs)} image(s) per stage setting to {result.out_dir}; grid "
        f"{Path(result.out_dir) / 'grid.png'}; settings {Path(result.out_dir) / 'settings.json'}")
  for st in result.stages:
    if len(st.settings) > 1:
      print(f"sample: sweep grid of stage {st.name}: {Path(result.out_dir) / st.name / 'sweep.png'}")
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
  sp.add_argument("--strength", type=float, default=0.8, help="img2img: start at t = strength (0: the image, "
                  "1: pure noise)")
  return parser


# The modules whose configurables a training run's gin files bind.
TRAIN_GIN_MODULES = ("imagen_jax.models", "imagen_jax.diffusion", "imagen_jax.train.loop", "imagen_jax.train.optimizer",
                     "imagen_jax.train.data", "imagen_jax.data.pipeline", "imagen_jax.data.tasks",
                     "imagen_jax.sample.hook")


# The modules whose configurables a sampling config binds.
SAMPLE_GIN_MODULES = ("imagen_jax.sample.cascade",)


def _gin_command(parser: argparse.ArgumentParser, fn, modules, example: str) -> None:
  """A gin-configured command: `--gin_file` (repeatable) plus `--gin.KEY=VALUE`; `main` imports `modules`
  (which register the configurables), parses and finalizes the config before calling `fn`."""
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file, relative to gin_configs/ or a path (repeatable)")
  parser.set_defaults(fn=fn, gin_modules=tuple(modules), gin_example=example)


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
  gin_utils.parse_gin(args.gin_file, args.gin_bindings, finalize=True)


def main(argv: Optional[List[str]] = None) -> int:
  """Every command passes through here: bad input of any command (arguments, gin files and bindings,
  checkpoints, data) ends as one line `imagen-jax: error: ...` on stderr and exit code 2."""
  from imagen_jax.gin_utils import GinConfigError, bindings_from_flags, from_gin_runtime_error
  from imagen_jax.text.checkpoints import CheckpointError
  try:
    argv, bindings = bindings_from_flags(list(sys.argv[1:] if argv is None else argv))
  except GinConfigError as e:
    print(f"imagen-jax: error: {_one_line(e)}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(argv)
  args.gin_bindings = bindings
  try:
    try:
      _setup_gin(args)
      return args.fn(args)
    except RuntimeError as e:
      raise from_gin_runtime_error(e) or e
  except (UsageError, GinConfigError, CheckpointError, FileNotFoundError) as e:
    print(f"imagen-jax: error: {_one_line(e)}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
  """The first line (gin appends "In call to configurable ..." lines to errors raised inside one)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


if __name__ == "__main__":
  sys.exit(main())
