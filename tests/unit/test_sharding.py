"""A forward pass sharded over a simulated 2x2x2 (data, fsdp, tensor) mesh equals the unsharded
one."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from imagen_jax import models as M
from imagen_jax import partitioning
from tests.helpers import inputs, load_config, randomized_params


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@pytest.mark.parametrize("gin_file", ["models/tiny_base.gin", "models/tiny_sr.gin"])
def test_sharded_forward_matches_unsharded_and_params_follow_the_rules(gin_file):
  assert jax.device_count() == 8, "tests/conftest.py sets --xla_force_host_platform_device_count=8"
  config = load_config(gin_file)
  model = M.build_model(config)
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  boxed = M.abstract_params(config)
  shardings = partitioning.mesh_shardings(boxed, mesh)
  host_params = randomized_params(config)
  z, log_snr, cond = inputs(config, batch=4)

  ref = jax.jit(lambda p: model.apply({"params": p}, z, log_snr, cond))(host_params)

  params = jax.device_put(host_params, shardings)
  batch = lambda x: partitioning.batch_sharding(mesh, x.ndim)
  data_shardings = jax.tree_util.tree_map(batch, (z, log_snr, cond))
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.AXIS_RULES):
    fwd = jax.jit(
      lambda p, z, l, c: model.apply({"params": p}, z, l, c),
      in_shardings=(shardings,) + data_shardings,
      out_shardings=batch(z),
    )
    out = fwd(params, z, log_snr, cond)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
  assert out.sharding.spec == P(("data", "fsdp"), None, None, None)

  # Parameters really are sharded as the rules say.
  conv = _get(params, "conv_in/Conv_0/kernel")
  # Input channels: 3 (base) do not split over fsdp=2 and stay replicated; 6 (z + low-res image) do.
  expected_in = "fsdp" if conv.shape[2] % 2 == 0 else None
  assert conv.shape[2] in (3, 6) and conv.sharding.spec == P(None, None, expected_in, "tensor")
  res_conv = _get(params, "up_1_res_0/Conv_0/Conv_0/kernel")
  assert res_conv.sharding.spec == P(None, None, "fsdp", "tensor")
  kh, kw, cin, cout = res_conv.shape
  assert res_conv.addressable_shards[0].data.shape == (kh, kw, cin // 2, cout // 2)
  mlp = _get(params, "conditioning/time_embed/Dense_0/Dense_0/kernel")
  assert mlp.sharding.spec == P("fsdp", "tensor")
  norm = _get(params, "norm_out/GroupNorm_0/scale")
  assert norm.sharding.is_fully_replicated
  attn_name = (
    "mid_attn" if isinstance(config, M.UNetConfig) else f"down_{len(config.channels) - 1}_attn"
  )
  query = _get(params, f"{attn_name}/query/kernel")
  assert query.sharding.spec == P("fsdp", "tensor", None)  # (embed, heads, kv)
  assert query.addressable_shards[0].data.shape == (
    query.shape[0] // 2,
    query.shape[1] // 2,
    query.shape[2],
  )


def test_mesh_construction_errors():
  with pytest.raises(ValueError, match="needs 16 devices"):
    partitioning.create_mesh(data=2, fsdp=4, tensor=2)
  mesh = partitioning.create_mesh(data=-1, fsdp=1, tensor=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize("which", ["models/tiny_base.gin", "models/tiny_sr.gin", "t5"])
def test_every_parameter_carries_logical_axis_names(which):
  if which == "t5":
    from imagen_jax.text import t5

    boxed = t5.abstract_encoder_params(t5.t5_config("tiny"))
  else:
    boxed = M.abstract_params(load_config(which))
  leaves = jax.tree_util.tree_leaves(
    boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  unnamed = [x for x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
  assert leaves and not unnamed
  rule_names = {name for name, _ in partitioning.AXIS_RULES}
  for x in leaves:
    assert len(x.names) == len(x.value.shape)
    assert all(n is None or n in rule_names for n in x.names), x.names
