"""Test-wide settings: CPU only, eight simulated devices (a 2x2x2 data/fsdp/tensor mesh)."""

import os

# Before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHAPE_WORDS = ["red", "blue", "green", "yellow", "purple", "orange", "circle", "circles", "square", "squares",
               "triangle", "triangles", "one", "two", "three", "four", "left", "right", "of", "to", "the", "a", "an",
               "and", "big"]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
  """A sentencepiece model trained on the fly with T5's special ids (pad 0, eos 1, unk 2)."""
  import sentencepiece as spm
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(SHAPE_WORDS, rng.integers(3, 9))) for _ in range(600)]
  prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=64,
                                 pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                 model_type="unigram", minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="session")
def tiny_t5_checkpoint(tmp_path_factory):
  """A random tiny T5 encoder saved in our orbax format; returns (directory, config, params)."""
  import flax.linen as nn
  import jax
  from imagen_jax.text import checkpoints, t5
  config = t5.t5_config("tiny", vocab_size=64)
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(t5.init_params(config, jax.random.PRNGKey(0))))
  directory = tmp_path_factory.mktemp("t5") / "tiny"
  checkpoints.save_params(directory, config, params)
  return directory, config, params
