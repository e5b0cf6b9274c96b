"""Data drawn from a known diagonal Gaussian N(m, s^2): its exact optimal denoiser in closed form.

For x ~ N(m, s^2) and z = alpha x + sigma eps, the posterior of x given z is Gaussian with
  E[x | z]   = m + alpha s^2 (z - alpha m) / (alpha^2 s^2 + sigma^2)
  E[eps | z] = sigma (z - alpha m) / (alpha^2 s^2 + sigma^2)
  Var[eps | z] = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)
so the minimum expected eps-MSE at a given log-SNR is Var[eps | z], averaged over dimensions.
"""

import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion import alpha_sigma_from_log_snr


class GaussianOracle:

  def __init__(self, mean, std):
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)

  def x0_eps(self, z, log_snr):
    a, sg = alpha_sigma_from_log_snr(log_snr)
    a = a.reshape((-1,) + (1,) * (z.ndim - 1))
    sg = sg.reshape((-1,) + (1,) * (z.ndim - 1))
    m, s = jnp.asarray(self.mean), jnp.asarray(self.std)
    den = a * a * s * s + sg * sg
    return m + a * s * s * (z - a * m) / den, sg * (z - a * m) / den

  def model_fn(self, objective="eps", perturb=None):
    """The optimal network for an objective; `perturb(pred) -> pred` makes a worse one."""
    def fn(z, log_snr, cond):
      del cond
      x0, eps = self.x0_eps(z, log_snr)
      a, sg = alpha_sigma_from_log_snr(log_snr)
      a = a.reshape((-1,) + (1,) * (z.ndim - 1))
      sg = sg.reshape((-1,) + (1,) * (z.ndim - 1))
      pred = {"eps": eps, "x0": x0, "v": a * eps - sg * x0}[objective]
      return pred if perturb is None else perturb(pred)
    return fn

  def sample_data(self, key, n, shape_prefix=(1, 1)):
    import jax
    shape = (n,) + tuple(shape_prefix) + self.mean.shape
    return jnp.asarray(self.mean) + jnp.asarray(self.std) * jax.random.normal(key, shape)

  def expected_min_eps_loss(self, log_snr_fn, grid=200001):
    """E_{t ~ U(0,1)} of the mean over dimensions of Var[eps | z_t] (float64 quadrature)."""
    t = np.linspace(0.0, 1.0, grid)
    lam = np.asarray(log_snr_fn(t), np.float64)
    a2 = 1.0 / (1.0 + np.exp(-lam))
    s2 = 1.0 - a2
    var = np.stack([a2 * v * v / (a2 * v * v + s2) for v in self.std.astype(np.float64)], 0).mean(0)
    return float(np.trapezoid(var, t))
