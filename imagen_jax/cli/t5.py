"""`imagen-jax t5 convert | encode`: the frozen T5 text encoder."""

from __future__ import annotations

import time

from imagen_jax.cli import common


def add_parsers(sub) -> None:
  from imagen_jax.text.t5 import T5_SIZES

  group = sub.add_parser("t5", help="the frozen T5 text encoder").add_subparsers(
    dest="t5_command", required=True
  )
  sizes = sorted(T5_SIZES)
  p = group.add_parser(
    "convert", help="Hugging Face / T5X checkpoint -> orbax checkpoint for fast loading"
  )
  p.add_argument(
    "--from", dest="src", required=True, help="HF directory, T5X checkpoint dir, or ours"
  )
  p.add_argument("--to", dest="dst", required=True, help="new (empty) output directory")
  p.add_argument(
    "--size", choices=sizes, help="encoder size (required for T5X; checked against HF config.json)"
  )
  p.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
  p.set_defaults(fn=convert)
  p = group.add_parser(
    "encode", help="tokenize and encode prompts; print shapes, mask lengths, truncation"
  )
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--size", choices=sizes)
  p.add_argument(
    "--vocab", required=True, help="sentencepiece model (cc_all.32000.100extra for T5 v1.1)"
  )
  p.add_argument("--prompts", nargs="*")
  p.add_argument("--prompts_file")
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=16)
  p.set_defaults(fn=encode)


def convert(args) -> int:
  from imagen_jax.text import checkpoints

  t0 = time.perf_counter()
  config, n, nbytes = checkpoints.convert(
    args.src, args.dst, size=args.size, param_dtype=args.param_dtype
  )
  print(
    f"converted {args.src} -> {args.dst}: {n / 1e6:.2f}M parameters, {nbytes / 2**30:.3f} GiB "
    f"({config.param_dtype}), d_model={config.d_model} layers={config.num_layers} "
    f"heads={config.num_heads} "
    f"in {time.perf_counter() - t0:.1f}s"
  )
  return 0


def encode(args) -> int:
  import numpy as np

  from imagen_jax.text.encoder import encode_prompts

  texts = common.prompts(args.prompts, args.prompts_file)
  t0 = time.perf_counter()
  enc = encode_prompts(
    texts, args.vocab, args.checkpoint, args.max_length, batch_size=args.batch_size, size=args.size
  )
  dt = time.perf_counter() - t0
  for i, prompt in enumerate(texts):
    flag = " (truncated)" if enc.truncated[i] else ""
    mean = float(np.abs(enc.emb[i][enc.mask[i]]).mean())
    print(f"[{i}] tokens={int(enc.mask[i].sum())}{flag} |emb|={mean:.4f} {prompt[:60]!r}")
  s = enc.stats
  print(
    f"embeddings {tuple(enc.emb.shape)} {enc.emb.dtype}, mask {tuple(enc.mask.shape)}; "
    f"captions={s.captions} "
    f"truncated={s.truncated} empty={s.empty} invalid_utf8={s.invalid_utf8}; encode {dt:.2f}s"
  )
  return 0
