"""Plain helpers the tests share (fixtures live in conftest.py): micro network configs, random
parameters and inputs, run directories as the trainer leaves them, and the tiny CLIP vocabulary."""

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import diffusion as D
from imagen_jax import models as M
from imagen_jax.diffusion import alpha_sigma_from_log_snr
from imagen_jax.gin_utils import parse_gin
from imagen_jax.train import optimizer

# Compilation dominates small runs: every test process and every training subprocess shares one
# cache (conftest.py turns it on).
ROOT = Path(__file__).resolve().parents[1]  # the repository
XLA_CACHE = str(ROOT / ".cache" / "xla")

# The smallest base U-Net the trainer tests run (16 px, one level of 16 channels, attention only in
# the middle): its train step compiles in about 10 s on 2 cores, its initialiser in about 8 s.
MICRO_BASE = (
  "models/tiny_base.gin",
  "UNetConfig.image_size = 16",
  "UNetConfig.channel_mult = (1,)",
  "UNetConfig.attention_resolutions = ()",
  "MODEL_CHANNELS = 16",
  "UNetConfig.norm_groups = 4",
)


# The trainer tests' optimizer, EMA decay and batch (the sample-grid test trains with them too).
ADAM = optimizer.OptimizerConfig(name="adam", learning_rate=1e-3, warmup_steps=20, decay_steps=None)
EMA = 0.99
BATCH = 16


def load_config(gin_file, *bindings):
  """The stage network config a model gin file (plus bindings) defines."""
  parse_gin([gin_file], bindings)
  return M.model_config()


@functools.lru_cache(maxsize=8)
def randomized_params(config, seed=0, scale=0.05):
  """Initialised parameters plus noise, so that zero-initialised output layers do not hide
  anything."""
  params = nn.unbox(M.init_boxed_params(config, jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(
    seed
  )  # host-side noise: one XLA compile per leaf shape would cost seconds
  return jax.tree_util.tree_map(
    lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), jnp.float32), params
  )


def inputs(config, batch=2, seed=0, image_size=None):
  """(z, log_snr, cond) with random values; example 0's text half masked, example 1's nearly
  full."""
  z, log_snr, cond = M.example_inputs(config, batch, image_size=image_size)
  ks = jax.random.split(jax.random.PRNGKey(100 + seed), 4)
  z = jax.random.normal(ks[0], z.shape)
  log_snr = jnp.linspace(-3.0, 3.0, batch)
  cond = dict(cond)
  cond[D.TEXT_EMB] = jax.random.normal(ks[1], cond[D.TEXT_EMB].shape)
  length = cond[D.TEXT_MASK].shape[1]
  cond[D.TEXT_MASK] = (
    jnp.arange(length)[None, :] < jnp.array([length // 2, length - 3] * batch)[:batch, None]
  )
  if D.LOWRES in cond:
    cond[D.LOWRES] = jax.random.uniform(ks[2], cond[D.LOWRES].shape, minval=-1, maxval=1)
    cond[D.LOWRES_AUG_LEVEL] = jnp.full((batch,), 0.2)
  return z, log_snr, cond


SHAPE_WORDS = [
  "red",
  "blue",
  "green",
  "yellow",
  "purple",
  "orange",
  "circle",
  "circles",
  "square",
  "squares",
  "triangle",
  "triangles",
  "one",
  "two",
  "three",
  "four",
  "left",
  "right",
  "of",
  "to",
  "the",
  "a",
  "an",
  "and",
  "big",
]


MICRO_SR = (
  "models/tiny_sr.gin",
  "EfficientUNetConfig.image_size = 32",
  "EfficientUNetConfig.lowres_size = 16",
  "EfficientUNetConfig.init_channels = 16",
  "EfficientUNetConfig.channels = (16,)",
  "EfficientUNetConfig.num_res_blocks = (1,)",
  "EfficientUNetConfig.strides = (2,)",
  "EfficientUNetConfig.self_attention = (False,)",
  "EfficientUNetConfig.cross_attention = (True,)",
  "EfficientUNetConfig.norm_groups = 4",
)


def write_run(model_dir, config, steps=(1,), seed=0):
  """A run directory as the trainer leaves it (run.json with the diffusion record, orbax
  checkpoints), holding random values of the right shapes."""
  from imagen_jax import partitioning
  from imagen_jax.diffusion import DiffusionConfig
  from imagen_jax.train import checkpoints as ckpt
  from imagen_jax.train import optimizer
  from imagen_jax.train.setup import RunSpec, TrainSetup

  spec = RunSpec(
    config,
    DiffusionConfig(),
    optimizer.OptimizerConfig(name="sgd", warmup_steps=0, decay_steps=None),
    global_batch=1,
    mesh_shape=(1, 1, 1),
  )
  setup = TrainSetup(spec, partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1]))
  abstract, shardings = setup.abstract, setup.shardings
  ckpt.check_run_dir(model_dir, ckpt.run_record(config, abstract.params, DiffusionConfig()))
  mgr = ckpt.manager(model_dir, async_save=False)
  for step in steps:
    rng = np.random.default_rng(seed + step)
    host = jax.tree_util.tree_map(
      lambda a: (
        (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)
        if np.issubdtype(a.dtype, np.floating)
        else np.full(a.shape, step, a.dtype)
      ),
      abstract,
    )
    ckpt.save(mgr, step, jax.device_put(host, shardings))
  mgr.wait_until_finished()
  mgr.close()


def write_micro_cascade(root, spm_model, t5_dir):
  """Random-valued runs of the micro base (16 px) and micro SR (16 -> 32) stages under root, and
  root/cascade.gin that samples them (2 steps each; base guided with w = 2); returns root."""
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


def bytes_to_unicode():
  """GPT-2 / CLIP's reversible byte -> printable character table (to build a valid tiny
  byte-level vocab)."""
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


MERGES = [
  ("r", "e"),
  ("re", "d</w>"),
  ("c", "i"),
  ("ci", "r"),
  ("cir", "c"),
  ("circ", "l"),
  ("circl", "e</w>"),
  ("b", "l"),
  ("bl", "u"),
  ("blu", "e</w>"),
]
CONTEXT = 16


# ------------------------------------------------------------------ the Gaussian oracle
# Data drawn from a known diagonal Gaussian N(m, s^2): its exact optimal denoiser in closed form.
#
# For x ~ N(m, s^2) and z = alpha x + sigma eps, the posterior of x given z is Gaussian with
#   E[x | z]   = m + alpha s^2 (z - alpha m) / (alpha^2 s^2 + sigma^2)
#   E[eps | z] = sigma (z - alpha m) / (alpha^2 s^2 + sigma^2)
#   Var[eps | z] = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)
# so the minimum expected eps-MSE at a given log-SNR is Var[eps | z], averaged over dimensions.
class GaussianOracle:
  def __init__(self, mean, std):
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def x0_eps(self, z, log_snr):
    a, sg = alpha_sigma_from_log_snr(log_snr)
    a = a.reshape((-1,) + (1,) * (z.ndim - 1))
    sg = sg.reshape((-1,) + (1,) * (z.ndim - 1))
    m, s = jnp.asarray(self.mean), jnp.asarray(self.std)
    den = a * a * s * s + sg * sg
    return m + a * s * s * (z - a * m) / den, sg * (z - a * m) / den

  def model_fn(self, objective="eps", perturb=None):
    """The optimal network for an objective; `perturb(pred) -> pred` makes a worse one."""

    def fn(z, log_snr, cond):
      del cond
      x0, eps = self.x0_eps(z, log_snr)
      a, sg = alpha_sigma_from_log_snr(log_snr)
      a = a.reshape((-1,) + (1,) * (z.ndim - 1))
      sg = sg.reshape((-1,) + (1,) * (z.ndim - 1))
      pred = {"eps": eps, "x0": x0, "v": a * eps - sg * x0}[objective]
      return pred if perturb is None else perturb(pred)

    return fn

  def sample_data(self, key, n, shape_prefix=(1, 1)):
    import jax

    shape = (n,) + tuple(shape_prefix) + self.mean.shape
    return jnp.asarray(self.mean) + jnp.asarray(self.std) * jax.random.normal(key, shape)

  def expected_min_eps_loss(self, log_snr_fn, grid=200001):
    """E_{t ~ U(0,1)} of the mean over dimensions of Var[eps | z_t] (float64 quadrature)."""
    t = np.linspace(0.0, 1.0, grid)
    lam = np.asarray(log_snr_fn(t), np.float64)
    a2 = 1.0 / (1.0 + np.exp(-lam))
    s2 = 1.0 - a2
    var = np.stack([a2 * v * v / (a2 * v * v + s2) for v in self.std.astype(np.float64)], 0).mean(0)
    return float(np.trapezoid(var, t))
