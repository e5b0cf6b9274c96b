import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import diffusion as D
from tests.helpers import GaussianOracle

ORACLE = GaussianOracle(mean=[0.2, -0.4, 0.7], std=[0.4, 0.25, 0.3])


def _loss(model_fn, objective="eps", n=32768, seed=0, **kw):
  x = ORACLE.sample_data(jax.random.PRNGKey(100 + seed), n)
  return D.diffusion_loss(
    model_fn,
    x,
    None,
    jax.random.PRNGKey(seed),
    schedule=D.CosineSchedule(),
    objective=objective,
    **kw,
  )


def test_optimal_denoiser_loss_matches_closed_form():
  loss, aux = jax.jit(lambda: _loss(ORACLE.model_fn("eps")))()
  expected = ORACLE.expected_min_eps_loss(D.CosineSchedule().log_snr)
  se = float(np.std(aux["loss"]) / np.sqrt(aux["loss"].size))
  assert abs(float(loss) - expected) < 4 * se, (float(loss), expected, se)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("perturb", [lambda p: 1.05 * p, lambda p: p + 0.03, lambda p: 0.9 * p])
def test_optimal_denoiser_beats_perturbed_ones(objective, perturb):
  best, _ = _loss(ORACLE.model_fn(objective), objective, n=8192)
  worse, _ = _loss(ORACLE.model_fn(objective, perturb), objective, n=8192)
  assert float(best) < float(worse)


def test_low_discrepancy_times_are_stratified():
  t = np.sort(np.asarray(D.sample_times(jax.random.PRNGKey(0), 64, low_discrepancy=True)))
  np.testing.assert_allclose(np.diff(t), 1 / 64, atol=1e-6)
  assert 0 <= t.min() < 1 / 64 and t.max() < 1
  loss, aux = _loss(ORACLE.model_fn(), n=64, low_discrepancy=True)
  assert np.all(np.isfinite(np.asarray(aux["loss"])))


def test_min_snr_weights_agree_across_objectives():
  # The x0-space weight min(SNR, gamma) is the same loss, expressed for each objective:
  # w_eps * |eps_err|^2 = w_x0 * |x0_err|^2 = w_v * |v_err|^2 for a prediction error at fixed z.
  log_snr = jnp.linspace(-8, 8, 33)
  gamma = 5.0
  snr = np.exp(np.asarray(log_snr, np.float64))
  w = {
    o: np.asarray(D.loss_weight(log_snr, o, "min_snr", gamma), np.float64)
    for o in ("eps", "x0", "v")
  }
  np.testing.assert_allclose(w["x0"], np.minimum(snr, gamma), rtol=1e-5)
  # |x0 error|^2 = |eps error|^2 / SNR and |v error|^2 = |eps error|^2 (1 + SNR) / SNR.
  np.testing.assert_allclose(w["x0"] / snr, w["eps"], rtol=1e-5)
  np.testing.assert_allclose(w["v"] * (1 + snr) / snr, w["eps"], rtol=1e-5)
  assert np.all(np.asarray(D.loss_weight(log_snr, "eps")) == 1.0)
  with pytest.raises(ValueError, match="unknown loss weighting"):
    D.loss_weight(log_snr, "eps", "p2")


def test_min_snr_loss_equals_reweighted_uniform_loss():
  fn = ORACLE.model_fn("eps", lambda p: 0.8 * p)
  _, uni = _loss(fn, n=512)
  _, msnr = _loss(fn, n=512, weighting="min_snr", min_snr_gamma=5.0)
  expect = np.asarray(uni["loss"]) * np.minimum(1.0, 5.0 * np.exp(-np.asarray(uni["log_snr"])))
  np.testing.assert_allclose(msnr["loss"], expect, rtol=1e-5)


def test_condition_dropout_reaches_the_network():
  seen = {}

  def fn(z, log_snr, cond):
    seen["mask"] = cond[D.TEXT_MASK]
    return jnp.zeros_like(z)

  b = 2000
  cond = {D.TEXT_EMB: jnp.ones((b, 4, 2)), D.TEXT_MASK: jnp.ones((b, 4), bool)}
  x = jnp.zeros((b, 2, 2, 3))
  D.diffusion_loss(
    fn, x, cond, jax.random.PRNGKey(0), schedule=D.CosineSchedule(), cond_drop_prob=0.25
  )
  frac = 1 - np.asarray(seen["mask"]).any(1).mean()
  assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / b)
  D.diffusion_loss(
    fn, x, cond, jax.random.PRNGKey(0), schedule=D.CosineSchedule(), cond_drop_prob=0.0
  )
  assert bool(np.asarray(seen["mask"]).all())
