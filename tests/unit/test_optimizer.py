"""The optimizer's step sizes: Adafactor's default moves every weight by about the learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.train import optimizer


def _first_update(config, params):
  tx = optimizer.make_optimizer(config)
  grads = jax.tree_util.tree_map(
    lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize("shape", [(3, 3, 64, 128), (256,)])  # factored kernel, unfactored bias
def test_adafactor_moves_a_zero_initialised_tensor_by_the_learning_rate(shape):
  # conv_out, each ResBlock's second conv, attention output projections and biases start at zero:
  # with absolute steps (the default) the first update of each element is about lr (Adafactor
  # normalises the gradient by its RMS and clips the update's RMS at 1); with optax's parameter-
  # scaled steps it is lr x max(RMS(param), 1e-3) = 1e-3 lr, and training barely moves them.
  lr = 1e-4
  params = {"w": jnp.zeros(shape, jnp.float32)}
  cfg = optimizer.OptimizerConfig(
    name="adafactor", learning_rate=lr, warmup_steps=0, decay_steps=None, clip_grad_norm=None
  )
  assert cfg.multiply_by_parameter_scale is False
  step = np.asarray(_first_update(cfg, params)["w"])
  rms = float(np.sqrt(np.mean(step**2)))
  assert 0.5 * lr < rms <= 1.001 * lr
  scaled = optimizer.OptimizerConfig(
    name="adafactor",
    learning_rate=lr,
    warmup_steps=0,
    decay_steps=None,
    clip_grad_norm=None,
    multiply_by_parameter_scale=True,
  )
  old = np.asarray(_first_update(scaled, params)["w"])
  assert float(np.sqrt(np.mean(old**2))) < 2e-3 * lr


def test_adafactor_step_does_not_scale_with_the_weights():
  # Absolute steps: a tensor of RMS 0.03 moves by about lr too (a parameter-relative step: 0.03 lr).
  lr = 1e-4
  w = 0.03 * jax.random.normal(jax.random.PRNGKey(1), (128, 256))
  cfg = optimizer.OptimizerConfig(
    name="adafactor", learning_rate=lr, warmup_steps=0, decay_steps=None, clip_grad_norm=None
  )
  step = np.asarray(_first_update(cfg, {"w": w})["w"])
  assert 0.5 * lr < float(np.sqrt(np.mean(step**2))) <= 1.001 * lr
