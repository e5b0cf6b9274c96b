"""What `make demo` needs before it can cache and train, made on this machine with nothing
downloaded.

  python -m imagen_jax.demo prepare --out out/demo

writes
  spiece.model   a sentencepiece vocabulary of the synthetic captions (T5's ids: pad 0, EOS 1)
  t5/            a tiny T5 v1.1 encoder with RANDOM weights, in our checkpoint format
  prompts.txt    the prompts the demo samples at the end

The demo's text encoder is untrained: it maps each caption to a fixed, distinct sequence of
embeddings, which is all a diffusion model needs to learn the synthetic captions, but it knows
nothing of language. Real runs load T5-XXL (`imagen-jax t5 convert`). Files already present are kept
(re-running is cheap).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_T5 = dict(d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2)


def train_vocabulary(path: Path, num_captions: int = 4000, seed: int = 0) -> None:
  import sentencepiece as spm

  from imagen_jax.data import synthetic

  captions = [synthetic.make_scene(seed, i).caption for i in range(num_captions)]
  prefix = str(path.with_suffix(""))
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(captions),
    model_prefix=prefix,
    # BPE over 96 pieces: every caption word is one piece (mean 7.9 tokens, at most 15), as in a
    # real T5 vocabulary. The earlier unigram model stopped at 39 pieces and spelt colours out in
    # letters ("green" = _ g ree n, captions up to 38 tokens), which a random encoder then had to
    # compose: the base stage drew colours, not captions (issue 20).
    vocab_size=96,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    hard_vocab_limit=False,
    model_type="bpe",
    minloglevel=2,
  )
  Path(prefix + ".vocab").unlink(missing_ok=True)


def random_encoder(directory: Path, vocab_size: int, seed: int = 0) -> None:
  import flax.linen as nn
  import jax
  import numpy as np

  from imagen_jax.text import checkpoints, t5

  config = t5.T5Config(vocab_size=vocab_size, **DEMO_T5)
  params = jax.tree_util.tree_map(
    np.asarray, nn.unbox(t5.init_random_encoder_params(config, jax.random.PRNGKey(seed)))
  )
  checkpoints.save_params(directory, config, params)


# What `make demo` samples at the end (captions in the synthetic dataset's own forms).
DEMO_PROMPTS = (
  "a red circle",
  "a blue square",
  "a green triangle",
  "two yellow circles",
  "three purple squares",
  "a red circle to the left of a blue square",
  "an orange triangle to the right of a green circle",
  "a yellow square",
)


def prepare(out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  prompts = out / "prompts.txt"
  prompts.write_text("\n".join(DEMO_PROMPTS) + "\n")
  vocab = out / "spiece.model"
  if not vocab.is_file():
    train_vocabulary(vocab)
    print(f"demo: trained a sentencepiece vocabulary on the synthetic captions -> {vocab}")
  else:
    print(f"demo: vocabulary {vocab} (kept)")
  encoder = out / "t5"
  if not (encoder / "t5_config.json").is_file():
    import sentencepiece as spm

    size = spm.SentencePieceProcessor(model_file=str(vocab)).get_piece_size()
    random_encoder(encoder, vocab_size=max(size, 64))
    print(
      "demo: wrote a tiny T5 encoder with RANDOM weights (untrained; real runs load T5-XXL) -> "
      f"{encoder}"
    )
  else:
    print(f"demo: encoder {encoder} (kept; random weights, untrained)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m imagen_jax.demo", description=__doc__.split("\n\n")[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="vocabulary and random tiny encoder for the demo")
  p.add_argument("--out", default="out/demo")
  args = parser.parse_args(argv)
  prepare(Path(args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
