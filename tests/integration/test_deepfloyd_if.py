"""DeepFloyd IF: the IF U-Net against diffusers' `UNet2DConditionModel` (the tiny IF configs of
diffusers' own IF pipeline tests, random weights), the converter and its refusals, our sampler
against diffusers' `IFPipeline` / `IFSuperResolutionPipeline` with the same noise, and the hybrid
loss's variational term against improved DDPM's formulas."""

import json

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from imagen_jax import cli, models
from imagen_jax.diffusion import process
from imagen_jax.models import if_convert
from imagen_jax.sample.settings import StageSettings
from imagen_jax.sample.stage_sampler import StageSampler, model_apply_fn

# diffusers' tests/pipelines/deepfloyd_if: _get_dummy_components and
# _get_superresolution_dummy_components.
TINY_IF = dict(
  sample_size=32,
  block_out_channels=[32, 64],
  down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
  up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
  out_channels=6,
  cross_attention_dim=32,
  encoder_hid_dim=32,
  attention_head_dim=8,
  addition_embed_type="text",
  addition_embed_type_num_heads=2,
  cross_attention_norm="group_norm",
  resnet_time_scale_shift="scale_shift",
  act_fn="gelu",
)
STAGES = {
  "I": dict(TINY_IF, layers_per_block=1, in_channels=3),
  "II": dict(
    TINY_IF,
    layers_per_block=[1, 2],
    in_channels=6,
    class_embed_type="timestep",
    mid_block_scale_factor=1.414,
    time_embedding_act_fn="gelu",
    time_embedding_dim=32,
  ),
}
SCHEDULER = dict(
  num_train_timesteps=1000,
  beta_schedule="squaredcos_cap_v2",
  beta_start=0.0001,
  beta_end=0.02,
  thresholding=True,
  dynamic_thresholding_ratio=0.95,
  prediction_type="epsilon",
)


def _tiny_unet(stage: str):
  from diffusers.models.attention_processor import AttnAddedKVProcessor

  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**STAGES[stage])
  unet.set_attn_processor(AttnAddedKVProcessor())
  with torch.no_grad():  # every tensor random (zero-initialised ones would hide layout errors)
    for p in unet.parameters():
      p.add_(0.1 * torch.randn_like(p))
    unet.conv_out.weight.mul_(0.25)  # eps of about unit size: sampling stays well conditioned
    unet.conv_out.bias.mul_(0.25)
  return unet.eval()


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
  """{stage: (the diffusers U-Net, its saved folder)}."""
  out = {}
  for stage in STAGES:
    unet = _tiny_unet(stage)
    directory = tmp_path_factory.mktemp(f"if_{stage}")
    unet.save_pretrained(directory)
    out[stage] = (unet, directory)
  return out


def _forward(unet, config, params, x, t, text, noise_level=None):
  """(ours, diffusers') outputs, NCHW, on NCHW input x (z, and for IF-II the low-res image)."""
  b = x.shape[0]
  mask = np.zeros((b, text.shape[1]), bool)
  mask[:, :5] = True  # IF ignores the mask: the padding positions are attended to all the same
  cond = {"text_emb": jnp.asarray(text), "text_mask": jnp.asarray(mask)}
  if config.lowres_size is not None:
    cond["lowres"] = jnp.asarray(x[:, 3:].transpose(0, 2, 3, 1))
  ours = models.build_model(config).apply(
    {"params": params},
    jnp.asarray(x[:, :3].transpose(0, 2, 3, 1)),
    jnp.zeros((b,)),
    cond,
    timesteps=t,
    noise_level=noise_level,
  )
  with torch.no_grad():
    ref = unet(
      torch.from_numpy(x),
      torch.from_numpy(t),
      encoder_hidden_states=torch.from_numpy(text),
      class_labels=None if noise_level is None else torch.from_numpy(noise_level),
    ).sample.numpy()
  return np.asarray(ours).transpose(0, 3, 1, 2), ref


@pytest.mark.parametrize("stage", ["I", "II"])
def test_forward_matches_diffusers(unets, stage):
  unet, directory = unets[stage]
  config, params = if_convert.load_diffusers(directory)
  assert (config.lowres_size is not None) == (stage == "II")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, STAGES[stage]["in_channels"], 32, 32)).astype(np.float32)
  text = rng.standard_normal((2, 77, 32)).astype(np.float32)
  level = np.array([250.0, 40.0], np.float32) if stage == "II" else None
  ours, ref = _forward(unet, config, params, x, np.array([999.0, 250.0], np.float32), text, level)
  assert ours.shape == ref.shape == (2, 6, 32, 32)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_fp16_sharded_variant_loads(tmp_path):
  half = _tiny_unet("II").half()
  half.save_pretrained(tmp_path, variant="fp16", max_shard_size="300KB")
  assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
  config, params = if_convert.load_diffusers(tmp_path)
  _, ref_params = if_convert.load_diffusers(tmp_path, variant="fp16")
  leaves = jax.tree_util.tree_leaves(params)
  assert all(leaf.dtype == np.float32 for leaf in leaves)
  want = half.state_dict()["conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(params["conv_in"]["Conv_0"]["kernel"], want)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, ref_params))


def _cli(capsys, *argv):
  code = cli.main(list(argv))
  return code, capsys.readouterr()


def _broken_copy(src, dst, *, config=None, drop=None, reshape=None, pickle_only=False):
  from safetensors.numpy import load_file, save_file

  dst.mkdir()
  cfg = json.loads((src / "config.json").read_text())
  cfg.update(config or {})
  (dst / "config.json").write_text(json.dumps(cfg))
  if pickle_only:
    (dst / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    return dst
  tensors = load_file(src / "diffusion_pytorch_model.safetensors")
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = np.zeros(tensors[reshape].shape[:-1] + (3,), np.float32)
  save_file(tensors, dst / "diffusion_pytorch_model.safetensors")
  return dst


@pytest.mark.parametrize(
  "case,expect",
  [
    ("missing", r"missing tensor mid_block\.attentions\.0\.add_k_proj\.weight"),
    ("shape", r"tensor conv_in\.bias has shape \(3,\)"),
    ("pickle", r"pickle"),
    ("block", r"unsupported down block type 'CrossAttnDownBlock2D'"),
    ("option", r"unsupported addition_embed_type='text_time'"),
  ],
)
def test_converter_refusals_are_one_line_and_write_nothing(unets, tmp_path, capsys, case, expect):
  import re

  _, src = unets["I"]
  kwargs = {
    "missing": dict(drop="mid_block.attentions.0.add_k_proj.weight"),
    "shape": dict(reshape="conv_in.bias"),
    "pickle": dict(pickle_only=True),
    "block": dict(config={"down_block_types": ["ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"]}),
    "option": dict(config={"addition_embed_type": "text_time"}),
  }[case]
  bad = _broken_copy(src, tmp_path / "bad", **kwargs)
  out = tmp_path / "run"
  code, captured = _cli(capsys, "convert", "if", "--from", str(bad), "--to", str(out))
  assert code == 2
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and re.search(expect, lines[0]), captured.err
  assert not out.exists()


def test_convert_writes_a_run_that_samples_and_names_its_settings(unets, tmp_path, capsys):
  from imagen_jax.train import checkpoints

  _, src = unets["II"]
  out = tmp_path / "run"
  code, captured = _cli(
    capsys, "convert", "if", "--from", str(src), "--to", str(out), "--lowres_size", "16"
  )
  assert code == 0, captured.err
  assert "IF-II 16->32px" in captured.out
  record = checkpoints.read_run_record(out)
  assert record["network"] == "IFUNetConfig" and record["super_resolution"]
  assert record["diffusion"]["learned_variance"] and record["diffusion"]["lowres_align_corners"]
  assert record["diffusion"]["null_text"] == "empty_prompt"
  assert record["diffusion"]["schedule"]["name"] == "discrete_cosine"
  config = models.model_config_from_record(record["network"], record["config"])
  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(models.abstract_params(config))
  )
  params, step = checkpoints.restore_ema_params(out, abstract)
  _, want = if_convert.load_diffusers(src, lowres_size=16)
  assert step == 0
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, want))
  code, captured = _cli(capsys, "convert", "if", "--from", str(src), "--to", str(out))
  assert code == 2 and "already holds a run" in captured.err


# ------------------------------------------------------------------------ the pipelines, end to end


class SpmT5Tokenizer:
  """T5's tokenization for the pipelines (sentencepiece pieces, EOS, padding 0), from the test's
  sentencepiece model: what IF's T5 tokenizer does, without transformers' conversion."""

  def __init__(self, path):
    import sentencepiece as spm

    self.sp = spm.SentencePieceProcessor(model_file=str(path))

  def __call__(self, texts, padding="max_length", max_length=77, truncation=True, **_):
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = []
    for t in texts:
      ids = self.sp.encode(t)
      ids = (ids[: max_length - 1] if truncation else ids) + [1]
      rows.append(ids + [0] * (max_length - len(ids)))
    ids = torch.tensor(rows, dtype=torch.long)
    out = type("Encoding", (), {})()
    out.input_ids, out.attention_mask = ids, (ids > 0).long()
    return out

  def batch_decode(self, ids):
    return [self.sp.decode([int(i) for i in row if int(i) > 1]) for row in ids]


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory, spm_model):
  """A random tiny T5 encoder (width 32, the tiny U-Nets' encoder_hid_dim) saved by transformers,
  and the tokenizer shim."""
  import transformers

  cfg = transformers.T5Config(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
  )
  torch.manual_seed(0)
  t5 = transformers.T5EncoderModel(cfg).eval()
  directory = tmp_path_factory.mktemp("if_t5")
  t5.save_pretrained(directory, safe_serialization=True)
  return t5, directory, SpmT5Tokenizer(spm_model)


PROMPTS = ["a red circle", "two blue squares on the left"]


class NoiseFeed:
  """Replaces diffusers' randn_tensor with the given tensors, in order."""

  def __init__(self, tensors):
    self.tensors = list(tensors)

  def __call__(self, shape, generator=None, device=None, dtype=None, **_):
    out = self.tensors.pop(0)
    assert tuple(out.shape) == tuple(shape), (out.shape, shape)
    return out.to(dtype)


def _our_noise(keys, shape, num_steps, sr=False):
  """The noise our StageSampler draws for per-image `keys`: (start, [step noises], aug noise)."""
  k_aug, k_sample = process.split_key(jnp.asarray(keys))
  k_init, k_loop = process.split_key(k_sample)
  to_torch = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
  start = to_torch(process.standard_normal(k_init, shape))
  steps = [
    to_torch(process.standard_normal(process.fold_in(k_loop, i), shape)) for i in range(num_steps)
  ]
  aug = to_torch(process.standard_normal(k_aug, shape)) if sr else None
  return start, steps, aug


def _encode(spm_model, t5_dir, prompts):
  from imagen_jax.text.encoder import encode_prompts

  enc = encode_prompts(prompts, spm_model, str(t5_dir), 77)
  empty = encode_prompts([""], spm_model, str(t5_dir), 77)
  n = len(prompts)
  return enc, (np.repeat(empty.emb, n, 0), np.repeat(empty.mask, n, 0))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_if_pipeline_and_our_sampler_draw_the_same_images(
  unets, text_encoder, spm_model, monkeypatch, sampler
):
  """Stage I: IFPipeline (tiny U-Net, tiny T5, the empty prompt as guidance's unconditional half,
  w = 7) and our StageSampler from the same noise: DDPM with the learned-range variance and IF's
  thresholding (95th percentile, at most 1.5), or DDIM; diffusers' 'leading' steps."""
  import diffusers.pipelines.deepfloyd_if.pipeline_if as pipeline_if
  import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm

  unet, directory = unets["I"]
  t5, t5_dir, tokenizer = text_encoder
  steps = 8
  if sampler == "ddpm":
    scheduler = diffusers.DDPMScheduler(
      variance_type="learned_range", sample_max_value=1.5, **SCHEDULER
    )
    setting = StageSettings(
      sampler="ddpm",
      num_steps=steps,
      guidance_scale=7.0,
      thresholding="dynamic",
      percentile=95.0,
      threshold_max=1.5,
      spacing="leading",
    )
  else:  # diffusers' DDIM does not re-derive eps from a thresholded x0: compare unthresholded
    scheduler = diffusers.DDIMScheduler(**dict(SCHEDULER, thresholding=False, clip_sample=False))
    scheduler.register_to_config(variance_type="fixed_small")  # IFPipeline reads it
    setting = StageSettings(
      sampler="ddim", num_steps=steps, guidance_scale=7.0, thresholding="none", spacing="leading"
    )
  pipe = diffusers.IFPipeline(
    tokenizer=tokenizer,
    text_encoder=t5,
    unet=unet,
    scheduler=scheduler,
    safety_checker=None,
    feature_extractor=None,
    watermarker=None,
    requires_safety_checker=False,
  )
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(3), len(PROMPTS)))
  start, step_noise, _ = _our_noise(keys, (len(PROMPTS), 32, 32, 3), steps)
  feed = NoiseFeed([start] + step_noise[:-1])  # the last step (t = 0) adds no noise
  monkeypatch.setattr(pipeline_if, "randn_tensor", feed)
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", feed)
  with torch.no_grad():
    ref = (
      pipe(
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=7.0,
        output_type="pt",
        clean_caption=False,
      )
      .images.numpy()
      .transpose(0, 2, 3, 1)
    )
  assert [list(map(int, scheduler.timesteps))[:2]] == [[875, 750]]
  assert not feed.tensors or sampler == "ddim"  # DDPM: every draw was ours

  config, params = if_convert.load_diffusers(directory)
  stage = StageSampler(
    model_apply_fn(models.build_model(config)),
    if_convert.if_diffusion_config(config),
    32,
    super_resolution=False,
    batch_size=2,
  )
  enc, empty = _encode(spm_model, t5_dir, PROMPTS)
  with torch.no_grad():
    pe, ne = pipe.encode_prompt(
      PROMPTS, do_classifier_free_guidance=True, num_images_per_prompt=1, clean_caption=False
    )
  np.testing.assert_allclose(enc.emb, pe.numpy(), atol=1e-5)  # our T5, all 77 positions
  np.testing.assert_allclose(empty[0], ne.numpy(), atol=1e-5)  # the empty prompt
  # No negative prompts: the sampler's null text (the empty prompt) is the unconditional half.
  stage.null_text = (empty[0][0], empty[1][0])
  out = stage.run(params, enc.emb, enc.mask, keys, setting)
  scale = np.abs(ref).max()
  if sampler == "ddpm":
    assert scale <= 1.0 + 1e-6  # thresholded to [-1, 1]
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3)
  else:
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * scale)


def test_if_superresolution_pipeline_and_our_sampler_draw_the_same_images(
  unets, text_encoder, spm_model, monkeypatch
):
  """Stage II: IFSuperResolutionPipeline and our SR StageSampler, same low-res images (16 -> 32 px,
  bilinear with aligned corners), noise level 250 of 1000 on the cosine schedule, w = 4, DDPM with
  the learned-range variance and thresholding bounded at 1.0, the same noise."""
  import diffusers.pipelines.deepfloyd_if.pipeline_if_superresolution as pipeline_sr
  import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm

  unet, directory = unets["II"]
  t5, t5_dir, tokenizer = text_encoder
  steps = 8
  pipe = diffusers.IFSuperResolutionPipeline(
    tokenizer=tokenizer,
    text_encoder=t5,
    unet=unet,
    scheduler=diffusers.DDPMScheduler(
      variance_type="learned_range", sample_max_value=1.0, **SCHEDULER
    ),
    image_noising_scheduler=diffusers.DDPMScheduler(**dict(SCHEDULER, thresholding=False)),
    safety_checker=None,
    feature_extractor=None,
    watermarker=None,
    requires_safety_checker=False,
  )
  n = len(PROMPTS)
  lowres = np.tanh(np.random.default_rng(2).standard_normal((n, 16, 16, 3))).astype(np.float32)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(5), n))
  start, step_noise, aug = _our_noise(keys, (n, 32, 32, 3), steps, sr=True)
  feed = NoiseFeed([start, aug] + step_noise[:-1])  # the last step (t = 0) adds no noise
  monkeypatch.setattr(pipeline_sr, "randn_tensor", feed)
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", feed)
  with torch.no_grad():
    ref = (
      pipe(
        prompt=PROMPTS,
        image=torch.from_numpy(lowres.transpose(0, 3, 1, 2).copy()),
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=4.0,
        noise_level=250,
        output_type="pt",
        clean_caption=False,
      )
      .images.numpy()
      .transpose(0, 2, 3, 1)
    )
  assert not feed.tensors  # every draw was ours

  config, params = if_convert.load_diffusers(directory, lowres_size=16)
  stage = StageSampler(
    model_apply_fn(models.build_model(config)),
    if_convert.if_diffusion_config(config),
    32,
    super_resolution=True,
    batch_size=2,
  )
  setting = StageSettings(
    sampler="ddpm",
    num_steps=steps,
    guidance_scale=4.0,
    thresholding="dynamic",
    percentile=95.0,
    threshold_max=1.0,
    spacing="leading",
    aug_level=0.251,  # IF's noise_level 250: augmentation.discrete_noise_level(250)
  )
  enc, empty = _encode(spm_model, t5_dir, PROMPTS)
  out = stage.run(
    params,
    enc.emb,
    enc.mask,
    keys,
    setting,
    lowres=lowres,
    negative_emb=empty[0],
    negative_mask=empty[1],
  )
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3)


# ------------------------------------------------------------------ fine-tuning and the sample CLI

TINY_GIN = """
include 'diffusion/if.gin'
include 'runs/finetune_if.gin'
from imagen_jax import models
model_config.config = @IFUNetConfig()
IFUNetConfig.image_size = 32
IFUNetConfig.block_out_channels = (32, 64)
IFUNetConfig.layers_per_block = 1
IFUNetConfig.down_block_types = ('ResnetDownsampleBlock2D', 'SimpleCrossAttnDownBlock2D')
IFUNetConfig.up_block_types = ('SimpleCrossAttnUpBlock2D', 'ResnetUpsampleBlock2D')
IFUNetConfig.attention_head_dim = 8
IFUNetConfig.cross_attention_dim = 32
IFUNetConfig.encoder_hid_dim = 32
IFUNetConfig.addition_embed_type_num_heads = 2
IFUNetConfig.max_text_length = 16
StageDataConfig.image_size = 32
BATCH_SIZE = 8
WARMUP_STEPS = 1
LEARNING_RATE = 1e-3
CHECKPOINT_EVERY = 2
LOG_EVERY = 1
SAMPLE_EVERY = 0
"""


def _finetune(capsys, gin_file, model_dir, init_from, cache, steps):
  code, captured = _cli(
    capsys,
    "train",
    f"--gin_file={gin_file}",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.TRAIN_DATA='{cache}'",
    f"--gin.INIT_FROM='{init_from}'",
    f"--gin.NUM_STEPS={steps}",
  )
  assert code == 0, captured.err[-2000:]
  return captured


def _state(run, config, step):
  from imagen_jax.train import checkpoints

  abstract = nn.unbox(models.abstract_params(config))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree_util.tree_map(lambda _: dev, abstract)
  raw = checkpoints.restore_init_params(str(run), step, abstract, shardings, "params")
  ema = checkpoints.restore_ema_params(str(run), abstract, shardings, step)[0]
  return jax.device_get(raw), jax.device_get(ema)


def test_converted_weights_finetune_resume_bit_for_bit_and_sample(
  unets, shapes_cache, spm_model, tiny_t5_checkpoint, tmp_path, capsys
):
  """A converted tiny IF-I fine-tunes from its run directory (init_from) with the hybrid loss on an
  embedding cache (the empty prompt's embedding read from it), FSDP over the 8 test devices; four
  steps in one go equal a restart from its step-2 checkpoint and two more, bit for bit; the
  fine-tuned IF-I and a
  converted IF-II (32 -> 64 px) then sample through runs/sample_if.gin."""
  from imagen_jax.data import tasks

  assert tasks.read_null_text(shapes_cache)[1][0]  # the empty prompt: EOS, then padding
  converted = {}
  for stage, extra in (("I", []), ("II", ["--image_size", "64", "--lowres_size", "32"])):
    converted[stage] = tmp_path / f"if_{stage}"
    code, captured = _cli(
      capsys, "convert", "if", "--from", str(unets[stage][1]), "--to", str(converted[stage]), *extra
    )
    assert code == 0, captured.err
  gin_file = tmp_path / "finetune_tiny.gin"
  gin_file.write_text(TINY_GIN)
  once, twice = tmp_path / "once", tmp_path / "twice"
  _finetune(capsys, gin_file, once, converted["I"], shapes_cache, 4)
  # A run stopped after its step-2 checkpoint (the same bytes: steps are deterministic), resumed.
  import shutil

  shutil.copytree(once, twice)
  shutil.rmtree(twice / "checkpoints" / "4")
  _finetune(capsys, gin_file, twice, converted["I"], shapes_cache, 4)
  config, start = if_convert.load_diffusers(unets["I"][1], max_text_length=16)
  raw_once, ema_once = _state(once, config, 4)
  raw_twice, ema_twice = _state(twice, config, 4)
  for a, b in zip(
    jax.tree_util.tree_leaves((raw_once, ema_once)),
    jax.tree_util.tree_leaves((raw_twice, ema_twice)),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  moved = [
    np.abs(a - b).max()
    for a, b in zip(jax.tree_util.tree_leaves(raw_once), jax.tree_util.tree_leaves(start))
  ]
  assert max(moved) > 1e-4  # it trained
  record = json.loads((once / "run.json").read_text())
  assert record["diffusion"]["learned_variance"] and record["init_from"]["step"] == 0

  t5_dir = tiny_t5_checkpoint[0]
  out_dir = tmp_path / "samples"
  code, captured = _cli(
    capsys,
    "sample",
    "--gin_file=runs/sample_if.gin",
    f"--gin.VOCAB='{spm_model}'",
    f"--gin.ENCODER='{t5_dir}'",
    f"--gin.IF_I_DIR='{once}'",
    f"--gin.IF_II_DIR='{converted['II']}'",
    "--gin.MAX_TEXT_LENGTH=16",
    "--gin.if_i/stage.image_size=32",
    "--gin.if_ii/stage.image_size=64",
    "--gin.if_i/stage.timesteps='sections:2,2'",  # 4 and 3 steps (27 cost 3 minutes here)
    "--gin.if_ii/stage.timesteps='sections:1,1,1'",
    "--prompts",
    "a red circle",
    "--out",
    str(out_dir),
  )
  assert code == 0, captured.err[-2000:]
  assert "ddpm 4 steps (step set)" in captured.out and "aug 0.251" in captured.out
  from PIL import Image

  sizes = {p.parent.name: Image.open(p).size for p in out_dir.rglob("p000_s00_seed0.png")}
  assert sizes == {"if_i": (32, 32), "if_ii": (64, 64)}, sizes


def test_t5_fp16_variant_index_loads_through_the_t5_loader(text_encoder, tmp_path):
  """IF's text_encoder/ folder holds T5-XXL as a sharded fp16 variant
  (model.safetensors.index.fp16.json + model.fp16-0000k-of-0000n.safetensors): the T5 loader reads
  it, every tensor the fp16 value of the original."""
  from imagen_jax.text import checkpoints as text_checkpoints

  t5, t5_dir, _ = text_encoder
  half = type(t5)(t5.config).eval()
  half.load_state_dict(t5.state_dict())
  half = half.half()
  half.save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB", safe_serialization=True)
  assert (tmp_path / "model.safetensors.index.fp16.json").is_file()
  assert len(list(tmp_path.glob("model.fp16-*-of-*.safetensors"))) > 1
  _, ours = text_checkpoints.load_hf(tmp_path)
  _, full = text_checkpoints.load_hf(t5_dir)
  rounded = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float16).astype(np.float32), full)
  assert jax.tree_util.tree_all(
    jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b), ours, rounded)
  )
