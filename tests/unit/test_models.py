"""The U-Nets: paper-size parameter counts, text conditioning, Efficient U-Net structure, crops."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from imagen_jax import models as M
from tests.helpers import inputs, load_config, randomized_params


@pytest.mark.parametrize(
  "gin_file,target",
  [
    ("models/base_64_2b.gin", 2.0e9),
    ("models/base_64_300m.gin", 3.0e8),
    ("models/sr_256_600m.gin", 6.0e8),
    ("models/sr_1024_400m.gin", 4.0e8),
  ],
)
def test_paper_size_parameter_counts(gin_file, target):
  n = M.count_params(M.abstract_params(load_config(gin_file)))  # jax.eval_shape: nothing allocated
  assert abs(n - target) / target < 0.15, f"{gin_file}: {n / 1e6:.1f}M parameters"


@pytest.fixture(scope="module", params=["models/tiny_base.gin", "models/tiny_sr.gin"])
def tiny(request):
  config = load_config(request.param)
  model = M.build_model(config)
  params = randomized_params(config)
  apply = jax.jit(lambda p, z, l, c: model.apply({"params": p}, z, l, c))
  return config, params, apply


def test_output_depends_on_real_tokens_only(tiny):
  config, params, apply = tiny
  z, log_snr, cond = inputs(config)
  base = apply(params, z, log_snr, cond)
  assert base.shape == z.shape and base.dtype == jnp.float32
  # Change a real (unmasked) token of example 0: its output changes, example 1's does not.
  real = dict(cond, **{D.TEXT_EMB: cond[D.TEXT_EMB].at[0, 1].multiply(-2.0)})
  out = apply(params, z, log_snr, real)
  assert float(jnp.abs(out[0] - base[0]).max()) > 1e-4
  np.testing.assert_allclose(out[1], base[1], rtol=1e-5, atol=1e-6)
  # Change a token beyond the mask (and its value only): nothing changes.
  pad_pos = int(cond[D.TEXT_MASK][0].sum())
  padded = dict(cond, **{D.TEXT_EMB: cond[D.TEXT_EMB].at[0, pad_pos:].set(7.0)})
  np.testing.assert_allclose(apply(params, z, log_snr, padded), base, rtol=1e-5, atol=1e-6)


def test_dropped_condition_is_the_null_condition(tiny):
  config, params, apply = tiny
  z, log_snr, cond = inputs(config)
  dropped = D.drop_condition(cond, jax.random.PRNGKey(0), 1.0)
  null = D.null_condition(cond)
  out_dropped = apply(params, z, log_snr, dropped)
  np.testing.assert_allclose(out_dropped, apply(params, z, log_snr, null), rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(out_dropped - apply(params, z, log_snr, cond)).max()) > 1e-4
  # Whatever the embeddings under a fully masked text, the output is the same.
  other = dict(null, **{D.TEXT_EMB: jnp.ones_like(null[D.TEXT_EMB])})
  np.testing.assert_allclose(apply(params, z, log_snr, other), out_dropped, rtol=1e-5, atol=1e-6)


def test_output_depends_on_noise_level_and_lowres(tiny):
  config, params, apply = tiny
  z, log_snr, cond = inputs(config)
  base = apply(params, z, log_snr, cond)
  assert float(jnp.abs(apply(params, z, log_snr + 1.0, cond) - base).max()) > 1e-4
  if D.LOWRES in cond:
    assert (
      float(jnp.abs(apply(params, z, log_snr, dict(cond, lowres=-cond[D.LOWRES])) - base).max())
      > 1e-4
    )
    aug = dict(cond, **{D.LOWRES_AUG_LEVEL: cond[D.LOWRES_AUG_LEVEL] + 0.5})
    assert float(jnp.abs(apply(params, z, log_snr, aug) - base).max()) > 1e-4


def test_efficient_unet_down_before_up_after_and_scaled_skips():
  config = load_config("models/tiny_sr.gin")
  model = M.build_model(config)
  params = randomized_params(config)
  z, log_snr, cond = inputs(config)
  size = z.shape[1]
  _, state = jax.jit(
    lambda p: model.apply(
      {"params": p}, z, log_snr, cond, capture_intermediates=True, mutable=["intermediates"]
    )
  )(params)
  inter = state["intermediates"]
  for level, features in enumerate(config.channels):
    res_here = size // 2 ** (
      level + 1
    )  # each level's stride-2 down-sampling happens before its blocks
    for i in range(config.num_res_blocks[level]):
      assert inter[f"down_{level}_res_{i}"]["__call__"][0].shape[1:] == (
        res_here,
        res_here,
        features,
      )
      assert inter[f"up_{level}_res_{i}"]["__call__"][0].shape[1:] == (res_here, res_here, features)
    # The up-sampling comes after the level's blocks: its conv outputs at twice their resolution.
    assert inter[f"up_{level}_conv"]["__call__"][0].shape[1:3] == (2 * res_here, 2 * res_here)
    # Each up block's input is [h, skip / sqrt(2)], the skip taken from the mirrored down block.
    n = config.num_res_blocks[level]
    for i in range(n):
      up_in = inter[f"up_{level}_input_{i}"][0]
      skip = inter[f"skip_{level}_{n - 1 - i}"][0]
      np.testing.assert_allclose(
        up_in[..., -features:], skip / math.sqrt(2.0), rtol=1e-6, atol=1e-7
      )


def test_1024_model_trained_on_crops_runs_on_whole_images():
  # Tiny model of the 256->1024 family: no self-attention, text cross-attention kept.
  config = load_config(
    "models/tiny_sr.gin",
    "EfficientUNetConfig.self_attention = (False, False)",
    "EfficientUNetConfig.cross_attention = (False, True)",
  )
  model = M.build_model(config)
  params = randomized_params(config)  # initialised on 8 -> 32 crops
  z, log_snr, cond = inputs(config, image_size=4 * config.image_size)  # whole 32 -> 128 images
  out = jax.jit(lambda p: model.apply({"params": p}, z, log_snr, cond))(params)
  assert out.shape == (2, 128, 128, 3) and bool(jnp.all(jnp.isfinite(out)))
  # The paper-size model: parameters of 64 -> 256 crops, a 256 -> 1024 forward (shapes only).
  big = load_config("models/sr_1024_400m.gin")
  big_model = M.build_model(big)
  abstract = nn.unbox(M.abstract_params(big))
  zb, lb, cb = jax.eval_shape(lambda: M.example_inputs(big, 1, image_size=1024))
  out = jax.eval_shape(
    lambda p, z, l, c: big_model.apply({"params": p}, z, l, c), abstract, zb, lb, cb
  )
  assert out.shape == (1, 1024, 1024, 3)
  assert cb[D.LOWRES].shape == (1, 256, 256, 3)


@pytest.mark.slow  # 42 s; remat inside a scan is checked against the unscanned net in test_scan.py
def test_remat_gives_identical_gradients_and_bf16_stays_close():
  config = load_config("models/tiny_base.gin")
  params = randomized_params(config)
  z, log_snr, cond = inputs(config)

  def grads(cfg):
    model = M.build_model(cfg)
    loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, z, log_snr, cond)))
    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = (
    grads(config),
    grads(load_config("models/tiny_base.gin", "UNetConfig.remat = 'full'")),
  )
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # bfloat16 compute (float32 parameters, norms and softmax): relative L2 error of the output < 3%.
  f32 = jax.jit(M.build_model(config).apply)({"params": params}, z, log_snr, cond)
  bf16_cfg = load_config("models/tiny_base.gin", "COMPUTE_DTYPE = 'bfloat16'")
  bf16 = jax.jit(M.build_model(bf16_cfg).apply)({"params": params}, z, log_snr, cond)
  assert bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert rel < 0.03, rel
  assert rel > 0.0  # it really computed in bfloat16


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match="one entry per level"):
    M.EfficientUNetConfig(channels=(32, 64), num_res_blocks=(1,))
  with pytest.raises(ValueError, match="remat"):
    M.UNetConfig(remat="sometimes")
  config = load_config("models/tiny_sr.gin")
  z, log_snr, cond = inputs(config, image_size=30)
  with pytest.raises(ValueError, match="divisible by the total stride"):
    M.build_model(config).init(jax.random.PRNGKey(0), z, log_snr, cond)


def _micro_unet(**fields):
  """A 16 px base U-Net small enough to build in a test (two levels of 16 channels)."""
  return M.UNetConfig(
    image_size=16,
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    head_dim=8,
    pool_heads=2,
    norm_groups=4,
    text_embed_dim=8,
    max_text_length=4,
    **fields,
  )


def test_base_unet_without_text_attention_uses_only_the_pooled_text():
  """text_attention=False (the paper's pooling-only ablation): no attention layer has text keys or
  values, yet the output still depends on the text (through the pooled embedding)."""
  from imagen_jax.models.unet import UNet

  cfg = _micro_unet(text_attention=False)
  z = jnp.zeros((2, 16, 16, 3))
  cond = {
    "text_emb": jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8)),
    "text_mask": jnp.ones((2, 4), bool),
  }
  model = UNet(cfg)
  params = nn.unbox(M.init_boxed_params(cfg, jax.random.PRNGKey(1)))  # jitted: eager init is slow
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert not any("text_key" in n or "text_value" in n for n in names)
  full = jax.eval_shape(
    lambda: M.init_boxed_params(
      dataclasses.replace(cfg, text_attention=True), jax.random.PRNGKey(1)
    )
  )
  full_names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(full)}
  assert any("text_key" in n for n in full_names)
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # zero-initialised outputs move
  other = dict(cond, text_emb=cond["text_emb"][::-1])
  apply = jax.jit(lambda c: model.apply({"params": params}, z, jnp.zeros(2), c))
  assert float(jnp.abs(apply(cond) - apply(other)).max()) > 1e-4


def test_base_unet_as_super_resolution_network_uses_its_lowres_input():
  """UNetConfig.lowres_size makes the base U-Net an SR network (the paper's baseline for the
  Efficient U-Net): the output depends on the conditioning image and its augmentation level, a
  conditioning image given at the input size is upsampled inside, and the cascade treats it as an
  SR stage."""
  from imagen_jax.models.unet import UNet

  cfg = _micro_unet(lowres_size=8)
  assert M.is_super_resolution(cfg) and not M.is_super_resolution(
    dataclasses.replace(cfg, lowres_size=None)
  )
  z, log_snr, cond = M.example_inputs(cfg, batch_size=2)
  assert cond[D.LOWRES].shape == (2, 8, 8, 3)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  cond = dict(
    cond,
    **{
      D.TEXT_EMB: jax.random.normal(keys[0], cond[D.TEXT_EMB].shape),
      D.LOWRES: jax.random.normal(keys[1], cond[D.LOWRES].shape),
    },
  )
  z = jax.random.normal(keys[2], z.shape)
  model = UNet(cfg)
  params = nn.unbox(M.init_boxed_params(cfg, jax.random.PRNGKey(1)))
  (kernel,) = [k for k in jax.tree_util.tree_leaves(params["conv_in"]) if k.ndim == 4]
  assert kernel.shape[2] == 6  # z and the upsampled low-res image
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # zero-initialised outputs move
  apply = jax.jit(lambda c: model.apply({"params": params}, z, log_snr, c))
  out = apply(cond)
  assert out.shape == z.shape
  assert float(jnp.abs(apply(dict(cond, lowres=-cond[D.LOWRES])) - out).max()) > 1e-3
  aug = dict(cond, **{D.LOWRES_AUG_LEVEL: cond[D.LOWRES_AUG_LEVEL] + 0.5})
  assert float(jnp.abs(apply(aug) - out).max()) > 1e-3
  # Given at the output size (noise added there), the network uses it as it is.
  up = jax.image.resize(cond[D.LOWRES], (2, 16, 16, 3), "bilinear")
  np.testing.assert_allclose(apply(dict(cond, lowres=up)), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("network", ["efficient", "unet"])
def test_lowres_skip_starts_as_the_upsampled_input_and_needs_x0(network):
  """lowres_skip adds the conditioning image (at the output size, as given) to the output: with
  the zero-initialised output conv a fresh network predicts exactly the upsampled low-res image;
  the configs and the run refuse it where nothing could use it."""
  from imagen_jax.diffusion import DiffusionConfig
  from imagen_jax.train import optimizer
  from imagen_jax.train.setup import RunSpec

  if network == "efficient":
    cfg = dataclasses.replace(load_config("models/tiny_sr.gin"), lowres_skip=True)
  else:
    cfg = _micro_unet(lowres_size=8, lowres_skip=True)
  z, log_snr, cond = M.example_inputs(cfg, batch_size=2)
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  cond = dict(cond, **{D.LOWRES: jax.random.uniform(k[0], cond[D.LOWRES].shape, minval=-1)})
  z = jax.random.normal(k[1], z.shape)
  model = M.build_model(cfg)
  params = nn.unbox(M.init_boxed_params(cfg, jax.random.PRNGKey(1)))
  out = jax.jit(lambda p: model.apply({"params": p}, z, log_snr, cond))(params)
  up = jax.image.resize(cond[D.LOWRES], z.shape, "bilinear")
  np.testing.assert_allclose(out, up, rtol=1e-6, atol=1e-6)
  # Without the skip the fresh network predicts zero.
  plain = M.build_model(dataclasses.replace(cfg, lowres_skip=False))
  zero = jax.jit(lambda p: plain.apply({"params": p}, z, log_snr, cond))(params)
  np.testing.assert_array_equal(zero, 0.0)
  opt = optimizer.OptimizerConfig(name="adam")
  RunSpec(cfg, DiffusionConfig(objective="x0"), opt, global_batch=2)
  with pytest.raises(ValueError, match="only an x0 prediction"):
    RunSpec(cfg, DiffusionConfig(objective="eps"), opt, global_batch=2)
  if network == "unet":
    with pytest.raises(ValueError, match="needs a super-resolution U-Net"):
      dataclasses.replace(cfg, lowres_size=None)
