"""The command line's error paths: one line on stderr naming what to fix, exit code 2, no log
noise."""

import os
import subprocess
import sys
import textwrap

import gin
import pytest

from imagen_jax import cli, gin_utils


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _err_lines(capsys):
  return [l for l in capsys.readouterr().err.splitlines() if l.strip()]


CACHE = ["cache-embeddings", "--gin_file=runs/cache_synthetic.gin"]


def test_unparseable_gin_value_is_one_line_naming_the_binding(capsys):
  assert cli.main(CACHE + ["--gin.VOCAB=/x/spiece.model"]) == 2
  (line,) = _err_lines(capsys)
  assert line.startswith("imagen-jax: error: ") and "--gin.VOCAB=/x/spiece.model" in line
  assert "--gin.VOCAB=\"'/x/spiece.model'\"" in line  # what to write instead
  # An unclosed bracket is a tokenizer error in gin, not a SyntaxError: same treatment.
  assert cli.main(CACHE + ["--gin.MAX_LENGTH=(1,"]) == 2
  (line,) = _err_lines(capsys)
  assert "--gin.MAX_LENGTH=(1," in line


def test_gin_flag_without_value_is_one_line(capsys):
  assert cli.main(CACHE + ["--gin.VOCAB"]) == 2
  (line,) = _err_lines(capsys)
  assert "--gin.VOCAB has no value" in line and "--gin.KEY=VALUE" in line


def test_unknown_parameter_and_bad_gin_file_are_one_line(capsys, tmp_path):
  assert cli.main(CACHE + ["--gin.cache_embeddings.num_shardz=2"]) == 2
  (line,) = _err_lines(capsys)
  assert "--gin.cache_embeddings.num_shardz=2" in line and "num_shardz" in line
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'runs/cache_synthetic.gin'\nVOCAB = /no/quotes\n")
  assert cli.main(["cache-embeddings", f"--gin_file={bad}"]) == 2
  (line,) = _err_lines(capsys)
  assert "bad.gin, line 2" in line and "VOCAB = /no/quotes" in line
  assert cli.main(["cache-embeddings", "--gin_file=runs/no_such_run.gin"]) == 2
  (line,) = _err_lines(capsys)
  assert "gin file not found: runs/no_such_run.gin" in line
  assert cli.main(["t5", "encode", "--checkpoint", "x", "--vocab", "y", "--gin.A=1"]) == 2
  (line,) = _err_lines(capsys)
  assert "takes no --gin" in line


def test_missing_values_name_the_macros_the_user_sets(capsys):
  assert cli.main(CACHE) == 2
  (line,) = _err_lines(capsys)
  assert "required gin value(s) not set: CACHE_DIR, ENCODER, VOCAB" in line
  assert "vocab_path" not in line and "output_dir" not in line


@gin.configurable
def _needs(a=gin.REQUIRED, b=gin.REQUIRED, c=None):
  gin_utils.require("_needs", a=a, b=b, c=c)
  return a, b


def test_require_follows_macro_chains_to_what_the_user_sets():
  gin_utils.parse_gin(
    [], ["DATA = %gin.REQUIRED", "SOURCE = %DATA", "_needs.a = %SOURCE", "_needs.b = 1"]
  )
  with pytest.raises(gin_utils.GinConfigError, match=r"not set: DATA \("):
    _needs()
  gin_utils.parse_gin([], ["_needs.a = 1"])
  with pytest.raises(RuntimeError) as info:  # gin's own check, for a parameter nobody binds
    _needs()
  err = gin_utils.from_gin_runtime_error(info.value)
  assert err is not None and "not set: _needs.b (" in str(err)
  assert gin_utils.from_gin_runtime_error(RuntimeError("something else")) is None


# A stand-in TensorFlow that writes what the real one writes while it is imported, plus one real
# error.
FAKE_TF = {
  "tensorflow/__init__.py": """
        import os
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\\n")
        os.write(2, b"I0000 00:00:1.2 3 port.cc:153] oneDNN custom operations are on.\\n")
        os.write(2, b"I0000 00:00:1.2 3 cudart_stub.cc:31] Could not find cuda drivers on your "
                    b"machine\\n")
        os.write(2, b"E0000 00:00:1.2 3 something.cc:1] a real TensorFlow error\\n")

        class config:
          @staticmethod
          def set_visible_devices(devices, kind):
            os.write(2, b"E0000 00:00:1.2 3 cuda_platform.cc:52] failed call to cuInit: "
                        b"UNKNOWN ERROR (303)\\n")
        """,
  "tensorflow_text/__init__.py": "",
}

PROBE = """
import logging, os, sys
import jax                  # sets TF_CPP_MIN_LOG_LEVEL=1 when unset, as on a user's machine
import imagen_jax.data as d
d.tf_setup()
os.write(2, b"W0000 after TensorFlow: a native JAX line\\n")
logging.getLogger("jax._src.xla_bridge").warning("a JAX device message")
"""


@pytest.mark.parametrize("user_level", [None, "0"])
def test_tensorflow_startup_noise_is_filtered_unless_the_user_asks(tmp_path, user_level):
  for name, text in FAKE_TF.items():
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(textwrap.dedent(text))
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd()])
  if user_level is not None:
    env["TF_CPP_MIN_LOG_LEVEL"] = user_level
  res = subprocess.run(
    [sys.executable, "-c", PROBE],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
    cwd=tmp_path,
  )
  assert res.returncode == 0, res.stderr
  err = res.stderr
  assert "a real TensorFlow error" in err  # real errors are never swallowed
  assert "a native JAX line" in err and "a JAX device message" in err
  noise = ["absl::InitializeLog", "oneDNN", "cudart_stub", "cuInit"]
  if user_level is None:
    assert not [n for n in noise if n in err], err
  else:
    assert all(n in err for n in noise), err  # the user's setting: TensorFlow's log is theirs


def test_real_cli_error_path_prints_exactly_one_line(tmp_path):
  """A fresh process that imports the real TensorFlow: stderr holds the error line and nothing
  else."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  res = subprocess.run(
    [sys.executable, "-m", "imagen_jax.cli"] + CACHE,
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    cwd=tmp_path,
  )
  assert res.returncode == 2
  assert res.stderr.splitlines() == [
    "imagen-jax: error: required gin value(s) not set: CACHE_DIR, ENCODER, VOCAB (set them in a "
    "gin file or with "
    "--gin.CACHE_DIR=VALUE; strings in quotes)"
  ], res.stderr


def test_main_leaves_gin_unlocked_for_the_next_command(capsys, tmp_path):
  """A gin command finalizes (locks) the config; after main() returns, the next command in the
  same process may import modules that register configurables, which gin refuses while the config
  is locked."""
  import gin

  code = cli.main(
    [
      "eval",
      "shapes",
      "--gin_file=runs/sample_demo.gin",
      "--gin.VOCAB='/nonexistent/spiece.model'",
      "--gin.ENCODER='/nonexistent/t5'",
      "--out",
      str(tmp_path / "o"),
    ]
  )
  assert (
    code == 2 and "no run directory" in capsys.readouterr().err
  )  # failed inside the command, once finalized
  assert not gin.config_is_locked()

  @gin.configurable
  def registered_after_a_command(x=1):  # raised RuntimeError before the fix
    return x

  assert registered_after_a_command() == 1


def test_only_user_errors_become_one_line(monkeypatch, capsys):
  """A `UserError` (any subclass) is one line and exit 2; any other exception is a bug and keeps
  its traceback (catching every ValueError turned a JAX shape error into exit 2 with no
  traceback)."""
  from imagen_jax.cli import t5 as t5_cli
  from imagen_jax.errors import ConfigError

  argv = ["t5", "encode", "--checkpoint", "x", "--vocab", "y", "--prompts", "a"]

  def user_error(args):
    raise ConfigError("the value is out of range\nIn call to configurable 'x'")

  monkeypatch.setattr(t5_cli, "encode", user_error)
  assert cli.main(argv) == 2
  assert _err_lines(capsys) == ["imagen-jax: error: the value is out of range"]

  def bug(args):
    raise ValueError("Incompatible shapes for broadcasting: (2, 3) and (4,)")

  monkeypatch.setattr(t5_cli, "encode", bug)
  with pytest.raises(ValueError, match="Incompatible shapes"):
    cli.main(argv)


def test_every_user_facing_error_class_is_a_user_error():
  import inspect
  import pkgutil

  import imagen_jax
  from imagen_jax.errors import UserError

  classes = []
  for m in pkgutil.walk_packages(imagen_jax.__path__, "imagen_jax."):
    if m.name.endswith(".__main__"):
      continue
    module = __import__(m.name, fromlist=["_"])
    classes += [
      c
      for _, c in inspect.getmembers(module, inspect.isclass)
      if c.__module__ == m.name and c.__name__.endswith("Error")
    ]
  assert len(classes) >= 18, classes
  # NonFiniteError is not the user's to fix by editing input: a run that diverged exits 3.
  assert [c.__name__ for c in classes if not issubclass(c, UserError)] == ["NonFiniteError"]


def test_misuse_of_train_and_cache_embeddings_is_one_line(
  capsys, tmp_path, spm_model, tiny_t5_checkpoint, shapes_cache
):
  # BATCH_SIZE=0 reached TensorFlow ("Batch size must be greater than zero", a 46-line traceback).
  code = cli.main(
    [
      "train",
      "--gin_file=runs/demo_base.gin",
      f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
      f"--gin.TRAIN_DATA='{shapes_cache}'",
      "--gin.NUM_STEPS=200",
      "--gin.BATCH_SIZE=0",
    ]
  )
  assert code == 2 and _err_lines(capsys) == ["imagen-jax: error: batch_size must be >= 1, got 0"]
  # A mistyped data folder started a progress bar, then a 103-line traceback.
  code = cli.main(
    [
      "cache-embeddings",
      "--gin_file=runs/cache_folder.gin",
      "--gin.DATA='/no/pairs'",
      f"--gin.VOCAB='{spm_model}'",
      f"--gin.ENCODER='{tiny_t5_checkpoint[0]}'",
      f"--gin.CACHE_DIR='{tmp_path / 'cache'}'",
    ]
  )
  assert code == 2 and _err_lines(capsys) == [
    "imagen-jax: error: the folder source's path /no/pairs does not exist"
  ]
  assert not (tmp_path / "cache").exists()


def _plain_host_env():
  """A user's shell on a CPU host with the `tpu` extra installed: no JAX_PLATFORMS, no
  TF_CPP_MIN_LOG_LEVEL."""
  return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}


def test_commands_start_quietly_with_jax_platforms_unset(tmp_path, spm_model, tiny_t5_checkpoint):
  """libtpu probes for a TPU on any host and TensorFlow logs its start-up: neither reaches the
  user. A successful `t5 encode` writes nothing on stderr; a failing one writes its one line
  only."""
  t5_dir = str(tiny_t5_checkpoint[0])
  cmd = [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "t5",
    "encode",
    "--vocab",
    spm_model,
    "--prompts",
    "a red circle",
  ]
  res = subprocess.run(
    cmd + ["--checkpoint", t5_dir],
    capture_output=True,
    text=True,
    env=_plain_host_env(),
    timeout=300,
    cwd=tmp_path,
  )
  assert res.returncode == 0 and res.stderr == "", res.stderr
  assert "tokens=" in res.stdout
  res = subprocess.run(
    cmd + ["--checkpoint", str(tmp_path / "missing")],
    capture_output=True,
    text=True,
    env=_plain_host_env(),
    timeout=300,
    cwd=tmp_path,
  )
  assert res.returncode == 2 and res.stderr.splitlines() == [
    f"imagen-jax: error: {tmp_path / 'missing'}: no such checkpoint"
  ], res.stderr


def test_startup_points_jax_away_from_an_absent_tpu(monkeypatch):
  from imagen_jax import startup

  monkeypatch.setattr(startup, "has_tpu", lambda: False)
  assert startup.default_platforms() in (
    "cpu",
    "cuda,cpu",
  )  # libtpu is installed here (the tpu extra)
  monkeypatch.setattr(startup, "has_tpu", lambda: True)
  assert startup.default_platforms() == ""  # a TPU VM: JAX's own choice


@pytest.mark.parametrize(
  "argv, line",
  [
    # Imports the training stack, TensorFlow included (the data pipeline), before failing.
    (
      ["train", "--gin_file=runs/demo_base.gin"],
      "imagen-jax: error: required gin value(s) not set: MODEL_DIR, TRAIN_DATA (set them in a gin "
      "file or with --gin.MODEL_DIR=VALUE; strings in quotes)",
    ),
    # Loads a cascade: the orbax and JAX start-up, then the one line.
    (
      [
        "sample",
        "--gin_file=runs/sample_demo.gin",
        "--gin.VOCAB='/nonexistent/spiece.model'",
        "--gin.ENCODER='/nonexistent/t5'",
        "--gin.BASE_DIR='/nonexistent/base'",
        "--gin.SR_DIR='/nonexistent/sr'",
        "--prompts",
        "a red circle",
        "--out",
        "OUT",
      ],
      "imagen-jax: error: stage base: run directory not found: /nonexistent/base",
    ),
  ],
)
def test_failing_commands_print_one_line_with_jax_platforms_unset(tmp_path, argv, line):
  res = subprocess.run(
    [sys.executable, "-m", "imagen_jax.cli", *argv],
    capture_output=True,
    text=True,
    env=_plain_host_env(),
    timeout=300,
    cwd=tmp_path,
  )
  assert res.returncode == 2 and res.stderr.splitlines() == [line], res.stderr
