"""Text conditions, the null condition, condition dropout and classifier-free guidance.

A condition is a dict of per-example arrays (leading batch axis), keyed by `imagen_jax.batch_keys`.
The text part is
  TEXT_EMB:  (B, L, D) token embeddings of the frozen text encoder
  TEXT_MASK: (B, L)    bool, True for real tokens
Other entries (the low-resolution image and noise-augmentation level of super-resolution stages)
are passed through untouched: guidance drops only the text.

The null condition, used both by training-time dropout (p = 0.1 in the paper) and by the
unconditional half of classifier-free guidance, is the text zeroed and fully masked out. Networks
must treat an all-False mask as "no text" (the U-Nets attend to a learned null token instead).

A network function has the signature `model_fn(z, log_snr, cond) -> prediction`, with z of shape
(B, H, W, C), log_snr of shape (B,) and the prediction in the stage's objective (eps, x0 or v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The condition's field names live in `imagen_jax.batch_keys`; re-exported here for the diffusion
# API.
from imagen_jax.batch_keys import LOWRES, LOWRES_AUG_LEVEL, TEXT_EMB, TEXT_MASK  # noqa: F401
from imagen_jax.diffusion import process
from imagen_jax.diffusion.schedules import alpha_sigma_from_log_snr


def null_condition(cond, null_text=None):
  """The condition with its text removed: embeddings zero, mask all False; or, given null_text =
  (emb (L, D), mask (L,)), every row's text replaced by that one (DeepFloyd IF's empty prompt)."""
  if cond is None:
    return None
  out = dict(cond)
  if null_text is not None:
    emb, mask = null_text
    if TEXT_EMB in out:
      ref = out[TEXT_EMB]
      out[TEXT_EMB] = jnp.broadcast_to(jnp.asarray(emb, ref.dtype), ref.shape)
    if TEXT_MASK in out:
      ref = out[TEXT_MASK]
      out[TEXT_MASK] = jnp.broadcast_to(jnp.asarray(mask, ref.dtype), ref.shape)
    return out
  if TEXT_EMB in out:
    out[TEXT_EMB] = jnp.zeros_like(out[TEXT_EMB])
  if TEXT_MASK in out:
    out[TEXT_MASK] = jnp.zeros_like(out[TEXT_MASK])
  return out


def drop_condition(cond, key, drop_prob: float, null_text=None):
  """Per example, replaces the text by the null condition (`null_condition`) with probability
  drop_prob."""
  if cond is None or drop_prob <= 0 or (TEXT_EMB not in cond and TEXT_MASK not in cond):
    return cond
  ref = cond[TEXT_EMB] if TEXT_EMB in cond else cond[TEXT_MASK]
  keep = jax.random.bernoulli(key, 1.0 - drop_prob, (ref.shape[0],))
  null = null_condition(cond, null_text)
  out = dict(cond)
  for name in (TEXT_EMB, TEXT_MASK):
    if name in cond:
      k = keep.reshape((-1,) + (1,) * (cond[name].ndim - 1))
      out[name] = jnp.where(k, cond[name], null[name])
  return out


def negative_condition(cond, neg_emb, neg_mask):
  """The unconditional half of guidance with a negative prompt: `cond` with its text replaced by
  the negative prompt's (B, L, D) embeddings and (B, L) mask. A row whose negative prompt is empty
  carries zeros and an all-False mask: exactly the null condition."""
  out = dict(cond)
  out[TEXT_EMB] = jnp.asarray(neg_emb, jnp.float32)
  out[TEXT_MASK] = jnp.asarray(neg_mask, bool)
  return out


def is_unguided(guidance_scale) -> bool:
  """True when the scale is statically 1 (a Python or NumPy number): one network call suffices."""
  if isinstance(guidance_scale, (int, float, np.number)):
    return float(guidance_scale) == 1.0
  return (
    isinstance(guidance_scale, np.ndarray)
    and guidance_scale.shape == ()
    and float(guidance_scale) == 1.0
  )


def guided_x0_eps(
  model_fn, z, log_snr, cond, guidance_scale, objective: str, uncond=None, learned_variance=False
):
  """Classifier-free guided (x0, eps): eps~ = w eps(z, c) + (1 - w) eps(z, u).

  u is `uncond` (a negative prompt's condition, `negative_condition`) or, by default, the null
  condition.

  w = 1 (statically) makes one network call on the batch. Otherwise the batch is doubled
  (conditional half, then unconditional half) and the network is called once on it. The same affine
  combination is applied to x0 (x0 is affine in eps for a fixed z, so the pair stays consistent),
  which avoids dividing by a small alpha for v- and x0-prediction networks.

  learned_variance: the network outputs 2C channels, the prediction and the variance fraction v;
  returns (x0, eps, v) with v the conditional half's, unguided (as DeepFloyd IF's pipelines).
  """
  alpha, sigma = alpha_sigma_from_log_snr(log_snr)
  c = z.shape[-1]
  if is_unguided(guidance_scale):
    pred = jnp.asarray(model_fn(z, log_snr, cond), jnp.float32)
    x0, eps = process.prediction_to_x0_eps(pred[..., :c], z, alpha, sigma, objective)
    return (x0, eps, pred[..., c:]) if learned_variance else (x0, eps)
  b = z.shape[0]
  uncond = null_condition(cond) if uncond is None else uncond
  both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
  pred = model_fn(
    jnp.concatenate([z, z], axis=0), jnp.concatenate([log_snr, log_snr], axis=0), both
  )
  pred = jnp.asarray(pred, jnp.float32)
  x0_c, eps_c = process.prediction_to_x0_eps(pred[:b, ..., :c], z, alpha, sigma, objective)
  x0_u, eps_u = process.prediction_to_x0_eps(pred[b:, ..., :c], z, alpha, sigma, objective)
  w = jnp.asarray(guidance_scale, jnp.float32)
  x0, eps = w * x0_c + (1.0 - w) * x0_u, w * eps_c + (1.0 - w) * eps_u
  return (x0, eps, pred[:b, ..., c:]) if learned_variance else (x0, eps)
