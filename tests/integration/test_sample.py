"""Cascade sampling (imagen_jax/sample): reproducibility whatever the batching, the SR plumbing,
sweeps, img2img, one compilation per stage, and the trainer's periodic sample grids.

Plumbing tests use stand-in networks (closed-form predictions: what the output must be is known);
the batch/device test and the trainer hook run the micro U-Net."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import batch_keys as K
from imagen_jax import images as imio
from imagen_jax import partitioning
from imagen_jax.diffusion import DiffusionConfig
from imagen_jax.errors import UserError
from imagen_jax.sample import cascade, stage_sampler
from imagen_jax.sample.settings import (
  StageSettings,
  apply_sweep,
  expand,
  stage_sweeps,
)
from tests.helpers import MICRO_BASE, load_config, randomized_params

DIM, LENGTH = 8, 6


def _text(n, seed=0):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((n, LENGTH, DIM)).astype(np.float32)
  mask = np.arange(LENGTH)[None] < rng.integers(2, LENGTH + 1, n)[:, None]
  return emb, mask


def text_standin(params, z, log_snr, cond):
  """An eps-prediction that depends on z, the noise level and the text (zero for the null
  condition)."""
  m = cond[K.TEXT_MASK].astype(jnp.float32)
  t = jnp.sum(cond[K.TEXT_EMB] * m[..., None], axis=(1, 2)) / (1.0 + m.sum(1))
  return 0.8 * z + params["w"] * jnp.tanh(t + 0.1 * log_snr)[:, None, None, None]


def sr_standin(params, z, log_snr, cond):
  """An x0-prediction: the (noise-augmented) conditioning image, upsampled by pixel repetition."""
  low = cond[K.LOWRES]
  f = z.shape[1] // low.shape[1]
  return low.repeat(f, axis=1).repeat(f, axis=2) + 0.0 * params["w"]


def standin_stage(
  name, index, apply_fn, size, *, lowres=None, objective="eps", settings=(), batch_size=4
):
  sr = lowres is not None
  # Noise at the input size: the stand-in then sees the previous stage's pixels themselves (at
  # 'output', the default, it would see their bilinear upsample; test_augmentation covers that).
  diffusion = DiffusionConfig(objective=objective, noise_aug_at="input")
  sampler = stage_sampler.StageSampler(
    apply_fn,
    diffusion,
    size,
    super_resolution=sr,
    batch_size=batch_size,
    mesh=partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1]),
  )
  spec = cascade.StageSpec(
    name=name,
    run_dir="(stand-in)",
    image_size=size,
    settings=tuple(settings) or (StageSettings(num_steps=3),),
  )
  return cascade.LoadedStage(
    spec=spec,
    index=index,
    model_config=types.SimpleNamespace(image_size=size, lowres_size=lowres or size),
    diffusion=diffusion,
    sampler=sampler,
    params={"w": jnp.float32(0.5)},
    checkpoint={"run_dir": "(stand-in)", "path": "(stand-in)", "step": 0},
    description=f"stand-in {name}",
  )


def prompts(n, seed=0):
  emb, mask = _text(n, seed)
  return cascade.EncodedPrompts(
    texts=[f"prompt {i}" for i in range(n)],
    emb=emb,
    mask=mask,
    truncated=[False] * n,
    lengths=[int(x) for x in mask.sum(1)],
  )


def _png(path):
  return imio.read_image(path).astype(np.int16)


# ------------------------------------------------------------------------------ a real network


def test_images_do_not_depend_on_batch_size_padding_or_device_count():
  """10 images (5 prompts x 2 samples): batch 4 on one device (padded last batch) = batch 8 over
  8 devices (padded); the same seeds give identical images, other seeds other images."""
  config = load_config(*MICRO_BASE)
  params = randomized_params(config)
  from imagen_jax import models

  apply_fn = stage_sampler.model_apply_fn(models.build_model(config))
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((5, 16, config.text_embed_dim)).astype(np.float32)
  mask = np.arange(16)[None] < np.array([3, 16, 8, 5, 12])[:, None]
  jobs_emb, jobs_mask = np.repeat(emb, 2, 0), np.repeat(mask, 2, 0)
  keys = stage_sampler.image_keys(100 + np.arange(10), 0)
  setting = StageSettings(num_steps=3, guidance_scale=2.0)
  one = stage_sampler.StageSampler(
    apply_fn,
    DiffusionConfig(),
    16,
    super_resolution=False,
    batch_size=4,
    mesh=partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1]),
  )
  eight = stage_sampler.StageSampler(
    apply_fn, DiffusionConfig(), 16, super_resolution=False, batch_size=8
  )
  stats = stage_sampler.RunStats()
  a = one.run(one.place_params(params), jobs_emb, jobs_mask, keys, setting, stats=stats)
  b = eight.run(eight.place_params(params), jobs_emb, jobs_mask, keys, setting)
  assert a.shape == b.shape == (10, 16, 16, 3)
  assert (
    stats.batches == 3 and stats.images == 10
  )  # 4 + 4 + 2 (padded to 4); padding never returned
  np.testing.assert_allclose(a, b, atol=2e-5)
  again = one.run(one.place_params(params), jobs_emb, jobs_mask, keys, setting)
  np.testing.assert_array_equal(a, again)
  other = one.run(
    one.place_params(params),
    jobs_emb,
    jobs_mask,
    stage_sampler.image_keys(200 + np.arange(10), 0),
    setting,
  )
  assert np.abs(other - a).mean() > 0.05
  # An image's own key decides it: image 3 drawn alone equals image 3 drawn in the batch.
  alone = one.run(one.place_params(params), jobs_emb[3:4], jobs_mask[3:4], keys[3:4], setting)
  np.testing.assert_allclose(alone[0], a[3], atol=2e-5)
  assert one.trace_count == 2 and eight.trace_count == 1  # batch 4 and batch 1 (alone); batch 8


# ------------------------------------------------------------------------------ stand-in cascades


def test_cascade_writes_each_stage_at_its_resolution_and_sr_reproduces_its_input(tmp_path):
  """base (8 px) -> SR (16 px) whose x0 prediction is the upsampled conditioning image: at
  augmentation level 0 the SR output, box-downsampled, is the base output; an SR-only call on the
  written base PNGs reproduces the cascade's SR images (both sweep rows) bit for bit."""
  sr_settings = expand(StageSettings(num_steps=4, guidance_scale=1.0), {"aug_level": [0.0, 0.3]})
  base = standin_stage("base", 0, text_standin, 8)
  sr = standin_stage("sr", 1, sr_standin, 16, lowres=8, objective="x0", settings=sr_settings)
  text = prompts(3)
  res = cascade.run_cascade(
    [base, sr],
    text,
    tmp_path / "out",
    seed=7,
    samples_per_prompt=2,
    progress=False,
    log=lambda m: None,
  )
  out = tmp_path / "out"
  rec = json.loads((out / "settings.json").read_text())
  assert [j["seed"] for j in rec["images"]] == [7 + k * 2 + j for k in range(3) for j in range(2)]
  assert [j["prompt"] for j in rec["images"]] == [0, 0, 1, 1, 2, 2]
  base_files = res.stages[0].files[0]
  assert base_files[3] == "base/p001_s01_seed10.png"
  base_px = np.stack([_png(out / f) for f in base_files])
  assert base_px.shape == (6, 8, 8, 3)
  clean = np.stack([_png(out / f) for f in res.stages[1].files[0]])  # aug 0
  noisy = np.stack([_png(out / f) for f in res.stages[1].files[1]])  # aug 0.3
  assert clean.shape == (6, 16, 16, 3)
  assert res.stages[1].files[1][0].startswith("sr/w1_dynamic99.5_ddpm4_aug0.3/")
  from imagen_jax.data.pipeline import box_downsample  # the data pipeline's own low-res rule

  down = box_downsample(clean.astype(np.float64), 2)
  assert (
    np.abs(down - base_px).max() <= 0.5 + 1e-9
  )  # equal up to the 8-bit rounding of the SR output
  assert np.abs(noisy - clean).mean() > 5  # the aug 0.3 row really is augmented
  for name in ("grid.png", "base/grid.png", "sr/grid.png", "sr/sweep.png"):
    assert (out / name).is_file()
  assert rec["stages"][1]["settings"][1]["aug_level"] == 0.3
  # SR only, from the written base images (6 images, 3 prompts: two consecutive images per prompt).
  low, files = imio.read_folder(out / "base", 8, "lowres")
  assert [f.name for f in files] == [f.split("/")[-1] for f in base_files]
  sr_only = standin_stage("sr", 1, sr_standin, 16, lowres=8, objective="x0", settings=sr_settings)
  res2 = cascade.run_cascade(
    [sr_only],
    text,
    tmp_path / "sr_only",
    seed=7,
    lowres_images=low,
    progress=False,
    log=lambda m: None,
  )
  for row in range(2):
    for f1, f2 in zip(res.stages[1].files[row], res2.stages[0].files[row]):
      np.testing.assert_array_equal(_png(out / f1), _png(tmp_path / "sr_only" / f2))


def test_sweep_rows_use_their_settings_and_the_sweep_compiles_once(tmp_path):
  sweep = expand(
    StageSettings(num_steps=3),
    {"guidance_scale": [1.0, 4.0], "thresholding": ["none", "dynamic:90"], "num_steps": [2, 5]},
  )
  assert len(sweep) == 8
  st = standin_stage("base", 0, text_standin, 8, settings=sweep)
  text = prompts(2)
  res = cascade.run_cascade(
    [st], text, tmp_path / "sweep", seed=3, progress=False, log=lambda m: None
  )
  assert res.stages[0].traces == 1  # 8 settings (w, thresholding, steps): one program
  rows = {
    s: [_png(tmp_path / "sweep" / f) for f in files]
    for s, files in zip(res.stages[0].settings, res.stages[0].files)
  }
  # The w = 1 row equals a separate unguided call (a program without the doubled batch) ...
  for setting in (
    StageSettings(num_steps=2, guidance_scale=1.0, thresholding="none"),
    StageSettings(num_steps=5, guidance_scale=4.0, thresholding="dynamic", percentile=90.0),
  ):
    alone = standin_stage("base", 0, text_standin, 8, settings=[setting])
    out = tmp_path / f"alone_{setting.slug()}"
    r = cascade.run_cascade([alone], text, out, seed=3, progress=False, log=lambda m: None)
    for a, b in zip(rows[setting], [_png(out / f) for f in r.stages[0].files[0]]):
      assert np.abs(a - b).max() <= 1  # 8-bit rounding of values equal to ~1e-6
  # ... and each setting changes the images.
  w1 = rows[StageSettings(num_steps=5, guidance_scale=1.0, thresholding="none")]
  w4 = rows[StageSettings(num_steps=5, guidance_scale=4.0, thresholding="none")]
  assert np.abs(np.stack(w1) - np.stack(w4)).mean() > 2
  assert (tmp_path / "sweep" / "base" / "sweep.png").is_file()


def test_img2img_strength_zero_is_the_image_and_one_is_sampling_from_noise():
  st = standin_stage("base", 0, text_standin, 8)
  emb, mask = _text(3)
  keys = stage_sampler.image_keys([5, 6, 7], 0)
  init = np.random.default_rng(1).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  setting = StageSettings(num_steps=4, guidance_scale=2.0)
  run = lambda **kw: st.sampler.run(st.params, emb, mask, keys, setting, **kw)  # noqa: E731
  np.testing.assert_array_equal(run(x_init=init, strength=0.0), init)
  np.testing.assert_allclose(run(x_init=init, strength=1.0), run(), atol=1e-6)
  half = run(x_init=init, strength=0.5)
  assert np.abs(half - init).mean() > 1e-3 and np.abs(half - run()).mean() > 1e-3


def test_core_sampler_per_example_keys_and_t_start():
  """The core's per-example keys: example b of a batch = the same example sampled alone."""
  from imagen_jax.diffusion import samplers
  from imagen_jax.diffusion.schedules import CosineSchedule

  fn = lambda z, l, c: 0.5 * z  # noqa: E731
  keys = jnp.asarray(stage_sampler.image_keys([1, 2, 3], 0))
  kw = dict(schedule=CosineSchedule(), num_steps=4, thresholding_method="static")
  batch = samplers.sample(fn, keys, (3, 4, 4, 3), **kw)
  alone = samplers.sample(fn, keys[1:2], (1, 4, 4, 3), **kw)
  np.testing.assert_allclose(batch[1], alone[0], atol=1e-6)


def test_thresholding_by_traced_index_is_thresholding_by_name():
  """The sampler passes the method as a traced index (lax.switch): each index is its named
  method."""
  from imagen_jax.diffusion import process
  from imagen_jax.diffusion import thresholding as T

  rng = np.random.default_rng(0)
  x0 = jnp.asarray(3.0 * rng.standard_normal((2, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32)
  alpha, sigma = jnp.array([0.6, 0.8]), jnp.array([0.8, 0.6])
  z = process.diffuse(x0, eps, alpha, sigma)
  by_index = jax.jit(lambda i: T.threshold_x0_eps(x0, eps, z, alpha, sigma, i, 90.0))
  outs = []
  for name in T.THRESHOLDING:
    x_name, e_name = T.threshold_x0_eps(x0, eps, z, alpha, sigma, name, 90.0)
    np.testing.assert_allclose(x_name, T.threshold(x0, name, 90.0), atol=1e-6)
    x_idx, e_idx = by_index(T.thresholding_index(name))
    np.testing.assert_allclose(x_idx, x_name, atol=1e-6)
    np.testing.assert_allclose(e_idx, e_name, atol=1e-5)
    outs.append(np.asarray(x_idx))
  assert all(np.abs(a - b).max() > 0.1 for i, a in enumerate(outs) for b in outs[i + 1 :])


# ------------------------------------------------------------------------------ settings and errors


def _flags(**given):
  """argparse's namespace for the setting flags (unset ones None)."""
  import argparse

  from imagen_jax.cli import common

  return argparse.Namespace(**{**{f: None for f in common.SETTING_FLAGS}, **given})


def test_settings_flags_sweeps_and_their_errors():
  from imagen_jax.cli.common import setting_overrides

  sweeps = stage_sweeps(
    setting_overrides(
      _flags(guidance=["base=1,3,5"], steps=["16"], thresholding=["sr=none,dynamic:99.9"])
    ),
    ["base", "sr"],
  )
  assert sweeps == {
    "base": {"guidance_scale": [1.0, 3.0, 5.0], "num_steps": [16]},
    "sr": {"num_steps": [16], "thresholding": ["none", "dynamic:99.9"]},
  }
  base = apply_sweep(StageSettings(), sweeps["base"])
  assert [(s.guidance_scale, s.num_steps) for s in base] == [(1.0, 16), (3.0, 16), (5.0, 16)]
  sr = apply_sweep(StageSettings(), sweeps["sr"])
  assert [(s.thresholding, s.percentile) for s in sr] == [("none", 99.5), ("dynamic", 99.9)]
  for flags, message in (
    ({"sampler": ["euler"]}, "unknown sampler"),
    ({"steps": ["-3"]}, ">= 1"),
    ({"thresholding": ["soft"]}, "unknown thresholding"),
    ({"guidance": ["x=2"]}, "no stage 'x'"),
    ({"aug_level": ["sr=1.5"]}, "in \\[0, 1\\]"),
    ({"guidance": ["base=a,b"]}, "float"),
  ):
    with pytest.raises(
      UserError, match=message
    ):  # the CLI's parse (UsageError) or the settings' checks
      for stage, sweep in stage_sweeps(setting_overrides(_flags(**flags)), ["base", "sr"]).items():
        apply_sweep(StageSettings(), sweep)


def test_bad_inputs_to_a_cascade_are_refused_before_anything_is_written(tmp_path):
  base = standin_stage("base", 0, text_standin, 8)
  sr = standin_stage("sr", 1, sr_standin, 16, lowres=8, objective="x0")
  text = prompts(2)
  cases = [
    (dict(stages=[base, base]), "only a super-resolution network"),
    (dict(stages=[sr]), "give its 8px inputs with lowres_images"),
    (dict(stages=[base], lowres_images=np.zeros((2, 8, 8, 3), np.float32)), "is a base stage"),
    (dict(stages=[sr], lowres_images=np.zeros((2, 4, 4, 3), np.float32)), "takes 8x8"),
    (
      dict(stages=[sr], lowres_images=np.zeros((3, 8, 8, 3), np.float32)),
      "3 images but 2 prompts",
      UserError,
    ),
    (dict(stages=[base], samples_per_prompt=0), "samples_per_prompt"),
    (dict(stages=[base], strength=1.5), "strength"),
  ]
  for i, (kw, message, *error) in enumerate(cases):
    stages = kw.pop("stages")
    with pytest.raises(error[0] if error else cascade.SampleError, match=message):
      cascade.run_cascade(stages, text, tmp_path / f"out{i}", progress=False, **kw)
    assert not (tmp_path / f"out{i}").exists()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x.png").write_bytes(b"")
  with pytest.raises(cascade.SampleError, match="not empty"):
    cascade.run_cascade([base], text, tmp_path / "full", progress=False)
  # Input folders: an unreadable file and a wrong size are named.
  (tmp_path / "imgs").mkdir()
  imio.save_png(tmp_path / "imgs" / "a.png", np.zeros((8, 8, 3), np.uint8))
  (tmp_path / "imgs" / "b.png").write_bytes(b"not a png")
  with pytest.raises(imio.ImageError, match="cannot read image .*b.png"):
    imio.read_folder(tmp_path / "imgs", 8, "lowres")
  (tmp_path / "imgs" / "b.png").unlink()
  with pytest.raises(imio.ImageError, match="a.png is 8x8, but this stage takes 16x16"):
    imio.read_folder(tmp_path / "imgs", 16, "lowres")


# ------------------------------------------------------------------------------ the trainer's hook


def test_training_writes_periodic_sample_grids_to_png_and_tensorboard(tmp_path):
  from imagen_jax.sample.grid_hook import SampleGridHook
  from imagen_jax.train import data as tdata
  from imagen_jax.train import loop
  from tests.helpers import ADAM, BATCH, EMA

  config = load_config(*MICRO_BASE)
  arrays = tdata.word_vector_shapes(64, 16, 32, 16)
  hook = SampleGridHook(num_prompts=3, num_steps=2)
  loop.train(
    model_dir=str(tmp_path),
    num_steps=4,
    batch_source=tdata.InMemorySource(arrays, BATCH),
    model_config=config,
    optimizer=ADAM,
    ema_decay=EMA,
    log_every=2,
    checkpoint_every=100,
    progress=False,
    compilation_cache_dir=None,
    sample_every=2,
    sample_hook=hook,
  )
  assert [p.split("/")[-1] for p in hook.written] == ["step_00000002.png", "step_00000004.png"]
  first, second = (imio.read_image(p) for p in hook.written)
  assert first.shape == second.shape and first.shape[1] >= 3 * 128  # 3 columns of at least 128 px
  assert (
    np.abs(first.astype(int) - second.astype(int)).mean() > 0
  )  # the EMA moved between the grids
  from imagen_jax.data import tf_setup

  tf_setup()
  import tensorflow as tf

  tags = set()
  for f in (tmp_path / "train").glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(f)):
      tags.update(v.tag for v in event.summary.value)
  assert "samples" in tags
