import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D


def _numpy_dynamic(x0, p):
  x0 = np.asarray(x0, np.float64)
  out = np.empty_like(x0)
  for i in range(x0.shape[0]):
    s = max(np.percentile(np.abs(x0[i]).ravel(), p), 1.0)
    out[i] = np.clip(x0[i], -s, s) / s
  return out


def test_in_range_unchanged():
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(D.dynamic_threshold(x0), x0)
  np.testing.assert_array_equal(D.static_threshold(x0), x0)


@pytest.mark.parametrize("p", [99.5, 90.0, 50.0])
def test_dynamic_matches_numpy_reference_and_is_in_range(p):
  x0 = 2.5 * jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 3))
  out = D.dynamic_threshold(x0, p)
  assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6
  np.testing.assert_allclose(out, _numpy_dynamic(x0, p), rtol=1e-5, atol=1e-6)
  # Per example: scaling one example must not change another's output.
  x1 = x0.at[0].multiply(10.0)
  np.testing.assert_allclose(D.dynamic_threshold(x1, p)[1:], out[1:], rtol=1e-6)


def test_dynamic_equals_static_when_percentile_at_most_one():
  key = jax.random.PRNGKey(2)
  # 99.5% of the values inside [-0.9, 0.9], a few outliers beyond 1: the percentile is below 1.
  x0 = jax.random.uniform(key, (3, 20, 20, 1), minval=-0.9, maxval=0.9)
  x0 = x0.at[:, 0, 0, 0].set(3.0)
  s = np.percentile(np.abs(np.asarray(x0)).reshape(3, -1), 99.5, axis=1)
  assert np.all(s <= 1.0)
  np.testing.assert_array_equal(D.dynamic_threshold(x0), D.static_threshold(x0))
  assert float(D.static_threshold(x0).max()) == 1.0


def test_threshold_dispatch():
  x0 = jnp.array([[3.0, -2.0, 0.5]])
  np.testing.assert_array_equal(D.threshold(x0, "none"), x0)
  np.testing.assert_array_equal(D.threshold(x0, "static"), [[1.0, -1.0, 0.5]])
  with pytest.raises(ValueError, match="unknown thresholding"):
    D.threshold(x0, "soft")
