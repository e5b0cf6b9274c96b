"""The train step as a pure function, and the one function that gives it with its shardings and
donation.

`train_step(state, batch, encoder_params) -> (state, metrics)`: the step's key is fold_in(run key,
step) (a resumed run draws exactly the keys an uninterrupted one would); SR stages corrupt the
low-res image with noise-conditioning augmentation at random levels; the diffusion core's loss (with
condition dropout) is differentiated; the optax update (global-norm clipping inside the chain) and
the EMA update follow; a step whose loss or gradient norm is not finite leaves parameters, EMA and
optimizer state untouched (a select inside the compiled program) and is counted.

`step_signature(...)` returns the partial'd step with its in/out shardings and donated arguments:
the loop jits exactly that, and the ahead-of-time compile check lowers exactly that (what is checked
is what runs; maxtext's get_functional_train_with_signature).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import batch_keys as K
from imagen_jax import models, partitioning
from imagen_jax.diffusion import DiffusionConfig
from imagen_jax.train.state import TrainState

# The fields of a batch that reach the device (captions and keys stay on the host).
DEVICE_KEYS = (K.IMAGE, K.LOWRES, K.TEXT_EMB, K.TEXT_MASK, K.TOKENS)

# Metrics the step returns: sums over a logging interval (added up on the device) and the state's
# non-finite counters after the step (the latest value is kept: the state itself is donated).
SUM_KEYS = ("loss_sum", "grad_norm_sum", "finite_steps", "nonfinite_steps")
LAST_KEYS = ("nonfinite_streak", "nonfinite_total")
METRIC_KEYS = SUM_KEYS + LAST_KEYS


def ema_decay_at(step, decay: float, warmup: bool):
  """EMA decay; with warmup, min(decay, (1 + step) / (10 + step)), so early averages are not
  dominated by the random initialisation (the usual ExponentialMovingAverage num_updates rule)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  s = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + s) / (10.0 + s))


def train_step(
  state: TrainState,
  batch: Dict[str, jax.Array],
  encoder_params=None,
  *,
  model,
  diffusion: DiffusionConfig,
  tx: optax.GradientTransformation,
  super_resolution: bool,
  ema_decay: float = 0.9999,
  ema_warmup: bool = True,
  encoder_config=None,
  trace_counter: Optional[Callable[[], None]] = None,
  null_text=None,
) -> Tuple[TrainState, Dict[str, jax.Array]]:
  if trace_counter is not None:
    trace_counter()
  key = jax.random.fold_in(state.rng, state.step)
  k_loss, k_aug, k_dropout = jax.random.split(key, 3)

  if encoder_config is not None:  # on-the-fly text embedding: the frozen encoder inside the step
    from imagen_jax.text.encoder import encode_tokens

    emb, mask = encode_tokens(
      encoder_config, jax.lax.stop_gradient(encoder_params), batch[K.TOKENS]
    )
    cond = {K.TEXT_EMB: emb, K.TEXT_MASK: mask}
  else:
    cond = {K.TEXT_EMB: batch[K.TEXT_EMB], K.TEXT_MASK: batch[K.TEXT_MASK]}
  if super_resolution:
    lowres, level = diffusion.augment_lowres_for_training(
      batch[K.LOWRES], k_aug, batch[K.IMAGE].shape[1]
    )
    cond[K.LOWRES] = lowres
    cond[K.LOWRES_AUG_LEVEL] = level

  def loss_fn(params):
    def model_fn(z, log_snr, c):
      return model.apply(
        {"params": params}, z, log_snr, c, deterministic=False, rngs={"dropout": k_dropout}
      )

    loss, _ = diffusion.loss(model_fn, batch[K.IMAGE], cond, k_loss, null_text)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  updated = (
    optax.MultiSteps.has_updated(opt_state)
    if isinstance(opt_state, optax.MultiStepsState)
    else True
  )
  decay = jnp.where(updated, ema_decay_at(state.step, ema_decay, ema_warmup), 1.0)
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    ema_params=keep(ema, state.ema_params),
    opt_state=keep(opt_state, state.opt_state),
    nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32),
    nonfinite_total=(state.nonfinite_total + (~finite).astype(jnp.int32)).astype(jnp.int32),
  )
  f = finite.astype(jnp.float32)
  metrics = {
    "loss_sum": jnp.where(finite, loss, 0.0),
    "grad_norm_sum": jnp.where(finite, grad_norm, 0.0),
    "finite_steps": f,
    "nonfinite_steps": 1.0 - f,
    "nonfinite_streak": new_state.nonfinite_streak,
    "nonfinite_total": new_state.nonfinite_total,
  }
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class StepSignature:
  """The step function (state, batch, encoder_params) -> (state, metrics) with what `jax.jit`
  needs."""

  fn: Callable
  in_shardings: Tuple[Any, Any, Any]
  out_shardings: Tuple[Any, Any]
  donate_argnums: Tuple[int, ...]

  def jit(self):
    return jax.jit(
      self.fn,
      in_shardings=self.in_shardings,
      out_shardings=self.out_shardings,
      donate_argnums=self.donate_argnums,
    )


def batch_shardings(batch_shapes: Dict[str, Any], mesh: Mesh) -> Dict[str, NamedSharding]:
  return {k: partitioning.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}


def step_signature(
  *,
  model_config,
  diffusion: DiffusionConfig,
  tx,
  state_shardings: TrainState,
  batch_shapes: Dict[str, Any],
  mesh: Mesh,
  ema_decay: float = 0.9999,
  ema_warmup: bool = True,
  encoder_config=None,
  encoder_shardings=None,
  trace_counter=None,
  null_text=None,
) -> StepSignature:
  """The train step of one stage, partial'd over the model and settings, with its shardings.

  batch_shapes: the device fields of a global batch (ShapeDtypeStructs or arrays). The state is
  donated. null_text: the (emb (L, D), mask (L,)) dropped conditions take (null_text=
  'empty_prompt' stages; a constant of the program), default zeros.
  """
  fn = functools.partial(
    train_step,
    model=models.build_model(model_config),
    diffusion=diffusion,
    tx=tx,
    super_resolution=models.is_super_resolution(model_config),
    ema_decay=ema_decay,
    ema_warmup=ema_warmup,
    encoder_config=encoder_config,
    trace_counter=trace_counter,
    null_text=null_text,
  )
  replicated = NamedSharding(mesh, PartitionSpec())
  metrics = {k: replicated for k in METRIC_KEYS}
  return StepSignature(
    fn=fn,
    in_shardings=(state_shardings, batch_shardings(batch_shapes, mesh), encoder_shardings),
    out_shardings=(state_shardings, metrics),
    donate_argnums=(0,),
  )


def accumulate(total, metrics):
  """Adds a step's metrics to the running sums, keeps its counters (jit it: no host sync)."""
  out = {k: total[k] + metrics[k] for k in SUM_KEYS}
  out.update({k: metrics[k] for k in LAST_KEYS})
  return out


def zero_metrics():
  out = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
  out.update({k: jnp.zeros((), jnp.int32) for k in LAST_KEYS})
  return out
