"""Test-wide settings: CPU only, eight simulated devices (a 2x2x2 data/fsdp/tensor mesh), JAX's
persistent compilation cache under .cache/xla (shared with the training subprocesses the tests
start)."""

import os

# Before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# (jax_disable_most_optimizations was measured here: compiles get cheaper but the training and FID
# tests run slower; a fresh-clone suite took 759 s with it against 589-633 s without.)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import helpers  # noqa: E402
from tests.helpers import SHAPE_WORDS, XLA_CACHE  # noqa: E402

os.makedirs(XLA_CACHE, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
  """A sentencepiece model trained on the fly with T5's special ids (pad 0, eos 1, unk 2)."""
  import sentencepiece as spm

  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(SHAPE_WORDS, rng.integers(3, 9))) for _ in range(600)]
  prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus),
    model_prefix=prefix,
    vocab_size=64,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    hard_vocab_limit=False,
    model_type="unigram",
    minloglevel=2,
  )
  return prefix + ".model"


@pytest.fixture(scope="session")
def tiny_t5_checkpoint(tmp_path_factory):
  """A random tiny T5 encoder saved in our orbax format; returns (directory, config, params)."""
  from imagen_jax.text import checkpoints, t5

  config = t5.t5_config("tiny", vocab_size=64)
  params = jax.tree_util.tree_map(
    np.asarray, nn.unbox(t5.init_random_encoder_params(config, jax.random.PRNGKey(0)))
  )
  directory = tmp_path_factory.mktemp("t5") / "tiny"
  checkpoints.save_params(directory, config, params)
  return directory, config, params


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory, spm_model, tiny_t5_checkpoint):
  """An embedding cache of 64 synthetic captioned shapes at 32 px (tiny random T5, 16 tokens),
  registered as the seqio task 'shapes_cache'; returns its directory."""
  from imagen_jax.data import cache, tasks

  t5_dir, _, _ = tiny_t5_checkpoint
  out = tmp_path_factory.mktemp("shapes_cache")
  tasks.register_source_task(
    "shapes_source", "synthetic", spm_model, image_size=32, seed=0, num_examples=64
  )
  cache.cache_embeddings(
    "shapes_source",
    str(out),
    str(t5_dir),
    num_shards=2,
    batch_size=16,
    max_length=16,
    progress=False,
  )
  tasks.register_cached_task("shapes_cache", str(out), spm_model)
  return out


# 16 -> 32, one level: the smallest Efficient U-Net with cross-attention to the text.


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory):
  """A random tiny CLIP saved by transformers (save_pretrained): (directory, model, tokenizer)."""
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

  d = tmp_path_factory.mktemp("clip")
  chars = helpers.bytes_to_unicode()
  vocab = (
    chars
    + [c + "</w>" for c in chars]
    + ["".join(m) for m in helpers.MERGES]
    + ["<|startoftext|>", "<|endoftext|>"]
  )
  tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(helpers.MERGES))
  tok.save_pretrained(d)
  eos = len(vocab) - 1
  config = CLIPConfig(
    text_config=dict(
      vocab_size=len(vocab),
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=4,
      num_hidden_layers=2,
      max_position_embeddings=helpers.CONTEXT,
      bos_token_id=eos - 1,
      eos_token_id=eos,
      pad_token_id=eos,
    ),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=4,
      num_hidden_layers=2,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=16,
  )
  torch.manual_seed(0)
  model = CLIPModel(config).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(d, safe_serialization=True)
  return d, model, tok


@pytest.fixture(scope="module")
def micro():
  """The micro base U-Net (helpers.MICRO_BASE): what the training tests run, for compile time."""
  return helpers.load_config(*helpers.MICRO_BASE)


@pytest.fixture(scope="module")
def shapes16():
  """64 word-vector shapes at 16 px (one object each; 16 tokens of 32 dims), captions dropped."""
  from imagen_jax import batch_keys as K
  from imagen_jax.train import data as tdata

  arrays = tdata.word_vector_shapes(64, 16, 32, 16, one_object=True)
  arrays.pop(K.CAPTION)
  return arrays
