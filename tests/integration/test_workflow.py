"""The training workflow around the step: fine-tuning from another run (`train.init_from`, frozen
parameters), wandb beside TensorBoard, and evaluation during training."""

import glob
import json
import struct

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from imagen_jax import models as M
from imagen_jax.train import checkpoints as ckpt
from imagen_jax.train import data as tdata
from imagen_jax.train import loop, optimizer
from tests.helpers import ADAM, BATCH, EMA


def _train(model_dir, micro, shapes16, num_steps, **kw):
  args = dict(
    model_dir=str(model_dir),
    num_steps=num_steps,
    batch_source=tdata.InMemorySource(shapes16, BATCH),
    model_config=micro,
    optimizer=ADAM,
    ema_decay=EMA,
    log_every=2,
    checkpoint_every=4,
    progress=False,
    compilation_cache_dir=None,
  )
  args.update(kw)
  return loop.train(**args)


def _params(run, micro, step=None):
  return jax.device_get(
    ckpt.restore_ema_params(run, nn.unbox(M.abstract_params(micro)), step=step)[0]
  )


@pytest.fixture(scope="module")
def source_run(micro, shapes16, tmp_path_factory):
  run = tmp_path_factory.mktemp("source_run")
  _train(run, micro, shapes16, 8)
  return run


def _raw_params(run, micro, step):
  abstract = nn.unbox(M.abstract_params(micro))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree_util.tree_map(lambda _: dev, abstract)
  return jax.device_get(ckpt.restore_init_params(str(run), step, abstract, shardings, "params"))


def _assert_same(a, b, rtol=0.0):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=0)


@pytest.mark.parametrize("which", ["ema", "params"])
def test_init_from_starts_a_new_run_from_another_runs_parameters(
  micro, shapes16, source_run, tmp_path, which
):
  """The new run's parameters at step 0 are the source's step-4 EMA (or raw) parameters: its
  first step is at learning rate 0 (ADAM warms up from 0), so its step-1 checkpoint holds them
  unchanged."""
  new = tmp_path / "finetune"
  _train(
    new,
    micro,
    shapes16,
    1,
    init_from=f"{source_run}@4",
    init_from_params=which,
    checkpoint_every=1,
    log_every=1,
  )
  want = _params(source_run, micro, step=4) if which == "ema" else _raw_params(source_run, micro, 4)
  _assert_same(_raw_params(new, micro, 1), want)
  _assert_same(
    _params(new, micro, step=1), want, rtol=1e-6
  )  # the EMA starts there too (d x + (1-d) x)
  assert ckpt.read_run_record(new)["init_from"] == {
    "run": str(source_run),
    "step": 4,
    "params": which,
  }
  # and step 4 is not step 8: the step was honoured
  assert (
    max(
      float(np.abs(a - b).max())
      for a, b in zip(
        jax.tree_util.tree_leaves(want),
        jax.tree_util.tree_leaves(_params(source_run, micro, step=8)),
      )
    )
    > 0
  )


def test_init_from_of_another_shape_is_one_line_and_writes_nothing(
  micro, source_run, shapes_cache, tmp_path, capsys
):
  from imagen_jax import cli

  new = tmp_path / "wider"
  rc = cli.main(
    [
      "train",
      "--gin_file=runs/demo_base.gin",
      f"--gin.MODEL_DIR='{new}'",
      f"--gin.TRAIN_DATA='{shapes_cache}'",
      f"--gin.INIT_FROM='{source_run}'",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith(f"imagen-jax: error: init_from {source_run}: "), err
  assert "tensor" in err and ("shape" in err or "no tensor" in err), err
  assert not new.exists()
  # other bad values: one line, exit 2, MODEL_DIR never made
  for bad, message in (
    ("--gin.WRITERS=['tensorbord']", "unknown writer 'tensorbord'"),
    ("--gin.train.init_from_params='emma'", "init_from_params must be 'ema' or 'params'"),
    (f"--gin.INIT_FROM='{tmp_path / 'nowhere'}'", "init_from "),
  ):
    argv = [
      "train",
      "--gin_file=runs/demo_base.gin",
      f"--gin.MODEL_DIR='{new}'",
      f"--gin.TRAIN_DATA='{shapes_cache}'",
      bad,
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not new.exists(), bad
  # the right network at a step the source never saved
  record = ckpt.run_record(micro, nn.unbox(M.abstract_params(micro)))
  assert ckpt.check_init_from(f"{source_run}@8", record) == {"run": str(source_run), "step": 8}
  with pytest.raises(ckpt.RunDirError, match=r"no checkpoint at step 5 \(have \[4, 8\]\)"):
    ckpt.check_init_from(f"{source_run}@5", record)
  with pytest.raises(ckpt.RunDirError, match="no run.json"):
    ckpt.check_init_from(str(tmp_path), record)


def test_frozen_parameters_do_not_move(micro, shapes16, source_run, tmp_path):
  frozen = optimizer.OptimizerConfig(
    name="adam",
    learning_rate=1e-3,
    warmup_steps=0,
    decay_steps=None,
    freeze=["^conv_in/", "^time_"],
  )
  new = tmp_path / "frozen"
  _train(
    new,
    micro,
    shapes16,
    2,
    optimizer=frozen,
    init_from=str(source_run),
    init_from_params="params",
    checkpoint_every=2,
  )
  before = _raw_params(source_run, micro, 8)
  after = _raw_params(new, micro, 2)
  moved = {}
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves(after)
  ):
    moved[optimizer.param_path(path)] = float(np.abs(a - b).max())
  frozen_names = [n for n in moved if n.startswith(("conv_in/", "time_"))]
  assert frozen_names and all(moved[n] == 0 for n in frozen_names)
  assert sum(v > 0 for n, v in moved.items() if n not in frozen_names) > 0.9 * (
    len(moved) - len(frozen_names)
  )


def test_wandb_offline_logs_the_loss_tensorboard_logs(micro, shapes16, tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_SILENT", "true")
  with gin.unlock_config():
    gin.bind_parameter("WandbSettings.mode", "offline")
    gin.bind_parameter("WandbSettings.project", "imagen-jax-test")
  try:
    summary = _train(tmp_path, micro, shapes16, 6, writers=["tensorboard", "wandb"])
  finally:
    gin.clear_config()
  from imagen_jax.data import tf_setup

  tf = tf_setup()
  tb = {}
  for f in glob.glob(str(tmp_path / "train" / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(f):
      for v in event.summary.value:
        if v.tag == "learning/loss":
          tb[event.step] = (
            float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
          )
  logged = _wandb_history(tmp_path)
  assert sorted(tb) == [2, 4, 6] == [s for s, _ in summary.history]
  assert {s: logged[s]["learning/loss"] for s in tb} == pytest.approx(tb, rel=1e-6)


def _wandb_records(data: bytes):
  """The payloads of a .wandb file: a 7-byte header (':W&B', magic, version), then leveldb-log
  records (crc32 4 bytes, length 2, type 1: full / first / middle / last) in 32 KiB blocks."""
  pos, pending = 7, b""
  while pos + 7 <= len(data):
    left = 32768 - pos % 32768
    if left < 7:  # a block's tail too short for a header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
    if kind == 1:
      yield payload
    elif kind == 2:
      pending = payload
    elif kind == 3:
      pending += payload
    elif kind == 4:
      yield pending + payload


def _wandb_history(model_dir) -> dict:
  """step -> logged values, read back from the offline run's .wandb file."""
  from wandb.proto import wandb_internal_pb2

  files = glob.glob(str(model_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
  assert len(files) == 1, files
  history = {}
  with open(files[0], "rb") as f:
    for payload in _wandb_records(f.read()):
      rec = wandb_internal_pb2.Record()
      rec.ParseFromString(payload)
      if rec.WhichOneof("record_type") == "history":
        items = {
          (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item
        }
        history.setdefault(int(items.get("_step", rec.history.step.num)), {}).update(items)
  return history


def test_eval_hook_writes_its_metrics_at_the_configured_steps(
  micro, shapes16, spm_model, tiny_t5_checkpoint, tmp_path
):
  """ShapesEvalHook every 2 steps of a 4-step run: its held-out alignment reaches TensorBoard and
  MODEL_DIR/eval/shapes.jsonl at steps 2 and 4, and nowhere else."""
  from imagen_jax.eval.hook import METRICS, ShapesEvalHook

  t5_dir, _, _ = tiny_t5_checkpoint
  hook = ShapesEvalHook(vocab=spm_model, encoder=str(t5_dir), num_prompts=4, num_steps=2)
  _train(tmp_path, micro, shapes16, 4, eval_every=2, eval_hook=hook)
  lines = [json.loads(x) for x in (tmp_path / "eval" / "shapes.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [2, 4]
  assert set(lines[0]) == {"step", "setting"} | {f"eval/{k}" for k in METRICS}
  assert all(0.0 <= x[f"eval/{k}"] <= 1.0 for x in lines for k in METRICS)
  from imagen_jax.data import tf_setup

  tf = tf_setup()
  steps = []
  for f in glob.glob(str(tmp_path / "train" / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(f):
      steps += [event.step for v in event.summary.value if v.tag == "eval/count"]
  assert sorted(steps) == [2, 4]


def test_fid_clip_hook_logs_the_clip_score_of_its_samples(
  micro, shapes16, spm_model, tiny_t5_checkpoint, clip_checkpoint, tmp_path
):
  """FidClipEvalHook with a CLIP checkpoint: eval/clip at the configured steps equals the CLIP
  score recomputed from the hook's own samples; misconfigurations are one-line ConfigErrors."""
  from imagen_jax.errors import ConfigError
  from imagen_jax.eval.hook import FidClipEvalHook
  from imagen_jax.eval.networks import clip

  t5_dir, _, _ = tiny_t5_checkpoint
  prompts = ["a red circle", "two blue squares", "a green triangle"]
  (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
  kw = dict(prompts_file=str(tmp_path / "prompts.txt"), vocab=spm_model, encoder=str(t5_dir))
  with pytest.raises(ConfigError, match="needs both inception_weights and ref"):
    FidClipEvalHook(**kw, inception_weights="w")
  with pytest.raises(ConfigError, match="give inception_weights"):
    FidClipEvalHook(**kw)
  hook = FidClipEvalHook(**kw, clip_checkpoint=str(clip_checkpoint[0]), num_steps=2, batch_size=4)
  run = tmp_path / "run"
  _train(run, micro, shapes16, 2, eval_every=2, eval_hook=hook)
  lines = [json.loads(x) for x in (run / "eval" / "fid_clip.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [2] and set(lines[0]) == {"step", "setting", "eval/clip"}
  # the hook's samples scored independently
  want = clip.clip_score(clip.load(clip_checkpoint[0]), list(hook.last_images), prompts)[0]
  assert lines[0]["eval/clip"] == pytest.approx(want, rel=1e-5)
  assert hook.last_images.shape == (3, 16, 16, 3) and hook.last_images.dtype == np.uint8
