"""The command line's error paths: one line on stderr naming what to fix, exit code 2, no log noise."""

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
  assert "--gin.VOCAB=\"'/x/spiece.model'\"" in line          # what to write instead
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
  gin_utils.parse_gin([], ["DATA = %gin.REQUIRED", "SOURCE = %DATA", "_needs.a = %SOURCE", "_needs.b = 1"])
  with pytest.raises(gin_utils.GinConfigError, match=r"not set: DATA \("):
    _needs()
  gin_utils.parse_gin([], ["_needs.a = 1"])
  with pytest.raises(RuntimeError) as info:    # gin's own check, for a parameter nobody binds
    _needs()
  err = gin_utils.from_gin_runtime_error(info.value)
  assert err is not None and "not set: _needs.b (" in str(err)
  assert gin_utils.from_gin_runtime_error(RuntimeError("something else")) is None


# A stand-in TensorFlow that writes what the real one writes while it is imported, plus one real error.
FAKE_TF = {
    "tensorflow/__init__.py": """
        import os
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, b"I0000 00:00:1.2 3 port.cc:153] oneDNN custom operations are on.\\n")
        os.write(2, b"I0000 00:00:1.2 3 cudart_stub.cc:31] Could not find cuda drivers on your machine\\n")
        os.write(2, b"E0000 00:00:1.2 3 something.cc:1] a real TensorFlow error\\n")

        class config:
          @staticmethod
          def set_visible_devices(devices, kind):
            os.write(2, b"E0000 00:00:1.2 3 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\\n")
        """,
    "tensorflow_text/__init__.py": "",
}

PROBE = """
import logging, os, sys
import jax                         # sets TF_CPP_MIN_LOG_LEVEL=1 when unset, like on a user's machine
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
  res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  err = res.stderr
  assert "a real TensorFlow error" in err                  # real errors are never swallowed
  assert "a native JAX line" in err and "a JAX device message" in err
  noise = ["absl::InitializeLog", "oneDNN", "cudart_stub", "cuInit"]
  if user_level is None:
    assert not [n for n in noise if n in err], err
  else:
    assert all(n in err for n in noise), err             # the user's setting: TensorFlow's log is theirs


def test_real_cli_error_path_prints_exactly_one_line(tmp_path):
  """A fresh process that imports the real TensorFlow: stderr holds the error line and nothing else."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  res = subprocess.run([sys.executable, "-m", "imagen_jax.cli"] + CACHE, capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
  assert res.returncode == 2
  assert res.stderr.splitlines() == [
      "imagen-jax: error: required gin value(s) not set: CACHE_DIR, ENCODER, VOCAB (set them in a gin file or with "
      "--gin.CACHE_DIR=VALUE; strings in quotes)"], res.stderr


def test_main_leaves_gin_unlocked_for_the_next_command(capsys, tmp_path):
  """A gin command finalizes (locks) the config; after main() returns, the next command in the same process
  may import modules that register configurables, which gin refuses while the config is locked."""
  import gin
  code = cli.main(["eval", "shapes", "--gin_file=runs/sample_demo.gin", "--gin.VOCAB='/nonexistent/spiece.model'",
                   "--gin.ENCODER='/nonexistent/t5'", "--out", str(tmp_path / "o")])
  assert code == 2 and "no run directory" in capsys.readouterr().err  # failed inside the command, once finalized
  assert not gin.config_is_locked()

  @gin.configurable
  def registered_after_a_command(x=1):                                 # raised RuntimeError before the fix
    return x
  assert registered_after_a_command() == 1
