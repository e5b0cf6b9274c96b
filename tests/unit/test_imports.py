"""Modules that train or sample import without TensorFlow (lent GPU machines have none)."""

import importlib
import pkgutil
import subprocess
import sys

import imagen_jax

TF_FREE_CHECK = r"""
import importlib, pkgutil, sys

BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio")

class BlockTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked in this test")
    return None

sys.meta_path.insert(0, BlockTensorFlow())
try:
  import tensorflow  # noqa: F401
except ImportError:
  pass
else:
  raise SystemExit("the import block does not work")

import imagen_jax
names = [m.name for m in pkgutil.walk_packages(imagen_jax.__path__, "imagen_jax.")
         if not m.name.startswith("imagen_jax.data") and not m.name.endswith(".__main__")]
for name in names:
  importlib.import_module(name)
assert "imagen_jax.diffusion.samplers" in names, names
leaked = sorted(k for k in sys.modules if k.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("imported", len(names), "modules")
"""


def test_training_and_sampling_modules_import_without_tensorflow():
  res = subprocess.run(
    [sys.executable, "-c", TF_FREE_CHECK], capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, res.stdout + res.stderr
  assert "imported" in res.stdout


def test_every_module_imports():
  for m in pkgutil.walk_packages(imagen_jax.__path__, "imagen_jax."):
    if not m.name.endswith(".__main__"):  # a script: importing it runs the command line
      importlib.import_module(m.name)
