"""Test-wide settings: CPU only, eight simulated devices (a 2x2x2 data/fsdp/tensor mesh), JAX's persistent
compilation cache under .cache/xla (shared with the training subprocesses the tests start)."""

import os
from pathlib import Path

# Before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from imagen_jax import diffusion as D  # noqa: E402
from imagen_jax import models as M  # noqa: E402
from imagen_jax.gin_utils import parse_gin  # noqa: E402

# Compilation dominates small runs: every test process and every training subprocess shares one cache.
XLA_CACHE = str(Path(__file__).resolve().parents[1] / ".cache" / "xla")
os.makedirs(XLA_CACHE, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# The smallest base U-Net the trainer tests run (16 px, one level of 16 channels, attention only in the middle):
# its train step compiles in about 10 s on 2 cores, its initialiser in about 8 s.
MICRO_BASE = ("models/tiny_base.gin", "UNetConfig.image_size = 16", "UNetConfig.channel_mult = (1,)",
              "UNetConfig.attention_resolutions = ()", "MODEL_CHANNELS = 16", "UNetConfig.norm_groups = 4")

# --------------------------------------------------------------------------------- shared test helpers
# (plain functions, imported by the test modules: `from tests.conftest import ...`)


def load_config(gin_file, *bindings):
  """The stage network config a model gin file (plus bindings) defines."""
  parse_gin([gin_file], bindings)
  return M.model_config()


@functools.lru_cache(maxsize=8)
def randomized_params(config, seed=0, scale=0.05):
  """Initialised parameters plus noise, so that zero-initialised output layers do not hide anything."""
  params = nn.unbox(M.init_boxed_params(config, jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)   # host-side noise: one XLA compile per leaf shape would cost seconds
  return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape),
                                                      jnp.float32), params)


def inputs(config, batch=2, seed=0, image_size=None):
  """(z, log_snr, cond) with random values; example 0's text half masked, example 1's nearly full."""
  z, log_snr, cond = M.example_inputs(config, batch, image_size=image_size)
  ks = jax.random.split(jax.random.PRNGKey(100 + seed), 4)
  z = jax.random.normal(ks[0], z.shape)
  log_snr = jnp.linspace(-3.0, 3.0, batch)
  cond = dict(cond)
  cond[D.TEXT_EMB] = jax.random.normal(ks[1], cond[D.TEXT_EMB].shape)
  length = cond[D.TEXT_MASK].shape[1]
  cond[D.TEXT_MASK] = jnp.arange(length)[None, :] < jnp.array([length // 2, length - 3] * batch)[:batch, None]
  if D.LOWRES in cond:
    cond[D.LOWRES] = jax.random.uniform(ks[2], cond[D.LOWRES].shape, minval=-1, maxval=1)
    cond[D.LOWRES_AUG_LEVEL] = jnp.full((batch,), 0.2)
  return z, log_snr, cond


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
  from imagen_jax.text import checkpoints, t5
  config = t5.t5_config("tiny", vocab_size=64)
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(t5.init_random_encoder_params(config, jax.random.PRNGKey(0))))
  directory = tmp_path_factory.mktemp("t5") / "tiny"
  checkpoints.save_params(directory, config, params)
  return directory, config, params


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory, spm_model, tiny_t5_checkpoint):
  """An embedding cache of 64 synthetic captioned shapes at 32 px (tiny random T5, 16 tokens), registered as
  the seqio task 'shapes_cache'; returns its directory."""
  from imagen_jax.data import cache, tasks
  t5_dir, _, _ = tiny_t5_checkpoint
  out = tmp_path_factory.mktemp("shapes_cache")
  tasks.register_source_task("shapes_source", "synthetic", spm_model, image_size=32, seed=0, num_examples=64)
  cache.cache_embeddings("shapes_source", str(out), str(t5_dir), num_shards=2, batch_size=16, max_length=16,
                         progress=False)
  tasks.register_cached_task("shapes_cache", str(out), spm_model)
  return out


# 16 -> 32, one level: the smallest Efficient U-Net with cross-attention to the text.
MICRO_SR = ("models/tiny_sr.gin", "EfficientUNetConfig.image_size = 32", "EfficientUNetConfig.lowres_size = 16",
            "EfficientUNetConfig.init_channels = 16", "EfficientUNetConfig.channels = (16,)",
            "EfficientUNetConfig.num_res_blocks = (1,)", "EfficientUNetConfig.strides = (2,)",
            "EfficientUNetConfig.self_attention = (False,)", "EfficientUNetConfig.cross_attention = (True,)",
            "EfficientUNetConfig.norm_groups = 4")


def write_run(model_dir, config, steps=(1,), seed=0):
  """A run directory as the trainer leaves it (run.json with the diffusion record, orbax checkpoints), holding
  random values of the right shapes."""
  from imagen_jax import partitioning
  from imagen_jax.diffusion import DiffusionConfig
  from imagen_jax.train import checkpoints as ckpt
  from imagen_jax.train import optimizer
  from imagen_jax.train.setup import RunSpec, TrainSetup
  spec = RunSpec(config, DiffusionConfig(), optimizer.OptimizerConfig(name="sgd", warmup_steps=0, decay_steps=None),
                 global_batch=1, mesh_shape=(1, 1, 1))
  setup = TrainSetup(spec, partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1]))
  abstract, shardings = setup.abstract, setup.shardings
  ckpt.check_run_dir(model_dir, ckpt.run_record(config, abstract.params, DiffusionConfig()))
  mgr = ckpt.manager(model_dir, async_save=False)
  for step in steps:
    rng = np.random.default_rng(seed + step)
    host = jax.tree_util.tree_map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
                                  if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, step, a.dtype), abstract)
    ckpt.save(mgr, step, jax.device_put(host, shardings))
  mgr.wait_until_finished()
  mgr.close()


def write_micro_cascade(root, spm_model, t5_dir):
  """Random-valued runs of the micro base (16 px) and micro SR (16 -> 32) stages under root, and root/cascade.gin
  that samples them (2 steps each; base guided with w = 2); returns root."""
  base_cfg, sr_cfg = load_config(*MICRO_BASE), load_config(*MICRO_SR)
  write_run(root / "base", base_cfg, steps=(1, 2))
  write_run(root / "sr", sr_cfg)
  # A gin file for this cascade: the shipped sample_base.gin plus two scoped stages.
  (root / "cascade.gin").write_text(f"""
include 'runs/sample_base.gin'
VOCAB = '{spm_model}'
ENCODER = '{t5_dir}'
MAX_TEXT_LENGTH = 8
cascade_config.stages = [@base/stage(), @sr/stage()]
base/stage.name = 'base'
base/stage.run_dir = '{root / "base"}'
base/stage.image_size = 16
base/stage.expect = {{'model_channels': 16}}
base/stage.num_steps = 2
base/stage.guidance_scale = 2.0
sr/stage.name = 'sr'
sr/stage.run_dir = '{root / "sr"}'
sr/stage.image_size = 32
sr/stage.num_steps = 2
sr/stage.guidance_scale = 1.0
""")
  return root
