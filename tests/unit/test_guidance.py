import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D


def _cond(b=3, l=5, d=4, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  emb = jax.random.normal(k1, (b, l, d))
  lengths = jnp.array([5, 2, 3])[:b]
  mask = jnp.arange(l)[None, :] < lengths[:, None]
  return {D.TEXT_EMB: emb, D.TEXT_MASK: mask, "lowres": jax.random.normal(k2, (b, 2, 2, 3))}


class CountingNet:
  """eps = tanh(z) * (1 + masked mean of the text); records the batch size of every call."""

  def __init__(self):
    self.calls = []

  def __call__(self, z, log_snr, cond):
    self.calls.append(z.shape[0])
    m = cond[D.TEXT_MASK].astype(jnp.float32)
    pooled = jnp.sum(cond[D.TEXT_EMB].sum(-1) * m, axis=1) / jnp.maximum(m.sum(1), 1.0)
    return jnp.tanh(z) * (1.0 + pooled)[:, None, None, None] + 0.01 * log_snr[:, None, None, None]


def _z(b=3):
  return jax.random.normal(jax.random.PRNGKey(7), (b, 2, 2, 3))


def test_null_condition_masks_text_only():
  c = _cond()
  n = D.null_condition(c)
  assert not bool(n[D.TEXT_MASK].any()) and float(jnp.abs(n[D.TEXT_EMB]).max()) == 0.0
  np.testing.assert_array_equal(n["lowres"], c["lowres"])
  assert D.null_condition(None) is None


def test_dropped_condition_takes_the_given_null_text_in_training():
  """With null_text (DeepFloyd IF's empty prompt), a dropped row's text is that embedding and mask;
  the loss feeds exactly those rows to the network at cond_drop_prob = 1."""
  c = _cond()
  null_emb = jnp.arange(5 * 4, dtype=jnp.float32).reshape(5, 4)
  null_mask = jnp.arange(5) < 1  # EOS, then padding
  dropped = D.drop_condition(c, jax.random.PRNGKey(0), 1.0, (null_emb, null_mask))
  np.testing.assert_array_equal(dropped[D.TEXT_EMB], jnp.broadcast_to(null_emb, (3, 5, 4)))
  np.testing.assert_array_equal(dropped[D.TEXT_MASK], jnp.broadcast_to(null_mask, (3, 5)))
  np.testing.assert_array_equal(dropped["lowres"], c["lowres"])
  seen = []

  def net(z, log_snr, cond):
    seen.append(cond[D.TEXT_EMB])
    return jnp.zeros_like(z)

  x = jnp.zeros((3, 2, 2, 3))
  D.diffusion_loss(
    net,
    x,
    c,
    jax.random.PRNGKey(1),
    schedule=D.CosineSchedule(),
    cond_drop_prob=1.0,
    null_text=(null_emb, null_mask),
  )
  np.testing.assert_array_equal(seen[0], jnp.broadcast_to(null_emb, (3, 5, 4)))


def test_w1_is_the_conditional_prediction_with_one_call():
  net, c, z = CountingNet(), _cond(), _z()
  log_snr = jnp.full((3,), 0.5)
  x0, eps = D.guided_x0_eps(net, z, log_snr, c, 1.0, "eps")
  assert net.calls == [3]
  np.testing.assert_allclose(eps, net(z, log_snr, c), rtol=1e-6)


def test_w0_is_the_unconditional_prediction_and_batch_is_doubled_once():
  net, c, z = CountingNet(), _cond(), _z()
  log_snr = jnp.full((3,), 0.5)
  _, eps = D.guided_x0_eps(net, z, log_snr, c, 0.0, "eps")
  assert net.calls == [6]
  np.testing.assert_allclose(eps, net(z, log_snr, D.null_condition(c)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_guided_combination_in_eps_space_for_every_objective(objective):
  net, c, z = CountingNet(), _cond(), _z()
  log_snr = jnp.array([-2.0, 0.0, 3.0])
  alpha, sigma = D.alpha_sigma_from_log_snr(log_snr)
  w = 4.0
  x0, eps = D.guided_x0_eps(net, z, log_snr, c, w, objective)
  _, eps_c = D.prediction_to_x0_eps(net(z, log_snr, c), z, alpha, sigma, objective)
  _, eps_u = D.prediction_to_x0_eps(
    net(z, log_snr, D.null_condition(c)), z, alpha, sigma, objective
  )
  np.testing.assert_allclose(eps, w * eps_c + (1 - w) * eps_u, rtol=1e-4, atol=1e-5)
  # x0 and eps stay a consistent pair for the same z.
  np.testing.assert_allclose(x0, D.x0_from_eps(z, eps, alpha, sigma), rtol=1e-4, atol=1e-4)


def test_drop_condition_rate_and_values():
  b = 4000
  c = {D.TEXT_EMB: jnp.ones((b, 3, 2)), D.TEXT_MASK: jnp.ones((b, 3), bool), "aug": jnp.arange(b)}
  out = D.drop_condition(c, jax.random.PRNGKey(0), 0.1)
  dropped = ~np.asarray(out[D.TEXT_MASK]).any(1)
  assert abs(dropped.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / b)
  emb = np.asarray(out[D.TEXT_EMB])
  assert np.all(emb[dropped] == 0) and np.all(emb[~dropped] == 1)
  assert np.all(np.asarray(out[D.TEXT_MASK])[~dropped])
  np.testing.assert_array_equal(out["aug"], c["aug"])
  assert D.drop_condition(c, jax.random.PRNGKey(0), 0.0) is c
