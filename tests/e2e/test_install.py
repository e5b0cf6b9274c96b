"""A normal (non-editable) install: build the wheel, install it into a fresh venv, run the CLI from
it.

The new venv gets the package from the wheel only; its dependencies come from the test venv's
site-packages through a .pth line (paths added that way do not run that venv's own .pth files, so
the editable install of the source tree stays out of sight). Runs outside the repository, so nothing
can be found there by accident.
"""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests import helpers

ROOT = helpers.ROOT


def _run(cmd, **kw):
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
  return res


def test_wheel_ships_the_gin_configs_and_its_cli_finds_them(tmp_path):
  # 1. The wheel, built from a copy of the tree (no build/ left in the repository).
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "setup.cfg", "README.md"):
    (src / name).write_bytes((ROOT / name).read_bytes())
  for folder in ("imagen_jax", "gin_configs", "docs"):
    for f in (ROOT / folder).rglob("*"):
      if f.is_file() and "__pycache__" not in f.parts:
        (src / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        (src / f.relative_to(ROOT)).write_bytes(f.read_bytes())
  dist = tmp_path / "dist"
  res = _run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "-q",
      "--no-deps",
      "--no-build-isolation",
      "-w",
      str(dist),
      str(src),
    ]
  )
  assert res.returncode == 0, res.stderr
  (wheel,) = dist.glob("imagen_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  # Every gin file, every module and every doc page of the tree is in the wheel.
  want = {
    f"imagen_jax/gin_configs/{p.relative_to(ROOT / 'gin_configs').as_posix()}"
    for p in (ROOT / "gin_configs").rglob("*.gin")
  }
  want |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "imagen_jax").rglob("*.py")}
  want |= {f"imagen_jax/docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}  # what the code cites
  assert not want - names, sorted(want - names)

  # 2. A fresh venv with the wheel installed (no dependencies downloaded: they come through a .pth
  # line).
  venv = tmp_path / "venv"
  res = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  assert res.returncode == 0, res.stderr
  py = venv / "bin" / "python"
  res = _run(
    [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)]
  )
  assert res.returncode == 0, res.stderr
  site = Path(
    _run(
      [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
  )
  (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
  where = _run(
    [str(py), "-c", "import imagen_jax; print(imagen_jax.__file__)"], cwd=tmp_path, env=env
  )
  assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr

  # 3. The installed command finds runs/cache_synthetic.gin (and the files it includes) and stops at
  # the
  # values the user must set.
  res = _run(
    [str(venv / "bin" / "imagen-jax"), "cache-embeddings", "--gin_file=runs/cache_synthetic.gin"],
    cwd=tmp_path,
    env=env,
  )
  assert res.returncode == 2
  want = "imagen-jax: error: required gin value(s) not set: CACHE_DIR, ENCODER, VOCAB"
  assert res.stderr.startswith(want), res.stderr
