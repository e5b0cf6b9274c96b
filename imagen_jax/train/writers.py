"""Where a run's metrics go: TensorBoard event files (clu), Weights & Biases, or both, chosen in gin
(`train.writers = ['tensorboard', 'wandb']`), on process 0 only, beside one progress line on stdout.

wandb is an optional extra (`pip install 'imagen-jax[wandb]'`); `WandbSettings` names the project
and the mode ('online', 'offline': the run is kept under MODEL_DIR/wandb/ for `wandb sync`,
'disabled'). The run's gin config goes to wandb's config.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import gin
import numpy as np
from etils import epath

from imagen_jax.errors import ConfigError

WRITERS = ("tensorboard", "wandb")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WandbSettings:
  project: str = "imagen-jax"
  entity: Optional[str] = None
  name: Optional[str] = None  # default: MODEL_DIR's last component
  mode: str = "online"  # 'online' | 'offline' | 'disabled'
  tags: Sequence[str] = ()


def check_writers(writers) -> tuple:
  """The writer names, validated (ConfigError on an unknown one)."""
  unknown = [w for w in writers if w not in WRITERS]
  if unknown:
    raise ConfigError(f"unknown writer {unknown[0]!r}; expected any of {WRITERS}")
  return tuple(writers)


class _TensorBoard:
  def __init__(self, model_dir: str):
    from imagen_jax.data import tf_setup

    tf_setup()  # TensorFlow for tf.summary: host only, start-up chatter filtered
    from clu import metric_writers

    self._w = metric_writers.AsyncWriter(
      metric_writers.SummaryWriter(str(epath.Path(model_dir) / "train"))
    )

  def scalars(self, step, scalars):
    self._w.write_scalars(step, scalars)

  def images(self, step, images):
    self._w.write_images(step, images)

  def close(self):
    self._w.flush()
    self._w.close()


class _Wandb:
  def __init__(self, model_dir: str, settings: WandbSettings):
    try:
      import wandb
    except ImportError:
      raise ConfigError(
        "train.writers names 'wandb' but wandb is not installed (pip install 'imagen-jax[wandb]')"
      ) from None
    self._wandb = wandb
    directory = epath.Path(model_dir)
    local = "://" not in str(directory)
    if local:
      directory.mkdir(parents=True, exist_ok=True)
    self._run = wandb.init(
      project=settings.project,
      entity=settings.entity,
      name=settings.name or directory.name,
      mode=settings.mode,
      tags=list(settings.tags) or None,
      dir=str(directory) if local else None,
      config={"gin": gin.config_str()},
      resume="allow",
      id=None,
    )

  def scalars(self, step, scalars):
    self._run.log(dict(scalars), step=step)

  def images(self, step, images):
    logged = {}
    for k, v in images.items():
      arr = np.asarray(v)
      arr = arr[0] if arr.ndim == 4 else arr
      logged[k] = self._wandb.Image(arr)
    self._run.log(logged, step=step)

  def close(self):
    self._run.finish()


class MetricWriter:
  """The run's writers and its progress line (see the module docstring).

  Args:
    model_dir: the run directory.
    writers: any of 'tensorboard', 'wandb'.
    enabled: write at all (process 0 only).
    progress: print the progress line.
    wandb_settings: the wandb run (default: `WandbSettings()` as gin configures it).
  """

  def __init__(
    self,
    model_dir,
    writers: Sequence[str] = ("tensorboard",),
    enabled: bool = True,
    progress: bool = True,
    wandb_settings: Optional[WandbSettings] = None,
  ):
    writers = check_writers(writers)
    self.enabled = enabled
    self.progress = progress
    self._backends = []
    if not enabled:
      return
    if "tensorboard" in writers:
      try:
        self._backends.append(_TensorBoard(str(model_dir)))
      except ImportError as e:  # no TensorFlow / TensorBoard on this machine
        print(f"metrics: no TensorBoard writer ({e})", flush=True)
    if "wandb" in writers:
      self._backends.append(_Wandb(str(model_dir), wandb_settings or WandbSettings()))

  def write(self, step: int, scalars: Dict[str, float], line: Optional[str] = None) -> None:
    """Scalars to every writer, and `line` to stdout."""
    if not self.enabled:
      return
    for b in self._backends:
      b.scalars(step, scalars)
    if self.progress and line:
      print(line, flush=True)

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    """Scalars to every writer, no progress line (evaluation hooks)."""
    self.write(step, scalars, None)

  def write_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
    """Images (N, H, W, C uint8) to every writer."""
    if self.enabled:
      for b in self._backends:
        b.images(step, images)

  def close(self):
    for b in self._backends:
      b.close()
