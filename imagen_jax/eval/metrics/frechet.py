"""The Fréchet distance between two Gaussians (FID's formula) and the feature statistics it
compares.

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

in float64. tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2: for
covariance matrices (symmetric positive semi-definite) these are real and non-negative, so they
equal the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2), which is what is computed (eigh twice;
no general matrix square root whose iteration can fail). This is stable when the covariances are
rank-deficient (fewer samples than feature dimensions: every FID on fewer than 2048 images). As a
check, the eigenvalues of the non-symmetric S1 S2 are also computed: an imaginary part or a negative
value beyond round-off means an input is not a covariance matrix, and is an error rather than
silently dropped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from imagen_jax.errors import UserError


class StatsError(UserError):
  """Statistics that cannot be compared (shapes, not a covariance, unreadable file): one line,
  exit code 2."""


@dataclasses.dataclass(frozen=True)
class Stats:
  mu: np.ndarray  # (D,)
  sigma: np.ndarray  # (D, D)
  count: int

  @staticmethod
  def of(features: np.ndarray) -> "Stats":
    """Mean and (unbiased, as numpy.cov) covariance of features (N, D), in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
      raise StatsError(
        f"need at least 2 feature vectors (N, D) for statistics, got shape {f.shape}"
      )
    return Stats(f.mean(0), np.cov(f, rowvar=False), int(f.shape[0]))

  def save(self, path) -> None:
    """An .npz with `mu`, `sigma` (pytorch-fid's names) and `count`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
      np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))

  @staticmethod
  def load(path) -> "Stats":
    try:
      with np.load(path, allow_pickle=False) as z:
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        count = int(z["count"]) if "count" in z.files else -1
    except (OSError, ValueError, KeyError) as e:
      raise StatsError(f"cannot read statistics {path} (an .npz with mu and sigma): {e}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
      raise StatsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return Stats(mu, sigma, count)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, *, rtol: float = 1e-6) -> float:
  """tr((s1 s2)^(1/2)) for covariance matrices (see the module doc), with the check of the
  eigenvalues."""
  s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
  r = _psd_sqrt(s1)
  w = np.linalg.eigvalsh(r @ s2 @ r)
  scale = max(float(np.abs(w).max(initial=0.0)), 1e-300)
  check = np.linalg.eigvals(s1 @ s2)
  if (
    np.abs(check.imag).max(initial=0.0) > 1e-3 * scale + 1e-12
    or check.real.min(initial=0.0) < -1e-3 * scale - 1e-12
  ):
    raise StatsError(
      "the product of the covariances has eigenvalues with a large imaginary or negative part "
      f"(max |imag| {np.abs(check.imag).max():.3g}, min real {check.real.min():.3g}): the inputs "
      "are not covariance matrices"
    )
  if w.min(initial=0.0) < -rtol * scale * len(w):
    raise StatsError(f"the covariances are not positive semi-definite (eigenvalue {w.min():.3g})")
  w = np.where(
    w > scale * len(w) * np.finfo(np.float64).eps, w, 0.0
  )  # round-off of the null space is 0
  return float(np.sqrt(w).sum())


def frechet_distance(a: Stats, b: Stats) -> float:
  """FID between two feature statistics."""
  if a.mu.shape != b.mu.shape:
    raise StatsError(f"feature dimensions differ: {a.mu.shape[0]} and {b.mu.shape[0]}")
  diff = a.mu - b.mu
  value = float(
    diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma)
  )
  return max(value, 0.0)  # d^2 >= 0; round-off can leave -1e-12
