"""Inpainting (known region kept, RePaint resampling), negative prompts, and the one program per
sampler family in the stage sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from imagen_jax import images as imio
from imagen_jax.diffusion import process
from imagen_jax.sample.settings import StageSettings
from imagen_jax.sample.stage_sampler import image_keys
from tests.unit.test_samplers import _one_device_sampler

SHAPE = (4, 8, 8, 3)


def _net(z, log_snr, cond):
  """A stand-in x0 network that depends on the state and the text."""
  text = (cond[D.TEXT_EMB].mean((1, 2)) * cond[D.TEXT_MASK].any(1))[:, None, None, None]
  return 0.6 * jnp.tanh(z) + 0.4 * text


def _cond(b=SHAPE[0]):
  emb = jnp.asarray(np.linspace(-1, 1, b * 3 * 2, dtype=np.float32).reshape(b, 3, 2))
  return {D.TEXT_EMB: emb, D.TEXT_MASK: jnp.ones((b, 3), bool)}


def _known():
  x = np.linspace(-0.9, 0.9, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
  return jnp.asarray(np.sin(7.0 * x))


def _sample(sampler="ddpm", **kw):
  return D.sample(
    _net,
    jax.random.PRNGKey(4),
    SHAPE,
    _cond(),
    schedule=D.CosineSchedule(),
    num_steps=12,
    objective="x0",
    sampler=sampler,
    guidance_scale=3.0,
    thresholding_method="dynamic",
    **kw,
  )


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_inpainting_keeps_all_generates_all_and_keeps_the_known_region(sampler):
  known = _known()
  keep_all = _sample(sampler, known=known, mask=jnp.ones(SHAPE[:3] + (1,)))
  np.testing.assert_array_equal(imio.to_uint8(keep_all), imio.to_uint8(known))
  plain = _sample(sampler)
  gen_all = _sample(sampler, known=known, mask=jnp.zeros(SHAPE[:3] + (1,)))
  np.testing.assert_array_equal(np.asarray(gen_all), np.asarray(plain))
  # Left half kept, right half generated.
  mask = np.zeros(SHAPE[:3] + (1,), np.float32)
  mask[:, :, :4] = 1.0
  half = np.asarray(_sample(sampler, known=known, mask=jnp.asarray(mask)))
  np.testing.assert_allclose(half[:, :, :4], np.asarray(known)[:, :, :4], atol=1e-6)
  assert np.abs(half[:, :, 4:] - np.asarray(known)[:, :, 4:]).mean() > 0.1
  # RePaint's resampling runs each step again from a re-noised state: other images, same known part.
  again = np.asarray(_sample(sampler, known=known, mask=jnp.asarray(mask), resample=3))
  np.testing.assert_allclose(again[:, :, :4], np.asarray(known)[:, :, :4], atol=1e-6)
  assert not np.allclose(again[:, :, 4:], half[:, :, 4:])


def test_repaint_reruns_every_step_but_the_last():
  calls = []

  def counted(z, log_snr, cond):
    jax.debug.callback(lambda: calls.append(1))
    return _net(z, log_snr, cond)

  mask = np.zeros(SHAPE[:3] + (1,), np.float32)
  mask[:, :, :4] = 1.0
  kw = dict(schedule=D.CosineSchedule(), objective="x0", guidance_scale=1.0)
  kw.update(thresholding_method="none", known=_known(), mask=jnp.asarray(mask))
  out = D.sample(counted, jax.random.PRNGKey(4), SHAPE, _cond(), num_steps=12, resample=3, **kw)
  jax.block_until_ready(out)
  assert len(calls) == 11 * 3 + 1  # the last step lands on t = 0 once


def test_negative_prompt_replaces_only_the_unconditional_branch():
  cond = _cond()
  z = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  log_snr = jnp.full((SHAPE[0],), 0.5)
  neg_emb = jnp.full((SHAPE[0], 3, 2), 2.0)
  uncond = D.negative_condition(cond, neg_emb, jnp.ones((SHAPE[0], 3), bool))
  w = 4.0
  x0, _ = D.guided_x0_eps(_net, z, log_snr, cond, w, "x0", uncond=uncond)
  np.testing.assert_allclose(x0, w * _net(z, log_snr, cond) + (1 - w) * _net(z, log_snr, uncond))
  plain, _ = D.guided_x0_eps(_net, z, log_snr, cond, w, "x0")
  null = D.null_condition(cond)
  np.testing.assert_allclose(plain, w * _net(z, log_snr, cond) + (1 - w) * _net(z, log_snr, null))
  assert not np.allclose(x0, plain)
  # Unguided (w = 1) there is no unconditional branch: the negative prompt changes nothing.
  one, _ = D.guided_x0_eps(_net, z, log_snr, cond, 1.0, "x0", uncond=uncond)
  np.testing.assert_array_equal(one, _net(z, log_snr, cond))


def test_stage_sampler_negative_prompts_and_one_program_per_sampler_family():
  apply_fn = lambda params, z, log_snr, cond: params * _net(z, log_snr, cond)
  cfg = D.DiffusionConfig(objective="x0")
  sampler = _one_device_sampler(apply_fn, cfg, 8, 3)
  keys = image_keys(range(4), 0)
  emb, mask = np.asarray(_cond()[D.TEXT_EMB]), np.ones((4, 3), bool)
  setting = StageSettings(sampler="dpmpp_2m", num_steps=10, guidance_scale=3.0)
  run = lambda setting, **kw: sampler.run(jnp.float32(1.0), emb, mask, keys, setting, **kw)
  plain = run(setting)
  # Today's guidance: the null condition built inside the jitted sampler (the settings traced as
  # the stage sampler traces them).
  _, k_sample = process.split_key(jnp.asarray(keys))
  today = jax.jit(
    lambda k, s, cond: D.sample(
      _net,
      k,
      (4, 8, 8, 3),
      cond,
      schedule=cfg.schedule,
      num_steps=s["num_steps"],
      objective="x0",
      sampler="dpmpp_2m",
      guidance_scale=s["guidance_scale"],
      thresholding_method=s["thresholding"],
      percentile=s["percentile"],
      spacing=s["spacing"],
      solver_order=s["solver_order"],
      sde=s["sde"],
      ddim_eta=s["ddim_eta"],
      t_start=s["t_start"],
    )
  )(k_sample, sampler._scalars(setting, 1.0, 1), {D.TEXT_EMB: emb, D.TEXT_MASK: mask})
  np.testing.assert_array_equal(plain, np.asarray(today))
  # An empty negative prompt's encoding (zeros, all False) as an input: the same images (to float
  # rounding; `Cascade.encode_negative` passes no negative at all for empty prompts, which is
  # today's program exactly).
  empty = run(setting, negative_emb=np.zeros_like(emb), negative_mask=np.zeros_like(mask))
  np.testing.assert_allclose(empty, plain, atol=1e-6)
  negative = run(setting, negative_emb=np.full_like(emb, 2.0), negative_mask=mask)
  assert np.abs(negative - plain).mean() > 1e-3
  # 2M, 3M, the SDE variant and every spacing: one compiled program.
  for name, spacing in [("dpmpp_3m", "logsnr"), ("dpmpp_2m_sde", "karras")]:
    other = run(StageSettings(sampler=name, num_steps=7, guidance_scale=3.0, spacing=spacing))
    assert not np.allclose(other, plain)
  assert sampler.trace_count == 2  # without and with negative prompts
  with pytest.raises(ValueError, match="do not match"):
    run(setting, negative_emb=emb[:, :2], negative_mask=mask[:, :2])
