import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D


def _random_state(seed, b=6):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x0 = jax.random.uniform(k1, (b, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, (b, 4, 4, 3))
  log_snr = jax.random.uniform(k3, (b,), minval=-6.0, maxval=6.0)
  alpha, sigma = D.alpha_sigma_from_log_snr(log_snr)
  return x0, eps, alpha, sigma, D.diffuse(x0, eps, alpha, sigma)


def test_diffuse_is_alpha_x_plus_sigma_eps():
  x0, eps, alpha, sigma, z = _random_state(0)
  a, s = np.asarray(alpha)[:, None, None, None], np.asarray(sigma)[:, None, None, None]
  ref = a * np.asarray(x0) + s * np.asarray(eps)
  np.testing.assert_allclose(np.asarray(z), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conversions_invert_each_other(seed):
  x0, eps, alpha, sigma, z = _random_state(seed)
  v = D.v_from_x0_eps(x0, eps, alpha, sigma)
  tol = dict(rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(D.x0_from_eps(z, eps, alpha, sigma), x0, **tol)
  np.testing.assert_allclose(D.eps_from_x0(z, x0, alpha, sigma), eps, **tol)
  np.testing.assert_allclose(D.x0_from_v(z, v, alpha, sigma), x0, **tol)
  np.testing.assert_allclose(D.eps_from_v(z, v, alpha, sigma), eps, **tol)
  np.testing.assert_allclose(D.v_from_eps(z, eps, alpha, sigma), v, **tol)
  np.testing.assert_allclose(D.v_from_x0(z, x0, alpha, sigma), v, **tol)
  # Every objective's prediction maps back to the same (x0, eps).
  preds = {"eps": eps, "x0": x0, "v": v}
  for objective, pred in preds.items():
    x0_hat, eps_hat = D.prediction_to_x0_eps(pred, z, alpha, sigma, objective)
    np.testing.assert_allclose(x0_hat, x0, **tol)
    np.testing.assert_allclose(eps_hat, eps, **tol)
    np.testing.assert_allclose(
      D.target_for_objective(x0, eps, alpha, sigma, objective), pred, **tol
    )


def test_round_trips_through_every_pair():
  x0, eps, alpha, sigma, z = _random_state(3)
  preds = {"eps": eps, "x0": x0, "v": D.v_from_x0_eps(x0, eps, alpha, sigma)}
  for a, b in itertools.permutations(preds, 2):
    x0_a, eps_a = D.prediction_to_x0_eps(preds[a], z, alpha, sigma, a)
    back = D.target_for_objective(x0_a, eps_a, alpha, sigma, b)
    np.testing.assert_allclose(back, preds[b], rtol=1e-4, atol=2e-5)


def test_unknown_objective():
  with pytest.raises(ValueError, match="unknown objective"):
    D.target_for_objective(jnp.zeros((1,)), jnp.zeros((1,)), 1.0, 0.0, "score")
