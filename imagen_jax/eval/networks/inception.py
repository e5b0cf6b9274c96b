"""The FID Inception-v3 (the TensorFlow "2015-12-05" graph that FID is defined with, as pytorch-fid
and torch-fidelity port it) as a Flax module, its weights converter, and a jitted feature extractor
sharded over all devices.

The network is torchvision's Inception-v3 with the FID graph's differences: average pools that do
not count the padding (Mixed_5*, 6b-e, 7b), a max pool in the last block's pool branch (Mixed_7c),
batch norm with eps 1e-3, no auxiliary head; features are the 2048-d global average pool. Inputs are
uint8 RGB images of any size, resized to 299x299 with bilinear interpolation and mapped to [-1, 1]
by (x - 128) / 128. Two resizes: `tf1` (the default: TensorFlow 1's legacy bilinear, which the
original FID code and torch-fidelity use; source coordinate = i * in / out) and `pytorch`
(pytorch-fid's `F.interpolate(..., align_corners=False)`: half-pixel centres). Both are exact
separable matrices here.

Weights: `convert(pth, out_dir)` reads the published PyTorch state dict (pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, or torch-fidelity's identical
`weights-inception-2015-12-05-6726825d.pth`) with `torch.load(weights_only=True)` — the only pickle
this project opens, and only in the converter — and writes `inception_fid.safetensors` in this
module's layout. The evaluator reads only that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import images as imio
from imagen_jax.errors import ConfigError, UserError

WEIGHTS_FILE = "inception_fid.safetensors"
FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZES = ("tf1", "pytorch")
BN_EPS = 1e-3


class WeightsError(UserError):
  """Missing or mismatched Inception weights: one line, exit code 2."""


class BasicConv(nn.Module):
  """Conv (no bias) + batch norm (inference statistics) + ReLU, with torch's names: conv.kernel,
  bn.*."""

  features: int
  kernel: Tuple[int, int]
  stride: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    w = self.param(
      "conv_kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features)
    )
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
      x,
      w.astype(x.dtype),
      (self.stride, self.stride),
      ((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
    )
    scale = self.param("bn_scale", nn.initializers.ones, (self.features,))
    bias = self.param("bn_bias", nn.initializers.zeros, (self.features,))
    mean = self.param("bn_mean", nn.initializers.zeros, (self.features,))
    var = self.param("bn_var", nn.initializers.ones, (self.features,))
    y = (y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(y)


def _avg_pool_same(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], -1)


class InceptionE(nn.Module):
  max_pool: bool  # the FID graph's last block pools with max, the one before with average

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      -1,
    )
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      -1,
    )
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """(N, 299, 299, 3) in [-1, 1] -> (N, 2048) pool features."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return x.mean(axis=(1, 2))


# ------------------------------------------------------------------------------------------- resize


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """(out, in) bilinear interpolation weights along one axis (see the module doc for the two
  modes; `images.bilinear_matrix`)."""
  if mode not in RESIZES:
    raise ConfigError(f"resize must be one of {RESIZES}, got {mode!r}")
  return imio.bilinear_matrix(in_size, out_size, mode)


def preprocess(images_uint8: jnp.ndarray, mode: str = "tf1") -> jnp.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, 299, 299, 3) in [-1, 1]."""
  _, h, w, _ = images_uint8.shape
  x = images_uint8.astype(jnp.float32)
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    my, mx = (
      jnp.asarray(resize_matrix(h, INPUT_SIZE, mode)),
      jnp.asarray(resize_matrix(w, INPUT_SIZE, mode)),
    )
    x = jnp.einsum("oh,nhwc->nowc", my, x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum("pw,nowc->nopc", mx, x, precision=jax.lax.Precision.HIGHEST)
  return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------------------ weights

_BN = {"weight": "bn_scale", "bias": "bn_bias", "running_mean": "bn_mean", "running_var": "bn_var"}


def abstract_params():
  return jax.eval_shape(
    lambda: FIDInceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
  )


def from_torch_state_dict(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """torch names / layouts -> {'Mixed_5b/branch1x1/conv_kernel': HWIO array, ...}; every tensor
  of the module must be there with its shape (the classifier `fc.*` and `num_batches_tracked` are
  ignored)."""
  flat = {}
  for name, value in state.items():
    parts = name.split(".")
    if parts[0] == "fc" or parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
      continue
    a = np.asarray(value, np.float32)
    if len(parts) < 2:
      raise WeightsError(f"unexpected tensor {name!r} {a.shape} in the Inception state dict")
    if parts[-2] == "conv" and parts[-1] == "weight":
      if a.ndim != 4:
        raise WeightsError(
          f"tensor {name!r} has shape {a.shape}: a convolution kernel is 4-d (not the FID "
          "Inception-v3)"
        )
      key, a = (
        "conv_kernel",
        np.ascontiguousarray(a.transpose(2, 3, 1, 0)),
      )  # safetensors writes raw buffers
    elif parts[-2] == "bn" and parts[-1] in _BN:
      key = _BN[parts[-1]]
    else:
      raise WeightsError(f"unexpected tensor {name!r} {a.shape} in the Inception state dict")
    flat["/".join(parts[:-2] + [key])] = a
  check(flat)
  return flat


def param_shapes() -> Dict[str, Tuple[int, ...]]:
  """{'Mixed_5b/branch1x1/conv_kernel': shape, ...}: the safetensors layout of the network's
  weights."""
  from flax import traverse_util

  return {
    "/".join(k[1:]): tuple(v.shape)
    for k, v in traverse_util.flatten_dict(abstract_params()).items()
  }


def check(flat: Dict[str, np.ndarray]) -> None:
  want = param_shapes()
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing or extra:
    raise WeightsError(
      f"Inception weights: {len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected "
      f"(e.g. {extra[:2]}): not the FID Inception-v3"
    )
  for k, shape in want.items():
    if tuple(flat[k].shape) != tuple(shape):
      raise WeightsError(
        f"Inception weights: {k} has shape {tuple(flat[k].shape)}, expected {tuple(shape)}"
      )


def convert(src, out_dir) -> Path:
  """The published PyTorch weights file -> out_dir/inception_fid.safetensors (see the module
  doc)."""
  try:
    import torch
  except ImportError:
    raise WeightsError(
      "the converter needs PyTorch (CPU is enough): pip install 'imagen-jax[torch]'"
    ) from None
  from safetensors.numpy import save_file

  src = Path(src)
  if not src.is_file():
    raise WeightsError(f"{src}: no such file")
  try:
    state = torch.load(src, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad or unsafe file)
    raise WeightsError(
      f"{src}: not a PyTorch state dict that loads with weights_only=True "
      f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    ) from None
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise WeightsError(f"{src}: expected a state dict, got {type(state).__name__}")
  flat = from_torch_state_dict(
    {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
  )
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_file(
    flat,
    str(out / WEIGHTS_FILE),
    metadata={"source": src.name, "format": "imagen_jax FID inception v1"},
  )
  return out / WEIGHTS_FILE


def load(path) -> Dict:
  """Flax params from a converted safetensors file (or the folder holding it)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  p = Path(path)
  if p.is_dir():
    p = p / WEIGHTS_FILE
  if not p.is_file():
    raise WeightsError(
      f"no Inception weights at {path}: convert the published file "
      "pt_inception-2015-12-05-6726825d.pth first (`imagen-jax eval convert-inception`)"
    )
  try:
    flat = load_file(str(p))
  except (SafetensorError, OSError, ValueError) as e:
    raise WeightsError(f"{p}: not a safetensors file ({e})") from None
  check(flat)
  from flax import traverse_util

  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


# ---------------------------------------------------------------------------------------- extractor


class FeatureExtractor:
  """Jitted, batched over all devices (data axis): uint8 images (N, H, W, 3) -> float64 features
  (N, 2048)."""

  def __init__(self, variables, *, batch_size: int = 64, resize: str = "tf1", mesh=None):
    from imagen_jax import partitioning

    if resize not in RESIZES:
      raise ConfigError(f"resize must be one of {RESIZES}, got {resize!r}")
    self.mesh = mesh if mesh is not None else partitioning.create_mesh(-1, 1, 1)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.batch_size = -(-max(batch_size, 1) // shards) * shards
    self.resize = resize
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.variables = jax.device_put(variables, rep)
    self._batch_sharding = partitioning.batch_sharding(self.mesh, 4)
    model = FIDInceptionV3()
    self._fn = jax.jit(
      lambda v, x: model.apply(v, preprocess(x, resize)),
      out_shardings=partitioning.batch_sharding(self.mesh, 2),
    )

  def __call__(self, images: np.ndarray, on_batch=None) -> np.ndarray:
    """Features of uint8 RGB images (N, H, W, 3) as float64 (N, 2048); on_batch(done, total) per
    batch."""
    from imagen_jax import partitioning

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    feats = partitioning.pad_shard_unpad(
      lambda rows: self._fn(self.variables, jax.device_put(images[rows], self._batch_sharding)),
      len(images),
      self.batch_size,
      multiple=self.batch_size,
      on_batch=on_batch,
    )
    return np.zeros((0, FEATURE_DIM)) if feats is None else np.asarray(feats, np.float64)
