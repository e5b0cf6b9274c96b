"""The cascade's networks: the base U-Net, the Efficient U-Net and DeepFloyd IF's U-Net (Flax
linen).

Every model is called as `model.apply({'params': p}, z, log_snr, cond, deterministic)` and so plugs
into the diffusion core as `model_fn(z, log_snr, cond)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.batch_keys import LOWRES, LOWRES_AUG_LEVEL, TEXT_EMB, TEXT_MASK
from imagen_jax.errors import ConfigError
from imagen_jax.models.efficient_unet import EfficientUNet, EfficientUNetConfig
from imagen_jax.models.if_unet import IFUNet, IFUNetConfig
from imagen_jax.models.unet import UNet, UNetConfig

ModelConfig = Union[UNetConfig, EfficientUNetConfig, IFUNetConfig]


@gin.configurable
def model_config(config: ModelConfig = gin.REQUIRED) -> ModelConfig:
  """The stage's network configuration, bound in gin as `model_config.config = @UNetConfig()`."""
  return config


def model_config_from_record(network: str, fields: dict) -> ModelConfig:
  """The network config a training run recorded (run.json's 'network' and 'config'; JSON lists ->
  tuples)."""
  classes = {cls.__name__: cls for cls in (UNetConfig, EfficientUNetConfig, IFUNetConfig)}
  if network not in classes:
    raise ConfigError(f"unknown network {network!r}; expected one of {sorted(classes)}")

  def tuples(v):
    return tuple(tuples(x) for x in v) if isinstance(v, list) else v

  return classes[network](**{k: tuples(v) for k, v in fields.items()})


def build_model(config: ModelConfig) -> nn.Module:
  if isinstance(config, UNetConfig):
    return UNet(config)
  if isinstance(config, EfficientUNetConfig):
    return EfficientUNet(config)
  if isinstance(config, IFUNetConfig):
    return IFUNet(config)
  raise TypeError(f"unknown model config {type(config).__name__}")


def is_super_resolution(config: ModelConfig) -> bool:
  """Whether the network takes a low-resolution conditioning image (every Efficient U-Net; a base
  or IF U-Net with `lowres_size` set)."""
  return isinstance(config, EfficientUNetConfig) or config.lowres_size is not None


def image_channels(config: ModelConfig) -> int:
  """The channels of the images a network denoises (an IF U-Net outputs twice as many: eps and the
  variance fraction)."""
  if isinstance(config, IFUNetConfig):
    return config.in_channels
  return config.out_channels


def example_inputs(config: ModelConfig, batch_size: int = 1, image_size=None, text_length=None):
  """(z, log_snr, cond) of the shapes the model trains on (zeros; text fully present)."""
  size = config.image_size if image_size is None else image_size
  length = config.max_text_length if text_length is None else text_length
  z = jnp.zeros((batch_size, size, size, config.in_channels), jnp.float32)
  log_snr = jnp.zeros((batch_size,), jnp.float32)
  cond = {
    TEXT_EMB: jnp.zeros((batch_size, length, config.text_embed_dim), jnp.float32),
    TEXT_MASK: jnp.ones((batch_size, length), bool),
  }
  if is_super_resolution(config):
    low = size * config.lowres_size // config.image_size
    cond[LOWRES] = jnp.zeros((batch_size, low, low, config.in_channels), jnp.float32)
    cond[LOWRES_AUG_LEVEL] = jnp.zeros((batch_size,), jnp.float32)
  return z, log_snr, cond


@functools.lru_cache(maxsize=16)
def _jitted_init(config: ModelConfig, batch_size: int):
  model = build_model(config)
  return jax.jit(lambda k: model.init(k, *example_inputs(config, batch_size))["params"])


def init_boxed_params(config: ModelConfig, key, batch_size: int = 1):
  """Random initial parameters of the model of `config`, boxed with their logical axis names
  (unbox with `nn.unbox`). The compiled initialiser is cached per (config, batch size): configs
  are hashable."""
  return _jitted_init(config, batch_size)(key)


def abstract_params(config: ModelConfig):
  """Shapes and dtypes of the parameters, with logical axis names, without allocating them."""
  return jax.eval_shape(lambda k: init_boxed_params(config, k), jax.random.PRNGKey(0))


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params))))


def convert_layout(params, config: ModelConfig, scanned: bool):
  """The (unboxed) parameters of the model of `config` in the scanned layout (`scanned=True`:
  each level's repeated blocks stacked on a leading axis under
  `<path>_<level>_layers/{res,attn}`) or the unscanned one (`<path>_<level>_res_<i>`,
  `<path>_<level>_attn_<i>`), whichever they are in now. The mapping comes from the config's
  `scan_runs()`, the one the networks are built from; values are not changed."""
  runs = dataclasses.replace(config, scan_layers=True).scan_runs()
  out = dict(params)
  for name, blocks in runs.items():
    if scanned and name not in out:
      entry = {
        "res": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[out.pop(r) for r, _ in blocks])
      }
      if blocks[0][1] is not None:
        entry["attn"] = jax.tree_util.tree_map(
          lambda *xs: jnp.stack(xs), *[out.pop(a) for _, a in blocks]
        )
      out[name] = entry
    elif not scanned and name in out:
      entry = out.pop(name)
      for i, (r, a) in enumerate(blocks):
        out[r] = jax.tree_util.tree_map(lambda x: x[i], entry["res"])
        if a is not None:
          out[a] = jax.tree_util.tree_map(lambda x: x[i], entry["attn"])
  return out
