"""One table of logical-axis rules mapping every parameter and activation onto the device mesh.

The mesh has three axes (t5x / maxdiffusion style):
  data   - pure data parallelism (parameters replicated)
  fsdp   - data parallelism with parameters (and optimizer state) sharded along it
  tensor - tensor (model) parallelism: channel / head / MLP dimensions split across devices

Modules name their parameter and activation axes logically (`embed`, `mlp`, `heads`, `conv_out`,
`activation_batch`, ...); `AXIS_RULES` is the single place that says which mesh axis each name is
split over. The U-Nets and the T5 encoder share it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). First match wins.
AXIS_RULES: Tuple[Tuple[str, object], ...] = (
  # Activations.
  ("activation_batch", ("data", "fsdp")),
  ("activation_height", None),
  ("activation_width", None),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv", None),
  ("activation_mlp", "tensor"),
  # Parameters.
  ("embed", "fsdp"),  # model width of dense layers (time / text embedding, T5 d_model)
  ("mlp", "tensor"),  # hidden width of MLPs
  ("heads", "tensor"),  # attention heads
  ("kv", None),  # per-head width
  ("joined_kv", "tensor"),  # heads x per-head width, flattened (T5 attention kernels)
  ("conv_in", "fsdp"),  # input channels of a convolution kernel
  ("conv_out", "tensor"),  # output channels of a convolution kernel (and its bias)
  ("text_embed", "fsdp"),  # width of the text encoder's output, as consumed by the U-Nets
  ("vocab", "tensor"),  # token-embedding rows
  ("norm", None),  # normalisation scales and biases
  ("relpos_buckets", None),
  ("layers", None),  # the stacking axis of scanned layers (nn.scan): never sharded
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> Tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for `num_devices`, the one axis given as -1 taking the rest.

  Args:
    mesh_shape: three sizes; at most one may be -1.
    num_devices: the devices the mesh spans.

  Returns:
    The three sizes, whose product is `num_devices`.

  Raises:
    ConfigError: the shape is not three sizes, has several -1, or does not fit the devices.
  """
  sizes = [int(s) for s in mesh_shape]
  if len(sizes) != 3:
    raise ConfigError(f"a mesh shape is (data, fsdp, tensor), got {tuple(mesh_shape)}")
  if sizes.count(-1) > 1:
    raise ConfigError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known < 1 or num_devices % known:
      raise ConfigError(
        f"{num_devices} devices do not divide into fsdp/tensor sizes with product {known}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {num_devices}"
    )
  return tuple(sizes)


def create_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

  Built with `Mesh` over a reshaped device array (Auto axis types): `jax.make_mesh` defaults to
  Explicit axes, which `nn.Conv` does not support under sharding (docs/paper.md §5).

  Args:
    data: data-parallel ways (or -1).
    fsdp: fully-sharded data-parallel ways (or -1).
    tensor: tensor-parallel ways (or -1).
    devices: the devices (default: all).

  Returns:
    The mesh.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape((data, fsdp, tensor), devices.size)
  return Mesh(devices.reshape(sizes), MESH_AXES)


def data_ways(mesh) -> int:
  """How many ways a batch splits on `mesh` (or a {axis: size} mapping): data x fsdp."""
  shape = mesh.shape if isinstance(mesh, Mesh) else mesh
  return int(shape["data"]) * int(shape["fsdp"])


def check_batch_split(global_batch: int, mesh) -> None:
  """Raises a `ConfigError` unless `global_batch` splits evenly over the mesh's data x fsdp ways.

  Args:
    global_batch: examples per step over all devices.
    mesh: a Mesh, or a {axis: size} mapping.
  """
  ways = data_ways(mesh)
  if global_batch < 1 or global_batch % ways:
    raise ConfigError(
      f"global batch {global_batch} does not split over data x fsdp = {ways} devices"
    )


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
  """The one way to run sharded code: `mesh` set and the logical-axis rules of `AXIS_RULES` in
  force."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(AXIS_RULES):
    yield


def _axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[a] for a in names]))


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops the mesh axes of dimensions they do not divide (e.g. 3 RGB channels over tensor=2)."""
  dims = tuple(spec) + (None,) * (len(shape) - len(spec))
  return PartitionSpec(
    *(ax if size % _axis_size(mesh, ax) == 0 else None for size, ax in zip(shape, dims))
  )


def mesh_shardings(boxed_tree, mesh: Mesh, rules=AXIS_RULES):
  """NamedShardings on `mesh` for every leaf of a tree whose leaves carry logical axis names.

  Leaves may be arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`). A dimension that a rule
  assigns to mesh axes it is not divisible by stays replicated.
  """
  mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
  shapes = nn.unbox(boxed_tree)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree_util.tree_map(
    lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
    mesh_specs,
    shapes,
    is_leaf=is_spec,
  )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def pad_shard_unpad(
  fn: Callable[[np.ndarray], Any],
  num_rows: int,
  batch_size: int,
  *,
  multiple: int = 1,
  on_batch: Optional[Callable[[int, int], None]] = None,
) -> Any:
  """Runs `fn` over `num_rows` rows in batches of one shape, and returns the outputs of the real
  rows.

  The one recipe for ragged work (big_vision's pad_shard_unpad): rows are cut into batches of
  min(batch_size, num_rows rounded up to `multiple`) rows, the last batch is padded by repeating its
  first row (so every call has one shape and compiles once), and the padding is dropped again.

  Args:
    fn: takes a batch's row indices (an int array of the batch length) and returns an array, or a
      tuple of arrays, whose leading axis follows the rows; it gathers, places and runs the batch.
    num_rows: how many rows in all.
    batch_size: the largest batch.
    multiple: a batch length is a multiple of this (the data-parallel device count, or `batch_size`
      itself for one fixed shape).
    on_batch: called as on_batch(batches done, batches in all) after each batch.

  Returns:
    The outputs of the `num_rows` rows concatenated as NumPy (a tuple where `fn` returns one), or
    None when there are no rows.
  """
  b = min(batch_size, -(-max(num_rows, 1) // multiple) * multiple)
  outs = []
  total = -(-num_rows // b)
  for i, start in enumerate(range(0, num_rows, b)):
    rows = np.arange(start, min(start + b, num_rows))
    valid = len(rows)
    rows = np.concatenate([rows, np.full(b - valid, rows[0])])
    outs.append(
      jax.tree_util.tree_map(lambda x, n=valid: np.asarray(jax.device_get(x))[:n], fn(rows))
    )
    if on_batch is not None:
      on_batch(i + 1, total)
  if not outs:
    return None
  return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)
