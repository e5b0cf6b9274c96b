"""The optimizer of a stage, chosen in gin: Adafactor (the paper's base stage) or Adam (its SR
stages), a linear warm-up then cosine decay, global-norm clipping and optional gradient
accumulation.

Defaults are the paper's (docs/paper.md §2): learning rate 1e-4, 10k warm-up steps, cosine decay
over the 2.5M training steps, Adafactor with absolute steps (the learning rate is the step size, not
optax's default parameter-relative step) and no weight decay; Adam with b1 0.9,
b2 0.999, eps 1e-8 (`runs/train_sr_*.gin` select it).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple

import gin
import jax
import optax

from imagen_jax.errors import ConfigError

OPTIMIZERS = ("adafactor", "adam", "adamw", "sgd")


def check_optimizer(name: str) -> str:
  if name not in OPTIMIZERS:
    raise ConfigError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  return name


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adafactor"
  learning_rate: float = 1e-4
  warmup_steps: int = 10_000
  decay_steps: Optional[int] = (
    2_500_000  # cosine decay to end_learning_rate by this step; None: constant
  )
  end_learning_rate: float = 0.0
  b1: float = 0.9  # Adam / AdamW; SGD's momentum (0: plain SGD)
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0  # AdamW only
  clip_grad_norm: Optional[float] = (
    1.0  # global-norm clipping of the (accumulated) gradient; None: off
  )
  accumulate_steps: int = 1  # > 1: optax.MultiSteps, one update every k micro-batches
  # Adafactor only. False (default): the learning rate is the size of a step, as for Adam, so the
  # paper's 1e-4 moves every weight by about 1e-4 (docs/findings.md#adafactor). True (optax's and
  # T5's default): the step is relative to each tensor's RMS (floor 1e-3), which at 1e-4 moves
  # typical weights 20-100x less than Adam and zero-initialised tensors by about 1e-7.
  multiply_by_parameter_scale: bool = False
  # Parameters left as they are (fine-tuning): regular expressions searched in each parameter's
  # '/'-joined path, e.g. ('^text_', 'down_blocks_0/'). Their updates are zero; the rest trains.
  freeze: Tuple[str, ...] = ()

  def __post_init__(self):
    check_optimizer(self.name)
    object.__setattr__(self, "freeze", tuple(self.freeze))  # gin gives lists
    for pattern in self.freeze:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f"OptimizerConfig.freeze: bad pattern {pattern!r} ({e})") from None
    if self.learning_rate <= 0:
      raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
      raise ConfigError(
        f"decay_steps ({self.decay_steps}) must exceed warmup_steps ({self.warmup_steps})"
      )
    if self.accumulate_steps < 1:
      raise ConfigError(f"accumulate_steps must be >= 1, got {self.accumulate_steps}")
    if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
      raise ConfigError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then cosine decay to end_learning_rate at decay_steps
  (optimizer updates, i.e. micro-batches / accumulate_steps)."""
  if config.decay_steps is None:
    if config.warmup_steps == 0:
      return optax.constant_schedule(config.learning_rate)
    return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
    0.0, config.learning_rate, config.warmup_steps, config.decay_steps, config.end_learning_rate
  )


def param_path(key_path) -> str:
  """A parameter's '/'-joined path, as run.json's param_shapes names it."""
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def frozen_labels(params, patterns) -> dict:
  """'frozen' for each parameter whose path any of `patterns` matches (re.search), else 'train'."""
  regexes = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "frozen" if any(r.search(param_path(path)) for r in regexes) else "train",
    params,
  )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """The optax transformation `config` describes (see the module docstring).

  Args:
    config: the optimizer settings.

  Returns:
    The transformation; with `freeze`, frozen parameters get zero updates and no optimizer state.
  """
  opt = _make_optimizer(config)
  if config.freeze:
    opt = optax.multi_transform(
      {"train": opt, "frozen": optax.set_to_zero()},
      lambda params: frozen_labels(params, config.freeze),
    )
  return opt


def _make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config)
  if config.name == "adafactor":
    opt = optax.adafactor(
      learning_rate=schedule, multiply_by_parameter_scale=config.multiply_by_parameter_scale
    )
  elif config.name == "adam":
    opt = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  elif config.name == "adamw":
    opt = optax.adamw(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
    )
  else:
    opt = optax.sgd(schedule, momentum=config.b1 or None)
  if config.clip_grad_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), opt)
  if config.accumulate_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=config.accumulate_steps)
  return opt
