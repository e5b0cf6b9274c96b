"""Scanned layers (nn.scan over each U-Net level's repeated blocks): the same function as the
unscanned network, the same gradients (with dropout and remat too), a lossless conversion between
the two parameter layouts, the stacking axis left unsharded, and a smaller program for the
compiler."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from imagen_jax import models as M
from imagen_jax import partitioning
from tests.helpers import inputs, load_config, randomized_params

CASES = {
  # Three blocks per level: blocks 1-2 of each level are scanned, down (with attention on level 1)
  # and up.
  "base": ("models/tiny_base.gin", "UNetConfig.num_res_blocks = 3"),
  # The Efficient U-Net scans every block of a level; level 1 has two and attention after them.
  "sr": ("models/tiny_sr.gin",),
}


# The base case is `slow` (110 s of the suite's budget on a loaded 2-core VM, 2026-12-07): the SR
# case runs the same scan code (scanned blocks, the layout conversion) in every `make test`.
@pytest.fixture(scope="module", params=[pytest.param("base", marks=pytest.mark.slow), "sr"])
def pair(request):
  config = load_config(*CASES[request.param])
  scanned = dataclasses.replace(config, scan_layers=True)
  params = randomized_params(config)
  return config, scanned, params


def _shapes(tree):
  return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)


def test_layout_conversion_is_lossless_and_matches_the_scanned_model(pair):
  config, scanned, params = pair
  converted = M.convert_layout(params, config, scanned=True)
  # The converted tree is exactly the tree the scanned network initialises.
  assert _shapes(converted) == _shapes(nn.unbox(M.abstract_params(scanned)))
  assert any(k.endswith("_layers") for k in converted) and len(converted) < len(params)
  back = M.convert_layout(converted, scanned, scanned=False)
  assert _shapes(back) == _shapes(params)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Converting to the layout a tree is already in changes nothing.
  assert _shapes(M.convert_layout(converted, scanned, scanned=True)) == _shapes(converted)


def _loss_and_grads(config, params, key, deterministic=True):
  model = M.build_model(config)
  diffusion = D.DiffusionConfig(cond_drop_prob=0.3)
  z, _, cond = inputs(config, batch=4)
  x = jnp.tanh(z)

  def loss_fn(p):
    fn = lambda zz, l, c: model.apply(
      {"params": p}, zz, l, c, deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(7)}
    )
    return diffusion.loss(fn, x, cond, key)[0]

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_scanned_loss_and_gradients_equal_the_unscanned(pair):
  """Base U-Net without remat, Efficient U-Net with remat inside the scan (one compile pair each:
  CPU time)."""
  config, scanned, params = pair
  remat = "none" if isinstance(config, M.UNetConfig) else "full"
  config = dataclasses.replace(config, remat=remat)
  scanned = dataclasses.replace(scanned, remat=remat)
  key = jax.random.PRNGKey(3)
  loss, grads = _loss_and_grads(config, params, key)
  loss_s, grads_s = _loss_and_grads(scanned, M.convert_layout(params, config, scanned=True), key)
  np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-5)
  grads_back = M.convert_layout(grads_s, scanned, scanned=False)
  assert _shapes(grads_back) == _shapes(grads)
  flat, flat_s = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_back)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads))
  for (path, g), gs in zip(flat, flat_s):
    np.testing.assert_allclose(
      np.asarray(gs),
      np.asarray(g),
      rtol=1e-4,
      atol=1e-5 * scale,
      err_msg=jax.tree_util.keystr(path),
    )


def test_scanned_blocks_draw_their_own_dropout_keys():
  """With dropout on, each repetition of the scan must draw a different mask (split_rngs): two
  stacked blocks with identical parameters and identical inputs would otherwise drop the same
  units."""
  config = dataclasses.replace(load_config(*CASES["sr"]), dropout=0.5, scan_layers=True)
  params = M.convert_layout(
    randomized_params(dataclasses.replace(config, scan_layers=False)), config, scanned=True
  )
  model = M.build_model(config)
  z, log_snr, cond = inputs(config)
  run = lambda k: model.apply(
    {"params": params}, z, log_snr, cond, deterministic=False, rngs={"dropout": k}
  )
  a, b = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  assert float(jnp.abs(a - b).max()) > 1e-3  # dropout is live inside the scan
  np.testing.assert_array_equal(np.asarray(run(jax.random.PRNGKey(0))), np.asarray(a))  # and keyed


def test_stacking_axis_is_never_sharded():
  config = dataclasses.replace(load_config(*CASES["sr"]), scan_layers=True)
  mesh = partitioning.create_mesh(2, 2, 2)
  boxed = M.abstract_params(config)
  shardings = partitioning.mesh_shardings(boxed, mesh)
  specs = nn.get_partition_spec(boxed)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  seen = 0
  for spec, leaf, sharding in zip(
    jax.tree_util.tree_leaves(specs, is_leaf=is_spec),
    jax.tree_util.tree_leaves(nn.unbox(boxed)),
    jax.tree_util.tree_leaves(shardings),
  ):
    if spec and spec[0] == "layers":
      seen += 1
      assert sharding.spec[0] is None, sharding.spec
      # The other dimensions keep the rules of the unstacked parameter.
      unstacked = partitioning.fit_spec(
        nn.logical_to_mesh_axes(tuple(spec[1:]), partitioning.AXIS_RULES), leaf.shape[1:], mesh
      )
      assert tuple(sharding.spec[1:]) == tuple(unstacked) + (None,) * (
        len(sharding.spec) - 1 - len(unstacked)
      )
  assert seen > 0


def test_scanning_shrinks_the_program():
  """The point of scanning: the lowered gradient program stops growing with depth (a 3x deeper
  level adds nearly nothing), while the unscanned one grows with every block."""
  base = load_config("models/tiny_sr.gin")
  sizes = {}
  for blocks in ((2, 2), (6, 6)):
    for scan in (False, True):
      cfg = dataclasses.replace(base, num_res_blocks=blocks, scan_layers=scan)
      model = M.build_model(cfg)
      z, log_snr, cond = M.example_inputs(cfg, 2)
      fn = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, z, log_snr, cond)))
      sizes[blocks, scan] = len(jax.jit(fn).lower(nn.unbox(M.abstract_params(cfg))).as_text())
  assert sizes[(6, 6), False] > 1.5 * sizes[(2, 2), False], sizes
  assert sizes[(6, 6), True] < 1.05 * sizes[(2, 2), True], sizes
  assert sizes[(6, 6), True] < 0.6 * sizes[(6, 6), False], sizes
