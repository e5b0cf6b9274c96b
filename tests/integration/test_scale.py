"""Scale tools: the TPU ahead-of-time compile check (libtpu, no TPU), its host-RAM watch, and the
benchmark.

The compile checks use the micro U-Net (the trainer tests' network) so that XLA's TPU compiler
finishes in seconds; the paper-size results are in docs/scale.md and the slow set.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import cli
from imagen_jax.gin_utils import parse_gin
from imagen_jax.scale import bench, watch
from imagen_jax.scale import compile_check as cc
from imagen_jax.scale import flops as perf
from imagen_jax.train.setup import run_spec_from_gin
from tests import helpers
from tests.helpers import MICRO_BASE

ROOT = helpers.ROOT
pytest.importorskip("libtpu", reason="compile-check needs the tpu extra (make test installs it)")


def _cli(*argv):
  return cli.main([a for a in argv])


def _gin_args(files, *bindings):
  out = []
  for f in files:
    out += ["--gin_file", f]
  return out + [f"--gin.{b}" for b in bindings]


def _micro_args(*bindings):
  return _gin_args(
    ["runs/demo_base.gin", "models/tiny_base.gin"],
    *[b.replace(" = ", "=") for b in MICRO_BASE[1:]],
    *bindings,
  )


@pytest.fixture(scope="module")
def micro_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("cc") / "report.json"
  code = _cli(
    "compile-check",
    *_micro_args("BATCH_SIZE=8", "MESH=(-1,1,1)"),
    "--topology",
    "v5e:2x2",
    "--max_host_ram_gb",
    "0",
    "--json",
    str(out),
  )
  return code, json.loads(out.read_text())


def test_compile_check_of_the_micro_step_on_v5e(micro_report):
  code, r = micro_report
  assert code == 0 and r["fits"] and r["chips"] == 4 and r["device_kind"] == "TPU v5 lite"
  assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["per_chip_batch"] == 2
  m = r["memory"]
  # Plausible: the (replicated) state is an argument of every chip and is donated (aliased to the
  # output).
  assert m["arguments"] >= r["state_bytes_per_chip"] > 0
  assert m["alias"] >= 0.9 * r["state_bytes_per_chip"]
  assert 0 < m["total"] < r["hbm_limit"] and r["headroom"] > 0.9
  # FLOPs per chip: the same step compiled for this CPU on one device with a quarter of the batch.
  parse_gin(
    ["runs/demo_base.gin", "models/tiny_base.gin"],
    list(MICRO_BASE[1:]) + ["BATCH_SIZE = 2", "MESH = (-1, 1, 1)"],
  )
  run = run_spec_from_gin()
  from imagen_jax import partitioning

  mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
  lowered, _, _ = cc._lower_train(run, mesh, 2)
  cpu_flops = perf.compiled_flops(lowered.compile())
  assert abs(r["flops_per_chip"] - cpu_flops) / cpu_flops < 0.15, (r["flops_per_chip"], cpu_flops)
  # The TPU executable's own count is of the same order (its compiler pads and rewrites the tiny
  # convolutions).
  assert 0.5 < r["compiled_flops_per_chip"] / r["flops_per_chip"] < 2.0, r
  # Projection: time = FLOPs / peak; images/s = batch / time.
  assert r["step_seconds_at_100pct"] == pytest.approx(r["flops_per_chip"] / 197e12)
  assert r["images_per_second_at_mfu"] == pytest.approx(8 / (r["flops_per_chip"] / (197e12 * 0.5)))


def test_compile_check_reports_an_oversized_batch_as_not_fitting(tmp_path, capsys):
  out = tmp_path / "r.json"
  # 2^18 micro-U-Net images per chip: about 200 GiB of temporaries against v5e's 15.75 GiB (fails in
  # seconds).
  code = _cli(
    "compile-check",
    *_micro_args("BATCH_SIZE=1048576", "MESH=(-1,1,1)"),
    "--topology",
    "v5e:2x2",
    "--max_host_ram_gb",
    "0",
    "--no_flops",
    "--json",
    str(out),
  )
  text = capsys.readouterr().out
  assert code == 1
  r = json.loads(out.read_text())
  assert not r["fits"] and r["memory"] is None
  assert "memory" in r["error"].lower() and "hbm" in r["error"].lower(), r["error"]
  assert "fits: NO" in text and any("micro-batch" in a for a in r["advice"])
  assert any("remat" in a for a in r["advice"])


def _user_env():
  """The environment of a user's shell: no TF_CPP_MIN_LOG_LEVEL (`import jax` set it in this
  process)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for k in (watch.CHILD_ENV, "TF_CPP_MIN_LOG_LEVEL"):
    env.pop(k, None)
  return env


def test_host_ram_watch_stops_the_compile_with_one_line(tmp_path):
  env = _user_env()
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "imagen_jax.cli",
      "compile-check",
      *_micro_args("BATCH_SIZE=8"),
      "--topology",
      "v5e:2x2",
      "--max_host_ram_gb",
      "0.15",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 3, p.stderr[-2000:]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "host RAM" in lines[0] and "per-chip-equivalent compile" in lines[0], (
    p.stderr
  )


def test_watched_compile_check_passes_gin_bindings_to_its_child():
  """The watched child runs the command as given, bindings included (here one it must refuse)."""
  env = _user_env()
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "imagen_jax.cli",
      "compile-check",
      *_micro_args("BATCH_SIZE=6"),
      "--topology",
      "v5e:2x2",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 2 and "global batch 6 does not split" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize(
  "argv,fragment",
  [
    (["--topology", "v9:2x2"], "generation one of"),
    (
      ["--topology", "v5e:2x2", "--gin.MESH=(-1,3,1)"],
      "4 devices do not divide into fsdp/tensor sizes with product 3",
    ),
    (["--topology", "v5e:2x2", "--gin.BATCH_SIZE=6"], "does not split"),
  ],
)
def test_compile_check_bad_input_is_one_line(argv, fragment, capsys):
  assert _cli("compile-check", *_micro_args(), "--max_host_ram_gb", "0", *argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and fragment in err[0], err


def test_per_chip_slice_keeps_per_chip_batch_and_tensor_ways():
  assert cc.per_chip_slice((-1, 8, 1), 128, 4) == (1, 4, 1)
  assert cc.per_chip_slice((-1, 128, 1), 128, 8) == (1, 8, 1)
  assert cc.per_chip_slice((-1, 4, 2), 64, 8) == (1, 4, 2)
  assert cc.per_chip_slice((16, 1, 1), 16, 4) == (4, 1, 1)


def test_state_bytes_per_chip_is_exact_from_the_shardings():
  from imagen_jax import partitioning

  mesh = partitioning.create_mesh(2, 2, 2)
  spec = jax.sharding.PartitionSpec
  tree = {
    "a": jax.ShapeDtypeStruct((8, 6), jnp.float32),
    "b": jax.ShapeDtypeStruct((5,), jnp.bfloat16),
  }
  shardings = {
    "a": jax.sharding.NamedSharding(mesh, spec("fsdp", "tensor")),
    "b": jax.sharding.NamedSharding(mesh, spec()),
  }
  assert cc.state_bytes_per_chip(tree, shardings) == 4 * 3 * 4 + 5 * 2


# ------------------------------------------------------------------------------------------ bench


def _conv_stack(channels=(8, 16, 16, 8), size=16, batch=4):
  """A plain stack of 3x3 SAME convolutions with ReLU, and its analytic forward FLOPs (2 per
  MAC)."""

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for c in channels[1:]:
        x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", use_bias=False)(x))
      return x

  model = Stack()
  x = jnp.ones((batch, size, size, channels[0]))
  params = model.init(jax.random.PRNGKey(0), x)
  fwd = sum(
    2 * 9 * cin * cout * size * size * batch for cin, cout in zip(channels[:-1], channels[1:])
  )
  return model, params, x, fwd


def test_bench_flops_agree_with_an_analytic_count_for_a_conv_stack():
  """The FLOP accounting the benchmark uses (XLA cost analysis of the compiled program) against
  2*K*K*Cin*Cout*H*W*B per convolution: forward alone, and forward+backward (the input gradient
  of every layer but the first, and every kernel gradient: 3x the forward less the first layer's
  input gradient)."""
  model, params, x, fwd = _conv_stack()
  f = jax.jit(lambda p, x: model.apply(p, x))
  flops_fwd = perf.compiled_flops(f.lower(params, x).compile())
  assert abs(flops_fwd - fwd) / fwd < 0.10, (flops_fwd, fwd)
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x))))
  first = 2 * 9 * 8 * 16 * 16 * 16 * 4
  flops_train = perf.compiled_flops(g.lower(params, x).compile())
  expect = 3 * fwd - first
  assert abs(flops_train - expect) / expect < 0.10, (flops_train, expect)
  # And the benchmark's own summary turns them into TFLOP/s and MFU consistently.
  r = bench.summarise(
    "train",
    "conv stack",
    seconds=[0.5, 0.4, 0.6],
    batch=4,
    flops=flops_train,
    flops_source="x",
    mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)),
    compile_seconds=0.0,
  )
  assert r.seconds_median == 0.5 and r.images_per_second == 8.0
  assert r.tflops_per_device == pytest.approx(flops_train / 0.5 / 1e12)
  assert r.mfu == pytest.approx(flops_train / 0.5 / r.peak_flops)


def test_bench_cli_train_on_cpu_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  code = _cli(
    "bench",
    *_micro_args("BATCH_SIZE=8", "MESH=(-1,1,1)"),
    "--repeats",
    "3",
    "--warmup",
    "1",
    "--json",
    str(out),
  )
  assert code == 0
  r = json.loads(out.read_text())
  text = capsys.readouterr().out
  assert "MFU" in text and "images/s" in text
  assert r["what"] == "train" and r["batch"] == 8 and len(r["seconds"]) == 3 and r["devices"] == 8
  assert r["seconds_median"] > 0 and r["images_per_second"] == pytest.approx(
    8 / r["seconds_median"]
  )
  assert r["flops_per_device"] > 0 and 0 < r["mfu"] < 1.5
  # The step is the trainer's: FLOPs per device are the one-device step's over 8 devices (batch
  # split 8 ways).
  assert r["flops_source"].startswith("XLA cost analysis")
  # XLA's memory analysis of the compiled step: the arguments hold at least the train state.
  mem = r["extra"]["memory_bytes"]
  assert mem["arguments"] > 0 and mem["temporaries"] > 0 and mem["total"] >= mem["arguments"]


@pytest.mark.slow  # 74 s on 2 cores; scanning's equivalence is in tests/unit/test_scan.py
def test_flops_of_a_scanned_step_count_every_block():
  """XLA's cost analysis counts a scan body once: the scanned step's compiled FLOPs fall short of
  the unscanned step's; the compile check's figure (the unscanned step's HLO) equals the
  unscanned compiled figure."""
  from imagen_jax import partitioning

  parse_gin(
    ["runs/demo_sr.gin"],
    [
      "BATCH_SIZE = 2",
      "MESH = (1, 1, 1)",
      "SCAN_LAYERS = True",
      "EfficientUNetConfig.num_res_blocks = (1, 3)",
    ],
  )
  run = run_spec_from_gin()
  assert run.model_config.scan_layers
  mesh = partitioning.create_mesh(1, 1, 1, devices=jax.devices()[:1])
  import dataclasses

  unscanned = dataclasses.replace(
    run, model_config=dataclasses.replace(run.model_config, scan_layers=False)
  )
  compiled = {
    s: perf.compiled_flops(cc._lower_train(r, mesh, 2)[0].compile())
    for s, r in ((True, run), (False, unscanned))
  }
  assert compiled[True] < 0.9 * compiled[False], compiled
  counted = cc.unrolled_flops_per_chip(run, 1, 2)
  assert abs(counted - compiled[False]) / compiled[False] < 0.05, (counted, compiled)
  # Per chip: the same global program over 4 chips.
  assert cc.unrolled_flops_per_chip(run, 4, 8) == pytest.approx(counted, rel=0.02)


@pytest.mark.slow
def test_per_chip_equivalent_derivation_matches_a_full_compile():
  """A wide micro U-Net (36M parameters) whose state (Adam: params, EMA, two moments) is half its
  memory, on v5e:2x4 with fsdp 8: compiled for real, and derived from a per-chip-equivalent
  compile on v5e:2x2 (fsdp 4). The derived total and arguments agree with the real ones within 5%
  (measured 2026-11-23: total 162.6 MB derived vs 161.2 MB real; the slice itself measured 253.4
  MB). About 2 minutes on 2 cores."""
  bindings = [b for b in MICRO_BASE[1:] if not b.startswith("MODEL_CHANNELS")] + [
    "MODEL_CHANNELS = 384",
    "UNetConfig.norm_groups = 8",
    "BATCH_SIZE = 8",
    "MESH = (-1, 8, 1)",
  ]
  parse_gin(["runs/demo_base.gin", "models/tiny_base.gin"], bindings)
  run = run_spec_from_gin()
  real = cc.check_train(run, "v5e:2x4")
  derived = cc.check_train(run, "v5e:2x4", per_chip_equivalent="v5e:2x2")
  assert (
    real.fits
    and derived.fits
    and derived.measured_on["mesh"]["fsdp"] == 4
    and real.mesh["fsdp"] == 8
  )
  # The state is most of the memory, so the derivation is what is tested.
  assert real.state_bytes_per_chip > 0.4 * real.memory.total
  assert derived.state_bytes_per_chip == real.state_bytes_per_chip
  measured_slice = derived.measured_on["memory"]["total"]
  assert measured_slice > 1.2 * real.memory.total  # the slice really differs from the pod
  for field in ("arguments", "total"):
    a, b = getattr(derived.memory, field), getattr(real.memory, field)
    assert abs(a - b) / b < 0.05, (field, a, b)
  assert derived.flops_per_chip == pytest.approx(real.flops_per_chip, rel=0.05)


def test_compile_check_of_the_text_encoder(tmp_path):
  """--what encoder: the frozen T5 encoder's batch embedding, parameters sharded by the same axis
  rules."""
  out = tmp_path / "enc.json"
  code = _cli(
    "compile-check",
    *_micro_args("BATCH_SIZE=8", "MESH=(-1,2,2)"),
    "--what",
    "encoder",
    "--encoder_size",
    "tiny",
    "--topology",
    "v5e:2x2",
    "--max_host_ram_gb",
    "0",
    "--json",
    str(out),
  )
  r = json.loads(out.read_text())
  assert (
    code == 0
    and r["fits"]
    and r["what"] == "encoder"
    and r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  )
  from imagen_jax.text.t5 import T5_SIZES

  d_model, heads, d_kv, d_ff, layers = T5_SIZES["tiny"]
  # FLOPs: at least the matmuls of every layer (q, k, v, o projections and the gated-GELU MLP) over
  # 8 x 128
  # tokens, per chip.
  tokens = 8 * 128
  matmuls = 2 * tokens * layers * (4 * d_model * heads * d_kv + 3 * d_model * d_ff) / 4
  assert matmuls <= r["flops_per_chip"] < 4 * matmuls, (r["flops_per_chip"], matmuls)
  assert r["memory"]["arguments"] >= r["state_bytes_per_chip"] > 0


def test_bench_cli_sample_on_cpu(tmp_path):
  out = tmp_path / "bench.json"
  assert (
    _cli(
      "bench",
      *_micro_args("MESH=(-1,1,1)"),
      "--what",
      "sample",
      "--batch_size",
      "8",
      "--num_steps",
      "3",
      "--repeats",
      "2",
      "--warmup",
      "1",
      "--json",
      str(out),
    )
    == 0
  )
  r = json.loads(out.read_text())
  assert (
    r["what"] == "sample"
    and r["unit"] == "sampling step"
    and r["batch"] == 8
    and len(r["seconds"]) == 2
  )
  # images/s counts whole runs of num_steps steps.
  assert r["images_per_second"] == pytest.approx(8 / (3 * r["seconds_median"]))
  assert r["flops_per_device"] > 0 and r["mfu"] > 0


def test_bench_cli_refuses_no_timed_calls_before_compiling(capsys):
  from imagen_jax import cli

  assert cli.main(["bench", "--gin_file=runs/demo_base.gin", "--repeats", "0"]) == 2
  err = capsys.readouterr().err
  assert (
    "repeats must be at least 1 and warmup at least 0" in err and len(err.strip().splitlines()) == 1
  ), err
