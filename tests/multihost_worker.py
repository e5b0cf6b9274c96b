"""One process of a simulated multi-host training run (tests/e2e/test_train_cli.py starts several on
127.0.0.1).

python tests/multihost_worker.py MODEL_DIR NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES Trains the
micro base U-Net (tests/conftest.py MICRO_BASE) for 2 steps on in-memory word-vector shapes (global
batch 8, mesh data 2 x fsdp 2 over 4 devices in all) and exits 0.
"""

import os
import sys

model_dir, num_processes, process_id, port, local_devices = sys.argv[1], *map(int, sys.argv[2:6])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_jax.train import distributed  # noqa: E402

if num_processes > 1:
  distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)

import jax  # noqa: E402

from imagen_jax import batch_keys as K  # noqa: E402
from imagen_jax import models as M  # noqa: E402
from imagen_jax.gin_utils import parse_gin  # noqa: E402
from imagen_jax.train import data as tdata  # noqa: E402
from imagen_jax.train import loop, optimizer  # noqa: E402
from tests.helpers import MICRO_BASE  # noqa: E402

assert jax.device_count() == 4 and jax.process_count() == num_processes, (
  jax.device_count(),
  jax.process_count(),
)
parse_gin(MICRO_BASE[:1], MICRO_BASE[1:])
config = M.model_config()
arrays = tdata.word_vector_shapes(64, 16, 32, 16, one_object=True)
arrays.pop(K.CAPTION)
summary = loop.train(
  model_dir=model_dir,
  num_steps=2,
  batch_source=tdata.InMemorySource(arrays, 8),
  model_config=config,
  mesh_shape=(2, 2, 1),
  log_every=2,
  checkpoint_every=2,
  progress=False,
  optimizer=optimizer.OptimizerConfig(
    name="adam", learning_rate=1e-3, warmup_steps=0, decay_steps=None
  ),
  compilation_cache_dir=os.environ.get("IMAGEN_TEST_XLA_CACHE"),
)
print(f"process {process_id}: {summary.stopped} at step {summary.final_step}", flush=True)
