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

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
    ("embed", "fsdp"),            # model width of dense layers (time / text embedding, T5 d_model)
    ("mlp", "tensor"),            # hidden width of MLPs
    ("heads", "tensor"),          # attention heads
    ("kv", None),                 # per-head width
    ("joined_kv", "tensor"),      # heads x per-head width, flattened (T5 attention kernels)
    ("conv_in", "fsdp"),          # input channels of a convolution kernel
    ("conv_out", "tensor"),       # output channels of a convolution kernel (and its bias)
    ("text_embed", "fsdp"),       # width of the text encoder's output, as consumed by the U-Nets
    ("vocab", "tensor"),          # token-embedding rows
    ("norm", None),               # normalisation scales and biases
    ("relpos_buckets", None),
    ("layers", None),             # the stacking axis of scanned layers (nn.scan): never sharded
)


def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

  Built with `Mesh` over a reshaped device array (Auto axis types): `jax.make_mesh` defaults to
  Explicit axes, which `nn.Conv` does not support under sharding (docs/paper.md §5).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  n = devices.size
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"{n} devices do not divide into fsdp/tensor sizes with product {known}")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {n}")
  return Mesh(devices.reshape(sizes), MESH_AXES)


def _axis_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[a] for a in names]))


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops the mesh axes of dimensions they do not divide (e.g. 3 RGB channels over tensor=2)."""
  dims = tuple(spec) + (None,) * (len(shape) - len(spec))
  return PartitionSpec(*(ax if size % _axis_size(mesh, ax) == 0 else None for size, ax in zip(shape, dims)))


def mesh_shardings(boxed_tree, mesh: Mesh, rules=AXIS_RULES):
  """NamedShardings on `mesh` for every leaf of a tree whose leaves carry logical axis names.

  Leaves may be arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`). A dimension that a rule
  assigns to mesh axes it is not divisible by stays replicated.
  """
  mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
  shapes = nn.unbox(boxed_tree)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree_util.tree_map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
                                mesh_specs, shapes, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
