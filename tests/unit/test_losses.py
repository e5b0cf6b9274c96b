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


def _improved_ddpm_vb(x, x_t, eps, v, n, betas):
  """Improved DDPM's variational term L_n in bits per dimension (Nichol & Dhariwal 2021, their
  `_vb_terms_bpd` with learned-range variance), float64 NumPy, the exact normal CDF in the
  decoder."""
  from scipy.special import ndtr

  ac = np.cumprod(1.0 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:]))
  coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
  coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)
  out = []
  for i, t in enumerate(n):
    true_mean = coef1[t] * x[i] + coef2[t] * x_t[i]
    true_log_var = post_log_var_clipped[t]
    frac = (v[i] + 1.0) / 2.0
    log_var = frac * np.log(betas[t]) + (1.0 - frac) * post_log_var_clipped[t]
    x0 = np.sqrt(1.0 / ac[t]) * x_t[i] - np.sqrt(1.0 / ac[t] - 1.0) * eps[i]
    mean = coef1[t] * x0 + coef2[t] * x_t[i]
    if t == 0:
      inv = np.exp(-0.5 * log_var)
      plus, minus = ndtr(inv * (x[i] - mean + 1 / 255)), ndtr(inv * (x[i] - mean - 1 / 255))
      logp = np.where(
        x[i] < -0.999,
        np.log(np.maximum(plus, 1e-12)),
        np.where(
          x[i] > 0.999,
          np.log(np.maximum(1 - minus, 1e-12)),
          np.log(np.maximum(plus - minus, 1e-12)),
        ),
      )
      out.append(np.mean(-logp) / np.log(2.0))
    else:
      kl = 0.5 * (
        -1.0
        + log_var
        - true_log_var
        + np.exp(true_log_var - log_var)
        + (true_mean - mean) ** 2 * np.exp(-log_var)
      )
      out.append(np.mean(kl) / np.log(2.0))
  return np.array(out)


def test_vlb_term_is_improved_ddpm_variational_bound():
  """The learned-variance term of the hybrid loss against improved DDPM's formulas (diffusers'
  squaredcos_cap_v2 betas, an independent float64 computation), at the first step (the decoder's
  discretized likelihood), early, middle and last steps."""
  import diffusers

  from imagen_jax.diffusion.losses import vlb_term
  from imagen_jax.diffusion.schedules import DiscreteCosineSchedule

  betas = (
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas.numpy().astype(np.float64)
  )
  n = np.array([0, 1, 2, 10, 500, 998, 999, 0])
  rng = np.random.default_rng(0)
  shape = (len(n), 4, 4, 3)
  x = np.clip(np.round(rng.uniform(-1.2, 1.2, shape) * 127.5) / 127.5, -1, 1)
  ac = np.cumprod(1.0 - betas)[n].reshape(-1, 1, 1, 1)
  noise = rng.standard_normal(shape)
  x_t = np.sqrt(ac) * x + np.sqrt(1 - ac) * noise
  eps = noise + 0.3 * rng.standard_normal(shape)  # an imperfect prediction
  v = np.tanh(rng.standard_normal(shape))
  ref = _improved_ddpm_vb(x, x_t, eps, v, n, betas)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  t = f32((n + 1) / 1000.0)
  ours = np.asarray(vlb_term(f32(x), f32(x_t), f32(eps), f32(v), t, DiscreteCosineSchedule(), 1000))
  np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-5)
  assert np.all(ours >= 0)  # KL divergences and a negative log-likelihood of a bin
