"""`eval sr-conditioning`: does a super-resolution stage follow its low-resolution input?

Two measurements on held-out synthetic scenes (a scene seed the training data never used), both with
the scenes' captions as text:

- **x0 error against t**: the mean squared error of the network's x0 estimate at a fixed noisy
  target z_t, with the image's own low-res input, another image's (the batch rolled by one) and an
  all-zero (grey) one, over t (default 0.5 .. 0.99, where a sample's layout is decided). A stage
  that uses its input has a much smaller error with its own input than with another's; one that
  ignores it has the same error with each.
- **downsample consistency**: the stage samples from the held-out low-res inputs (and, when the
  cascade has a stage before it, from that stage's own samples); each output is downsampled back to
  the input size (the data pipeline's bicubic antialiased resize) and compared with its own input
  (PSNR, dB) and with another image's (the mismatched floor: what ignoring the input scores).
  From the held-out renders' inputs the outputs are also compared with the full-resolution renders
  themselves (PSNR against the target, beside bicubic upsampling of the input: the trivial
  super-resolution), and every set's outputs get the shapes scorer's fidelity (the share of pixels a
  clean render explains).

Low-res inputs are made the way the training data makes them (`images.downsample` of the render at
the stage's size). Result: `sr_conditioning.json` (docs/outputs.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import batch_keys as K
from imagen_jax import images as imio
from imagen_jax.data import synthetic
from imagen_jax.diffusion import DiffusionConfig, process
from imagen_jax.eval.metrics import shapes
from imagen_jax.files import write_json
from imagen_jax.sample.cascade import Cascade, SampleError

DEFAULT_TIMES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
CONDITIONS = ("own", "other", "zero")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of [-1, 1] images (peak-to-peak 2)."""
  mse = np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)), axis=(1, 2, 3))
  return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def consistency(outputs: np.ndarray, inputs: np.ndarray) -> dict:
  """Downsample-consistency of SR outputs (N, S, S, 3) against their inputs (N, s, s, 3), both in
  [-1, 1]: mean PSNR of downsample(output) against its own input and against the next image's (the
  mismatched floor), and their difference."""
  if inputs.shape[0] < 2:
    raise SampleError("downsample consistency needs at least 2 images (the floor pairs them)")
  down = np.asarray(imio.downsample(outputs, inputs.shape[1]))
  own = float(np.mean(psnr(down, inputs)))
  floor = float(np.mean(psnr(down, np.roll(inputs, 1, axis=0))))
  return {"psnr_own_db": own, "psnr_mismatched_db": floor, "margin_db": own - floor}


def against_target(outputs: np.ndarray, inputs: np.ndarray, targets: np.ndarray) -> dict:
  """SR outputs (N, S, S, 3) against the full-resolution images their inputs (N, s, s, 3) were made
  from, all in [-1, 1]: mean PSNR of the outputs, and of the inputs upsampled bicubically (the
  trivial super-resolution an SR stage has to beat)."""
  size = targets.shape[1]
  up = jax.image.resize(jnp.asarray(inputs), (inputs.shape[0], size, size, 3), "bicubic")
  up = np.clip(np.asarray(up), -1.0, 1.0)
  return {
    "psnr_target_db": float(np.mean(psnr(outputs, targets))),
    "psnr_bicubic_db": float(np.mean(psnr(up, targets))),
  }


def fidelity(images_u8: np.ndarray) -> float:
  """The shapes scorer's mean fidelity of uint8 images (N, H, W, 3)."""
  return float(np.mean([shapes.detect(im)[1] for im in images_u8]))


def x0_errors(
  apply_fn,
  params,
  diffusion: DiffusionConfig,
  x,
  lowres,
  text_emb,
  text_mask,
  times: Sequence[float] = DEFAULT_TIMES,
  aug_level: float = 0.0,
  seed: int = 0,
) -> Dict[str, List[float]]:
  """The x0 error curves of an SR network with its own, another image's and a zero low-res input.

  Args:
    apply_fn: the network, `apply_fn(params, z, log_snr, cond)`.
    params: its parameters.
    diffusion: how it was trained (objective, schedules, where the augmentation noise goes).
    x: (B, S, S, C) targets in [-1, 1] (B >= 2).
    lowres: (B, s, s, C) their conditioning images in [-1, 1].
    text_emb: (B, L, D) text embeddings.
    text_mask: (B, L) masks.
    times: the t at which z_t = alpha_t x + sigma_t eps is formed (the same eps for every input).
    aug_level: the noise-conditioning augmentation level of the low-res input.
    seed: the noise's seed.

  Returns:
    {'own' | 'other' | 'zero': [mean squared error of the clipped x0 estimate, per t]}.
  """
  x = jnp.asarray(x, jnp.float32)
  n, size = x.shape[0], x.shape[1]
  k_eps, k_aug = jax.random.split(jax.random.PRNGKey(seed))
  eps = jax.random.normal(k_eps, x.shape, jnp.float32)
  inputs = {"own": lowres, "other": np.roll(lowres, 1, axis=0), "zero": np.zeros_like(lowres)}

  @jax.jit
  def err(params, low, t):
    aug, level = diffusion.augment_lowres(low, k_aug, aug_level, size)
    cond = {K.TEXT_EMB: text_emb, K.TEXT_MASK: text_mask, K.LOWRES: aug, K.LOWRES_AUG_LEVEL: level}
    tt = jnp.full((n,), t, jnp.float32)
    alpha, sigma = diffusion.schedule.alpha_sigma(tt)
    alpha, sigma = process.bcast(alpha, x), process.bcast(sigma, x)
    z = process.diffuse(x, eps, alpha, sigma)
    pred = apply_fn(params, z, diffusion.schedule.log_snr(tt), cond)
    x0, _ = process.prediction_to_x0_eps(pred, z, alpha, sigma, diffusion.objective)
    return jnp.mean(jnp.square(jnp.clip(x0, -1.0, 1.0) - x))

  return {
    c: [float(err(params, jnp.asarray(low, jnp.float32), jnp.float32(t))) for t in times]
    for c, low in inputs.items()
  }


def _sr_stage(cascade: Cascade, name: Optional[str]) -> int:
  """Index (in cascade.stages) of the SR stage measured: `name`, or the last SR stage."""
  names = [s.spec.name for s in cascade.stages]
  if name is not None:
    if name not in names:
      raise SampleError(f"no stage {name!r} (stages: {', '.join(names)})")
    i = names.index(name)
  else:
    srs = [i for i, s in enumerate(cascade.stages) if s.super_resolution]
    if not srs:
      raise SampleError(f"the cascade ({', '.join(names)}) has no super-resolution stage")
    i = srs[-1]
  if not cascade.stages[i].super_resolution:
    raise SampleError(f"stage {name} is a base stage: sr-conditioning measures an SR stage")
  return i


def evaluate(
  cascade: Cascade,
  out_dir,
  *,
  stage: Optional[str] = None,
  num_images: int = 32,
  seed: int = 1000,
  times: Sequence[float] = DEFAULT_TIMES,
  label: str = "model",
  save_images: bool = True,
  command: Optional[List[str]] = None,
  log=print,
) -> dict:
  """Measures one SR stage of `cascade` (see the module docstring) and writes sr_conditioning.json.

  Args:
    cascade: the loaded cascade; the SR stage measured and, when present, the stage before it (its
      samples are the second set of inputs).
    out_dir: where the JSON (and, with save_images, a grid of inputs and outputs) go.
    stage: the SR stage's name (default: the last SR stage).
    num_images: held-out scenes (and images per set of inputs).
    seed: the held-out scene seed (the training data's is 0).
    times: the t of the x0-error curve.
    label: a name for the result.
    save_images: write `grid_<inputs>.png` (inputs above outputs).
    command: the command line, recorded.
    log: called with progress lines.

  Returns:
    The result written to sr_conditioning.json.
  """
  if num_images < 2:
    raise SampleError(f"num_images must be >= 2, got {num_images}")
  if any(not 0.0 <= t < 1.0 for t in times):
    raise SampleError(f"times must lie in [0, 1), got {list(times)}")
  i = _sr_stage(cascade, stage)
  st = cascade.stages[i]
  size, low_size = st.spec.image_size, st.lowres_size
  setting = st.setting
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  scenes = [synthetic.make_scene(seed, k) for k in range(num_images)]
  captions = [s.caption for s in scenes]
  x = np.stack([synthetic.render(s, size) for s in scenes]).astype(np.float32) / 127.5 - 1.0
  lowres = imio.from_uint8(imio.to_uint8(imio.downsample(x, low_size)))
  text = cascade.encode(captions)
  log(
    f"eval sr-conditioning: stage {st.spec.name} ({st.description}, step "
    f"{st.checkpoint['step']}), {num_images} held-out scenes (seed {seed}), {low_size} -> {size} px"
  )
  t0 = time.perf_counter()
  errors = x0_errors(
    st.sampler.apply_fn,
    st.params,
    st.diffusion,
    x,
    lowres,
    text.emb,
    text.mask,
    times,
    setting.aug_level,
    seed,
  )
  ratio = [o / max(a, 1e-12) for o, a in zip(errors["own"], errors["other"])]
  log("  t      " + "  ".join(f"{t:>6g}" for t in times))
  for c in CONDITIONS:
    log(f"  {c:<6} " + "  ".join(f"{e:6.4f}" for e in errors[c]))
  log("  own/other " + "  ".join(f"{r:5.2f}" for r in ratio))

  seeds = list(range(seed * 100_000, seed * 100_000 + num_images))
  input_sets = {"renders": lowres}
  if i > 0 and not cascade.stages[0].super_resolution:  # the cascade's own inputs
    prev = None
    for before in cascade.stages[:i]:
      prev = imio.from_uint8(before.images(text.emb, text.mask, seeds, before.setting, lowres=prev))
    input_sets["cascade"] = prev
  samples = {}
  for what, low in input_sets.items():
    if low.shape[1] != low_size:
      continue
    u8 = st.images(text.emb, text.mask, seeds, setting, lowres=low)
    s = samples[what] = consistency(imio.from_uint8(u8), low)
    if what == "renders":
      s.update(against_target(imio.from_uint8(u8), low, x))
    s["fidelity"] = fidelity(u8)
    log(
      f"  samples from {what}: downsampled outputs {s['psnr_own_db']:.1f} dB from their own "
      f"inputs, {s['psnr_mismatched_db']:.1f} dB from another's (margin {s['margin_db']:+.1f} dB); "
      f"fidelity {s['fidelity']:.3f}"
    )
    if what == "renders":
      log(
        f"    against the {size} px renders: {s['psnr_target_db']:.1f} dB (bicubic upsampling of "
        f"the input: {s['psnr_bicubic_db']:.1f} dB)"
      )
    if save_images:
      up = [
        np.repeat(np.repeat(im, size // low_size, 0), size // low_size, 1)
        for im in imio.to_uint8(low[:8])
      ]
      imio.save_png(out / f"grid_{what}.png", imio.grid([up, list(u8[:8])]))
  result = {
    "what": "sr conditioning",
    "label": label,
    "date": time.strftime("%Y-%m-%d"),
    "stage": {
      "name": st.spec.name,
      "network": st.description,
      "checkpoint": st.checkpoint,
      "lowres_size": low_size,
      "image_size": size,
      "objective": st.diffusion.objective,
      "setting": setting.slug(True),
    },
    "held_out": {"seed": seed, "num_images": num_images},
    "x0_error": {"t": list(times), **errors, "own_over_other": ratio},
    "samples": samples,
    "seconds": time.perf_counter() - t0,
    "command": command,
  }
  write_json(out / "sr_conditioning.json", result)
  return result
