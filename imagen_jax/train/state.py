"""The train state, created directly sharded on the mesh.

`TrainState` holds the step, the parameters, their EMA, the optimizer state, the run's PRNG key and
the non-finite-step counters. It is built the maxdiffusion way: the abstract state from
`jax.eval_shape`, shardings from the one logical-axis table (`imagen_jax.partitioning.AXIS_RULES`;
optimizer state follows its parameter, Adafactor's factored moments get the parameter's spec with
the factored dimension dropped), then a jitted initialiser with those `out_shardings`: no device
ever holds a full copy of a sharded parameter.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import models, partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: optimizer calls so far (= batches consumed, skipped ones included)
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2]: the run key; step keys are fold_in(rng, step)
  nonfinite_streak: jax.Array  # int32: non-finite steps in a row (reset by a finite one)
  nonfinite_total: jax.Array  # int32: non-finite steps in the whole run


def init_state(model_config, tx: optax.GradientTransformation, rng) -> TrainState:
  """The initial state (unsharded function; jit it with `state_shardings` as out_shardings)."""
  model = models.build_model(model_config)
  k_params, k_run = jax.random.split(rng)
  params = nn.unbox(model.init(k_params, *models.example_inputs(model_config))["params"])
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
    step=zero,
    params=params,
    ema_params=jax.tree_util.tree_map(jnp.copy, params),
    opt_state=tx.init(params),
    rng=k_run,
    nonfinite_streak=zero,
    nonfinite_total=zero,
  )


def abstract_state(model_config, tx) -> Tuple[TrainState, Any]:
  """(abstract TrainState of ShapeDtypeStructs, the boxed abstract parameters with logical axis
  names)."""
  boxed = models.abstract_params(model_config)
  state = jax.eval_shape(lambda k: init_state(model_config, tx, k), jax.random.PRNGKey(0))
  return state, boxed


def _param_path(path) -> Optional[Tuple[str, ...]]:
  """The parameter a leaf of the optimizer state belongs to: the trailing dict keys of its tree
  path."""
  keys = []
  for entry in reversed(path):
    if isinstance(entry, jax.tree_util.DictKey):
      keys.append(str(entry.key))
    else:
      break
  return tuple(reversed(keys)) or None


def _removed_dim(field: Optional[str], leaf_shape, param_shape) -> Optional[int]:
  """Which dimension of the parameter a factored moment lacks. Adafactor
  (optax.scale_by_factored_rms) reduces over the two largest dimensions (d1, d0) =
  argsort(shape)[-2:]: v_row lacks d0, v_col lacks d1 (the field name decides when both have the
  same size); otherwise the one whose removal gives the shape."""
  if len(leaf_shape) != len(param_shape) - 1:
    return None
  order = np.argsort(param_shape)
  if field in ("v_row", "v_col") and len(param_shape) >= 2:
    i = int(order[-1] if field == "v_row" else order[-2])
    if tuple(param_shape[:i]) + tuple(param_shape[i + 1 :]) == tuple(leaf_shape):
      return i
  for i in reversed(range(len(param_shape))):
    if tuple(param_shape[:i]) + tuple(param_shape[i + 1 :]) == tuple(leaf_shape):
      return i
  return None


def _spec_for(
  leaf_shape, param_shape, param_spec: PartitionSpec, field: Optional[str] = None
) -> PartitionSpec:
  """The parameter's spec for a leaf of the same shape; for a factored moment (one dimension of
  the parameter removed, as Adafactor's v_row / v_col) the spec with that dimension dropped; else
  replicated."""
  dims = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))
  if tuple(leaf_shape) == tuple(param_shape):
    return PartitionSpec(*dims)
  i = _removed_dim(field, leaf_shape, param_shape)
  if i is not None:
    return PartitionSpec(*(dims[:i] + dims[i + 1 :]))
  return PartitionSpec()


def _field(path) -> Optional[str]:
  """The optimizer-state field a leaf sits under (e.g. 'mu', 'v_row'): the last attribute key of
  its path."""
  names = [e.name for e in path if isinstance(e, jax.tree_util.GetAttrKey)]
  return names[-1] if names else None


def state_shardings(abstract: TrainState, boxed_params, mesh: Mesh) -> TrainState:
  """NamedShardings for every leaf of the state (see the module docstring)."""
  param_shardings = partitioning.mesh_shardings(boxed_params, mesh)
  flat_params = {
    tuple(str(k.key) for k in path): (leaf.shape, s.spec)
    for (path, leaf), s in zip(
      jax.tree_util.tree_leaves_with_path(nn.unbox(boxed_params)),
      jax.tree_util.tree_leaves(param_shardings),
    )
  }
  replicated = NamedSharding(mesh, PartitionSpec())

  def opt_leaf(path, leaf):
    key = _param_path(path)
    for start in range(len(key or ())):  # the longest trailing key path naming a parameter
      if key[start:] in flat_params:
        shape, spec = flat_params[key[start:]]
        spec = partitioning.fit_spec(
          _spec_for(leaf.shape, shape, spec, _field(path)), leaf.shape, mesh
        )
        return NamedSharding(mesh, spec)
    return replicated

  opt = jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state)
  return TrainState(
    step=replicated,
    params=param_shardings,
    ema_params=param_shardings,
    opt_state=opt,
    rng=replicated,
    nonfinite_streak=replicated,
    nonfinite_total=replicated,
  )


def create_state(model_config, tx, rng, mesh: Mesh):
  """(state initialised directly sharded on `mesh`, its shardings, the boxed abstract
  parameters)."""
  abstract, boxed = abstract_state(model_config, tx)
  shardings = state_shardings(abstract, boxed, mesh)
  with partitioning.mesh_context(mesh):
    state = jax.jit(lambda k: init_state(model_config, tx, k), out_shardings=shardings)(rng)
  return state, shardings, boxed


def replicated_by_divisibility(boxed_params, mesh: Mesh) -> Tuple[int, int]:
  """(tensors, parameters) whose rule-assigned mesh axes were dropped because they do not divide the
  dimension (the parameter is then replicated along that axis)."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_params), partitioning.AXIS_RULES)
  shapes = nn.unbox(boxed_params)
  tensors = count = 0
  for spec, leaf in zip(
    jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
    jax.tree_util.tree_leaves(shapes),
  ):
    if partitioning.fit_spec(spec, leaf.shape, mesh) != PartitionSpec(
      *(tuple(spec) + (None,) * (len(leaf.shape) - len(spec)))
    ):
      tensors += 1
      count += int(np.prod(leaf.shape))
  return tensors, count


def all_finite(tree) -> jax.Array:
  """One boolean: every float leaf of the tree is finite."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
