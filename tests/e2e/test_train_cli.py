"""`imagen-jax train` in subprocesses: SIGKILL at random points and resume bit for bit, SIGTERM, two
processes on 127.0.0.1 equal one process, bad input."""

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from imagen_jax import cli
from imagen_jax.train import checkpoints as ckpt
from imagen_jax.train import optimizer
from tests import helpers
from tests.helpers import MICRO_BASE, XLA_CACHE, load_config

ROOT = helpers.ROOT
STEPS = 12


def _env(devices=1):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env["IMAGEN_TEST_XLA_CACHE"] = XLA_CACHE
  return env


def _train_argv(model_dir, cache_dir, steps=STEPS, *extra):
  return [
    "train",
    f"--gin_file={MICRO_BASE[0]}",
    "--gin_file=runs/train_base.gin",
    *[f"--gin.{b.replace(' ', '')}" for b in MICRO_BASE[1:]],
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.TRAIN_DATA='{cache_dir}'",
    f"--gin.NUM_STEPS={steps}",
    "--gin.BATCH_SIZE=8",
    "--gin.MESH=(1, 1, 1)",
    "--gin.LOG_EVERY=1",
    "--gin.CHECKPOINT_EVERY=3",
    "--gin.KEEP_CHECKPOINTS=2",
    "--gin.WARMUP_STEPS=2",
    "--gin.LEARNING_RATE=1e-3",
    "--gin.OptimizerConfig.name='adam'",
    "--gin.StageDataConfig.image_size=16",
    "--gin.StageDataConfig.shuffle_buffer=16",
    f"--gin.train.compilation_cache_dir='{XLA_CACHE}'",
    *extra,
  ]


def _cmd(argv):
  return [sys.executable, "-m", "imagen_jax.cli", *argv]


def _final_state(model_dir):
  """The whole train state of a run's latest checkpoint, on one device, as NumPy."""
  from imagen_jax import partitioning
  from imagen_jax.diffusion import DiffusionConfig
  from imagen_jax.train.setup import RunSpec, TrainSetup

  opt = optimizer.OptimizerConfig(
    name="adam", learning_rate=1e-3, warmup_steps=2, decay_steps=STEPS
  )
  setup = TrainSetup(
    RunSpec(load_config(*MICRO_BASE), DiffusionConfig(), opt, global_batch=1, mesh_shape=(1, 1, 1)),
    partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1]),
  )
  mgr = ckpt.manager(model_dir, read_only=True)
  try:
    step = mgr.latest_step()
    state = ckpt.restore(mgr, step, setup.abstract, setup.shardings)
  finally:
    mgr.close()
  return step, jax.device_get(state)


def _tmp_checkpoints(model_dir):
  d = Path(model_dir) / ckpt.CHECKPOINTS
  return [p.name for p in d.iterdir() if "tmp" in p.name] if d.exists() else []


# Two kills (one at a random step, one right after an asynchronous save has started) in the default
# run; four in the slow one.
@pytest.mark.parametrize("num_kills", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_resumes_bit_for_bit(tmp_path, shapes_cache, num_kills):
  ref = tmp_path / "uninterrupted"
  res = subprocess.run(
    _cmd(_train_argv(ref, shapes_cache)), capture_output=True, text=True, env=_env(), timeout=600
  )
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  assert f"train: done at step {STEPS}" in res.stdout

  run = tmp_path / "killed"
  rng = random.Random(20261123)
  kills, during_save, resumed_at = [], 0, []
  while True:
    latest = ckpt.latest_step(run) if (run / ckpt.CHECKPOINTS).exists() else None
    p = subprocess.Popen(
      _cmd(_train_argv(run, shapes_cache)),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=_env(),
    )
    # Every second kill lands right after an asynchronous save has started; the others at a random
    # step.
    at_save = len(kills) % 2 == 1
    kill_step = rng.randint((latest or 0) + 1, STEPS - 1) if len(kills) < num_kills else None
    lines = []
    for line in p.stdout:
      lines.append(line)
      if line.startswith("resumed from"):
        resumed_at.append((latest, int(line.rsplit("(step ", 1)[1].rstrip(")\n"))))
      if kill_step is None:
        continue
      if (at_save and line.startswith("checkpoint: step")) or (
        not at_save and line.startswith(f"step {kill_step}/")
      ):
        p.send_signal(signal.SIGKILL)
        break
    rc = p.wait(timeout=600)
    if rc == 0:
      assert kill_step is None or not lines or "train: done" in "".join(lines), "".join(lines)[
        -3000:
      ]
      break
    assert rc == -signal.SIGKILL, "".join(lines)[-3000:]
    kills.append("save" if at_save else kill_step)
    during_save += bool(_tmp_checkpoints(run))
  assert len(kills) >= num_kills, kills
  assert during_save >= 1, f"no kill landed during an asynchronous save: {kills}"
  # Each restart resumed from the last complete checkpoint before it.
  assert resumed_at and all(a == b for a, b in resumed_at), resumed_at
  # The final state equals the uninterrupted run's, bit for bit (parameters, EMA, optimizer state,
  # key).
  (s1, want), (s2, got) = _final_state(ref), _final_state(run)
  assert s1 == s2 == STEPS
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  print(
    f"kills: {kills}; {during_save} left a half-written checkpoint behind; resumed at {resumed_at}"
  )


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(tmp_path, shapes_cache):
  run = tmp_path / "preempted"
  p = subprocess.Popen(
    _cmd(_train_argv(run, shapes_cache, 1000)),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=_env(),
  )
  out = []
  for line in p.stdout:
    out.append(line)
    if line.startswith("step 4/"):
      p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=600) == 0, "".join(out)[-3000:]
  text = "".join(out)
  assert "preempted (SIGTERM) at step" in text, text[-2000:]
  stopped = int(text.split("preempted (SIGTERM) at step ")[1].split(":")[0])
  assert stopped >= 4 and ckpt.latest_step(run) == stopped
  assert not _tmp_checkpoints(run)  # the save completed before the exit


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# `slow` (172 s of the suite's budget on a loaded 2-core VM, 2026-12-07: three processes compile on
# two cores): the sharded step's equality on a (data, fsdp, tensor) mesh is checked in process by
# tests/integration/test_train.py in every `make test`; `make test-slow` runs this one.
@pytest.mark.slow
def test_two_processes_equal_one_process_and_their_checkpoint_restores_in_one(tmp_path):
  worker = str(ROOT / "tests" / "multihost_worker.py")
  port = _free_port()
  pair = [
    subprocess.Popen(
      [sys.executable, worker, str(tmp_path / "pair"), "2", str(i), str(port), "2"],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=_env(2),
    )
    for i in range(2)
  ]
  single = subprocess.run(
    [sys.executable, worker, str(tmp_path / "single"), "1", "0", "0", "4"],
    capture_output=True,
    text=True,
    env=_env(4),
    timeout=600,
  )
  outs = [p.communicate(timeout=600)[0] for p in pair]
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
  for p, out in zip(pair, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1: done at step 2" in outs[1]
  # The pair's checkpoint, restored in this one process (8 devices, another placement), equals the
  # single process's run to float tolerance (the cross-host reductions sum in another order).
  config = load_config(*MICRO_BASE)
  abstract = nn.unbox(__import__("imagen_jax").models.abstract_params(config))
  got, step = ckpt.restore_ema_params(tmp_path / "pair", abstract)
  want, _ = ckpt.restore_ema_params(tmp_path / "single", abstract)
  assert step == 2
  for a, b in zip(
    jax.tree_util.tree_leaves(jax.device_get(got)), jax.tree_util.tree_leaves(jax.device_get(want))
  ):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # One data position per process.
  assert sorted(
    p.name
    for p in (tmp_path / "pair" / "checkpoints" / "2" / "data").iterdir()
    if p.name.startswith("process_")
  ) == ["process_00000.json", "process_00001.json"]


def _tree_digest(path):
  h = hashlib.sha256()
  for f in sorted(Path(path).rglob("*")):
    if f.is_file():
      h.update(str(f.relative_to(path)).encode())
      h.update(f.read_bytes())
  return h.hexdigest()


@pytest.mark.parametrize(
  "extra,message",
  [
    (
      ["--gin.train.num_stepz=3"],
      "--gin.train.num_stepz=3: Configurable 'train' doesn't have a parameter",
    ),
    (["--gin.nosuch.thing=1"], "No configurable matching 'nosuch'"),
    (["--gin.MODEL_DIR=/no/quotes"], "string values need quotes"),
    (["--gin.train.data_task='no_such_task'"], "data task 'no_such_task' is not registered"),
  ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, shapes_cache, capsys, extra, message):
  argv = _train_argv(
    tmp_path / "run", shapes_cache, 3, "--gin.MESH=(-1, 1, 1)", *extra
  )  # 8 devices here
  assert cli.main(argv) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("imagen-jax: error:") and message in err[0], err


def test_model_dir_of_another_stage_or_size_is_refused_untouched(tmp_path, shapes_cache, capsys):
  run = tmp_path / "run"
  # The run is made in this process (8 devices; no second TensorFlow start-up): only the refusals
  # below are under test.
  assert cli.main(_train_argv(run, shapes_cache, 3, "--gin.MESH=(-1, 1, 1)")) == 0
  capsys.readouterr()
  before = _tree_digest(run)
  wider = _train_argv(run, shapes_cache, 6, "--gin.MODEL_CHANNELS=32", "--gin.MESH=(-1, 1, 1)")
  assert cli.main(wider) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "holds a run of base UNetConfig" in err[0], err
  assert "model_channels" in err[0], err
  sr = [
    "train",
    "--gin_file=models/tiny_sr.gin",
    "--gin_file=runs/train_base.gin",
    f"--gin.MODEL_DIR='{run}'",
    f"--gin.TRAIN_DATA='{shapes_cache}'",
    "--gin.BATCH_SIZE=8",
    "--gin.MESH=(-1, 1, 1)",
    "--gin.StageDataConfig.image_size=32",
    "--gin.StageDataConfig.lowres_size=8",
  ]
  assert cli.main(sr) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "EfficientUNetConfig" in err[0], err
  assert _tree_digest(run) == before
