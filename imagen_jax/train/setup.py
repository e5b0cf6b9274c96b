"""The one train-step builder: a run's spec -> optimizer, abstract state, shardings, batch shapes,
step.

The trainer, the TPU compile check, the benchmark and the tests all build the step here, so what is
checked and measured is what trains (maxtext's setup_train_loop +
get_functional_train_with_signature).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import gin
import jax
import jax.numpy as jnp

from imagen_jax import batch_keys as K
from imagen_jax import models, partitioning
from imagen_jax.diffusion import DiffusionConfig
from imagen_jax.errors import ConfigError
from imagen_jax.train import optimizer as optim
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What a training run trains: the network, the diffusion and optimizer settings, batch and
  mesh."""

  model_config: Any
  diffusion: DiffusionConfig
  optimizer: optim.OptimizerConfig
  global_batch: int
  mesh_shape: Tuple[int, int, int] = (-1, 1, 1)
  ema_decay: float = 0.9999
  ema_warmup: bool = True

  def __post_init__(self):
    if getattr(self.model_config, "lowres_skip", False) and self.diffusion.objective != "x0":
      raise ConfigError(
        "lowres_skip adds the low-res image to the network's output, which only an x0 prediction "
        f"can use; the objective is {self.diffusion.objective!r} (set DiffusionConfig.objective = "
        "'x0')"
      )


def run_spec_from_gin() -> RunSpec:
  """The run a parsed gin config describes, without calling `train` (its run directory and data
  unset).

  Returns:
    The spec, with BATCH_SIZE and MESH from their macros (2048 and (-1, 1, 1) where unbound).

  Raises:
    ConfigError: the config defines no network.
  """

  def macro(name, default):
    try:
      return gin.query_parameter(f"%{name}")
    except (ValueError, KeyError):
      return default

  try:
    model_config = models.model_config()
  except Exception as e:  # gin's own errors for an unbound configurable come in several types
    raise ConfigError(
      f"the gin config defines no network ({str(e).splitlines()[0]}); pass a run or model gin file"
    ) from None
  return RunSpec(
    model_config=model_config,
    diffusion=DiffusionConfig(),
    optimizer=optim.OptimizerConfig(),
    global_batch=int(macro("BATCH_SIZE", 2048)),
    mesh_shape=tuple(macro("MESH", (-1, 1, 1))),
  )


def batch_shapes(model_config, global_batch: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """The device fields of a global batch of cached embeddings, as the data pipeline feeds them
  (float32).

  Args:
    model_config: the stage network's config.
    global_batch: examples per step.

  Returns:
    {field: ShapeDtypeStruct}.
  """
  size, length = model_config.image_size, model_config.max_text_length
  shapes = {
    K.IMAGE: jax.ShapeDtypeStruct(
      (global_batch, size, size, model_config.in_channels), jnp.float32
    ),
    K.TEXT_EMB: jax.ShapeDtypeStruct(
      (global_batch, length, model_config.text_embed_dim), jnp.float32
    ),
    K.TEXT_MASK: jax.ShapeDtypeStruct((global_batch, length), jnp.bool_),
  }
  if models.is_super_resolution(model_config):
    low = model_config.lowres_size
    shapes[K.LOWRES] = jax.ShapeDtypeStruct(
      (global_batch, low, low, model_config.in_channels), jnp.float32
    )
  return shapes


class TrainSetup:
  """A run's optimizer, abstract state and state shardings on a mesh, and its step signature.

  Attributes:
    spec: the run.
    mesh: the device mesh.
    tx: the optax transformation.
    abstract: the TrainState of ShapeDtypeStructs.
    boxed: the abstract parameters with their logical axis names.
    shardings: the TrainState of NamedShardings.
  """

  def __init__(self, spec: RunSpec, mesh: jax.sharding.Mesh):
    partitioning.check_batch_split(spec.global_batch, mesh)
    self.spec = spec
    self.mesh = mesh
    self.tx = optim.make_optimizer(spec.optimizer)
    self.abstract, self.boxed = state_lib.abstract_state(spec.model_config, self.tx)
    self.shardings = state_lib.state_shardings(self.abstract, self.boxed, mesh)

  def create_state(self, seed: int = 0) -> state_lib.TrainState:
    """The initial state, created directly sharded on the mesh."""
    state, _, _ = state_lib.create_state(
      self.spec.model_config, self.tx, jax.random.PRNGKey(seed), self.mesh
    )
    return state

  def signature(
    self,
    shapes: Optional[Dict[str, Any]] = None,
    *,
    encoder_config=None,
    encoder_shardings=None,
    trace_counter=None,
    null_text=None,
  ) -> step_lib.StepSignature:
    """The step with its shardings and donation.

    Args:
      shapes: the batch's device fields (default `batch_shapes` of the spec).
      encoder_config: the T5 config when the step embeds tokens itself (on-the-fly text).
      encoder_shardings: the encoder parameters' shardings, with `encoder_config`.
      trace_counter: called each time the step is traced.
      null_text: the empty prompt's (emb, mask) for null_text='empty_prompt' stages.

    Returns:
      The `StepSignature`.
    """
    spec = self.spec
    shapes = batch_shapes(spec.model_config, spec.global_batch) if shapes is None else shapes
    return step_lib.step_signature(
      model_config=spec.model_config,
      diffusion=spec.diffusion,
      tx=self.tx,
      state_shardings=self.shardings,
      batch_shapes=shapes,
      mesh=self.mesh,
      ema_decay=spec.ema_decay,
      ema_warmup=spec.ema_warmup,
      encoder_config=encoder_config,
      encoder_shardings=encoder_shardings,
      trace_counter=trace_counter,
      null_text=null_text,
    )

  def lower(
    self,
    shapes: Optional[Dict[str, Any]] = None,
    *,
    state=None,
    encoder_params=None,
    **signature_kwargs,
  ) -> Tuple[Any, step_lib.StepSignature]:
    """The step lowered on abstract sharded inputs (no array allocated unless `state` is given).

    Args:
      shapes: the batch's device fields (default `batch_shapes` of the spec).
      state: a real state to lower with (default: the abstract one).
      encoder_params: the encoder parameters (on-the-fly text), or None.
      **signature_kwargs: passed to `signature`.

    Returns:
      (the lowered step, its signature).
    """
    shapes = (
      batch_shapes(self.spec.model_config, self.spec.global_batch) if shapes is None else shapes
    )
    sig = self.signature(shapes, **signature_kwargs)
    if state is None:
      state = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self.abstract,
        self.shardings,
      )
    batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sig.in_shardings[1][k])
      for k, v in shapes.items()
    }
    with partitioning.mesh_context(self.mesh):
      return sig.jit().lower(state, batch, encoder_params), sig
