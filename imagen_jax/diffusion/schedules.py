"""Continuous-time variance-preserving noise schedules on t in [0, 1].

A schedule is a function t -> log-SNR(t) = log(alpha_t^2 / sigma_t^2), strictly decreasing, with
alpha_t^2 + sigma_t^2 = 1 (variance preserving), so alpha_t^2 = sigmoid(log-SNR) and
sigma_t^2 = sigmoid(-log-SNR). Everything else (alpha, sigma, posteriors) is derived from log-SNR.

Schedules are frozen dataclasses: hashable, so they can be static arguments of `jax.jit`, and
gin-configurable. To add one, subclass `NoiseSchedule`, implement `log_snr`, and register it in
`SCHEDULES` (or bind it directly in gin as `@MySchedule()`).
"""

from __future__ import annotations

import abc
import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.errors import ConfigError


def alpha_sigma_from_log_snr(log_snr):
  """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)), computed in float32.

  Works for lambda = +inf (alpha=1, sigma=0) and -inf (alpha=0, sigma=1).
  """
  log_snr = jnp.asarray(log_snr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))


class NoiseSchedule(abc.ABC):
  """Maps time t in [0, 1] (batch-polymorphic array) to log-SNR (float32)."""

  @abc.abstractmethod
  def log_snr(self, t):
    """log(alpha_t^2 / sigma_t^2); finite and strictly decreasing on [0, 1]."""

  def alpha_sigma(self, t):
    return alpha_sigma_from_log_snr(self.log_snr(t))

  def alpha_sigma_exact_ends(self, t):
    """Like `alpha_sigma`, but exactly (1, 0) at t <= 0 and (0, 1) at t >= 1.

    Training never touches the ends (the clipped log-SNR keeps every quantity finite); samplers
    (the last step lands on clean data) and noise augmentation (level 0 = untouched image,
    level 1 = pure noise) do.
    """
    t = jnp.asarray(t, jnp.float32)
    alpha, sigma = self.alpha_sigma(t)
    alpha = jnp.where(t <= 0, 1.0, jnp.where(t >= 1, 0.0, alpha))
    sigma = jnp.where(t <= 0, 0.0, jnp.where(t >= 1, 1.0, sigma))
    return alpha, sigma


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CosineSchedule(NoiseSchedule):
  """The cosine schedule (Nichol & Dhariwal 2021) in continuous time, log-SNR clipped to a range.

  alpha_t = cos(pi t / 2) gives log-SNR(t) = -2 log tan(pi t / 2), infinite at both ends. The usual
  clipping reparameterises t over the interval of angles whose log-SNR lies in
  [logsnr_min, logsnr_max]: log-SNR(t) = -2 log tan(a t + b), with log-SNR(0) = logsnr_max and
  log-SNR(1) = logsnr_min.
  """

  logsnr_min: float = -20.0
  logsnr_max: float = 20.0

  def __post_init__(self):
    if not self.logsnr_min < self.logsnr_max:
      raise ConfigError(
        f"CosineSchedule needs logsnr_min < logsnr_max, got {self.logsnr_min}, {self.logsnr_max}"
      )

  def _angles(self):
    """(a, b, c) in float64: the angle is a t + b, and c = pi/2 - a - b is its complement at t =
    1."""
    b = math.atan(math.exp(-0.5 * self.logsnr_max))
    a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
    return a, b, math.pi / 2 - a - b

  def log_snr(self, t):
    """-2 log tan(a t + b), evaluated so that float32 keeps its precision on all of [0, 1].

    Next to t = 1 the angle a t + b approaches pi/2, where tan is steep and the float32 sum a t + b
    has lost the digits that matter (log_snr(1) would be -20.0011). On the upper half the
    complementary angle pi/2 - (a t + b) = c + a (1 - t) is used instead: 1 - t is exact in float32
    for t >= 1/2 (Sterbenz), and -2 log tan(x) = 2 log tan(pi/2 - x).
    """
    t = jnp.asarray(t, jnp.float32)
    a, b, c = self._angles()
    lower = -2.0 * jnp.log(jnp.tan(a * jnp.minimum(t, 0.5) + b))
    upper = 2.0 * jnp.log(jnp.tan(c + a * (1.0 - jnp.maximum(t, 0.5))))
    return jnp.where(t < 0.5, lower, upper)


class _DiscreteSchedule(NoiseSchedule):
  """A discrete DDPM schedule (betas over num_timesteps steps, alpha_bar_n = prod_{i<=n}
  (1 - beta_i)) in continuous time: discrete step n (1-based) sits at t = n / num_timesteps and
  log(alpha_bar) is interpolated linearly in between (0 at t = 0), so the schedule is *exact* at the
  discrete times and strictly decreasing everywhere. log-SNR is clipped above at logsnr_max (it is
  +inf at t = 0). Subclasses give `betas()` (float64) and the fields num_timesteps, logsnr_max.
  """

  def betas(self) -> np.ndarray:
    raise NotImplementedError

  def _log_alpha_bar_knots(self) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log1p(-self.betas()))]).astype(np.float32)

  def log_snr(self, t):
    t = jnp.asarray(t, jnp.float32)
    n = self.num_timesteps
    knots = jnp.asarray(self._log_alpha_bar_knots())
    log_abar = jnp.interp(jnp.clip(t, 0.0, 1.0) * n, jnp.arange(n + 1, dtype=jnp.float32), knots)
    return self._log_snr_of(log_abar)

  def _log_snr_of(self, log_abar):
    # log SNR = log(abar) - log(1 - abar); expm1 keeps precision where abar is close to 1.
    return jnp.minimum(log_abar - jnp.log(-jnp.expm1(log_abar)), self.logsnr_max)

  def time_from_log_snr(self, log_snr):
    """The inverse of `log_snr`, exact at the discrete steps (linear in between)."""
    n = self.num_timesteps
    knots = self._log_snr_of(jnp.asarray(self._log_alpha_bar_knots()))  # decreasing
    steps = jnp.interp(
      -jnp.asarray(log_snr, jnp.float32), -knots, jnp.arange(n + 1, dtype=jnp.float32)
    )
    return steps / n


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LinearSchedule(_DiscreteSchedule):
  """The discrete DDPM linear-beta schedule (Ho et al. 2020): betas linearly spaced from
  beta_start to beta_end over num_timesteps steps, in continuous time (`_DiscreteSchedule`)."""

  beta_start: float = 1e-4
  beta_end: float = 0.02
  num_timesteps: int = 1000
  logsnr_max: float = 20.0

  def __post_init__(self):
    if not 0 < self.beta_start < self.beta_end < 1:
      raise ConfigError(
        f"LinearSchedule needs 0 < beta_start < beta_end < 1, got {self.beta_start}, "
        f"{self.beta_end}"
      )
    if self.num_timesteps < 1:
      raise ConfigError(f"LinearSchedule needs num_timesteps >= 1, got {self.num_timesteps}")

  def betas(self) -> np.ndarray:
    return np.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=np.float64)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DiscreteCosineSchedule(_DiscreteSchedule):
  """The discrete cosine schedule of improved DDPM (Nichol & Dhariwal 2021) as DeepFloyd IF trains
  with it (diffusers' `squaredcos_cap_v2`):
  alpha_bar(s) = cos((s + offset) / (1 + offset) * pi/2)^2,
  beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta), in continuous time
  (`_DiscreteSchedule`). Unlike `CosineSchedule` its log-SNR is not clipped below: the last step's
  beta cap (0.999) and the offset set log-SNR(1) (-19.8 at N = 1000)."""

  num_timesteps: int = 1000
  offset: float = 0.008
  max_beta: float = 0.999
  logsnr_max: float = 20.0

  def __post_init__(self):
    if self.num_timesteps < 1:
      raise ConfigError(
        f"DiscreteCosineSchedule needs num_timesteps >= 1, got {self.num_timesteps}"
      )
    if not 0 < self.max_beta < 1 or self.offset < 0:
      raise ConfigError(
        f"DiscreteCosineSchedule needs 0 < max_beta < 1 and offset >= 0, got {self.max_beta}, "
        f"{self.offset}"
      )

  def betas(self) -> np.ndarray:
    def alpha_bar(s):
      return np.cos((s + self.offset) / (1 + self.offset) * np.pi / 2) ** 2

    s = np.arange(self.num_timesteps, dtype=np.float64) / self.num_timesteps
    ratio = alpha_bar(s + 1.0 / self.num_timesteps) / alpha_bar(s)
    return np.minimum(1.0 - ratio, self.max_beta)


SCHEDULES = {
  "cosine": CosineSchedule,
  "linear": LinearSchedule,
  "discrete_cosine": DiscreteCosineSchedule,
}


def get_schedule(schedule) -> NoiseSchedule:
  """A schedule from an instance or a registered name ('cosine', 'linear', 'discrete_cosine')."""
  if isinstance(schedule, NoiseSchedule):
    return schedule
  if isinstance(schedule, str) and schedule in SCHEDULES:
    return SCHEDULES[schedule]()
  raise ConfigError(
    f"unknown noise schedule {schedule!r}; expected one of {sorted(SCHEDULES)} or a NoiseSchedule"
  )


def schedule_record(schedule: NoiseSchedule) -> dict:
  """A registered schedule as JSON ({'name': ..., its fields}); the inverse of
  `schedule_from_record`."""
  schedule = get_schedule(schedule)
  names = [name for name, cls in SCHEDULES.items() if type(schedule) is cls]
  if not names or not dataclasses.is_dataclass(schedule):
    raise ValueError(
      f"{type(schedule).__name__} is not a registered dataclass schedule; register it in SCHEDULES"
    )
  return {"name": names[0], **dataclasses.asdict(schedule)}


def schedule_from_record(record: dict) -> NoiseSchedule:
  record = dict(record)
  name = record.pop("name", None)
  if name not in SCHEDULES:
    raise ConfigError(
      f"unknown noise schedule {name!r} in record; expected one of {sorted(SCHEDULES)}"
    )
  return SCHEDULES[name](**record)
