"""`imagen-jax sample` end to end on run directories written by the trainer's own checkpoint code
(random values of the right shapes: what is tested is reading runs, not their quality), and its
one-line errors."""

import json
import shutil

import numpy as np
import pytest

from imagen_jax import cli
from imagen_jax import images as imio
from tests.helpers import write_micro_cascade


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spm_model, tiny_t5_checkpoint):
  return write_micro_cascade(tmp_path_factory.mktemp("runs"), spm_model, tiny_t5_checkpoint[0])


def _run(capsys, *args):
  code = cli.main(["sample", *map(str, args)])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_sample_command_runs_the_cascade_and_records_how_to_regenerate(runs, tmp_path, capsys):
  out = tmp_path / "out"
  long_prompt = " ".join(["red circle"] * 20)
  code, stdout, stderr = _run(
    capsys,
    "--gin_file",
    runs / "cascade.gin",
    "--prompts",
    "a red circle",
    long_prompt,
    "two blue squares",
    "--samples_per_prompt",
    "2",
    "--seed",
    "5",
    "--batch_size",
    "4",
    "--guidance",
    "base=1,3",
    "--checkpoint_step",
    "base=1",
    "--out",
    out,
  )
  assert code == 0, stderr
  assert "prompt 1 truncated to 8 tokens" in stderr
  # Nothing else: orbax's "Given directory is read only" warning on every restore is silenced.
  assert [l for l in stderr.splitlines() if l.strip()] == [
    l for l in stderr.splitlines() if "truncated" in l
  ], stderr
  rec = json.loads((out / "settings.json").read_text())
  assert rec["prompts"][1]["truncated"] and not rec["prompts"][0]["truncated"]
  base, sr = rec["stages"]
  assert base["checkpoint"]["step"] == 1 and sr["checkpoint"]["step"] == 1
  assert base["checkpoint"]["path"].endswith("base/checkpoints/1")
  assert [s["guidance_scale"] for s in base["settings"]] == [1.0, 3.0]
  assert len(base["files"][0]) == 6 and sr["speed"]["images"] == 6
  assert imio.read_image(out / sr["files"][0][0]).shape == (32, 32, 3)
  assert (out / "base" / "sweep.png").is_file() and (out / "grid.png").is_file()
  assert "images/s" in stdout and "sweep grid of stage base" in stdout
  # SR alone from the written base images (the passed-on w=1 row) reproduces the cascade's SR
  # images.
  code, _, stderr = _run(
    capsys,
    "--gin_file",
    runs / "cascade.gin",
    "--stages",
    "sr",
    "--lowres_images",
    out / "base" / "w1_dynamic99.5_ddpm2",
    "--prompts",
    "a red circle",
    long_prompt,
    "two blue squares",
    "--seed",
    "5",
    "--out",
    tmp_path / "sr_only",
  )
  assert code == 0, stderr
  rec2 = json.loads((tmp_path / "sr_only" / "settings.json").read_text())
  for a, b in zip(sr["files"][0], rec2["stages"][0]["files"][0]):
    np.testing.assert_array_equal(
      imio.read_image(out / a), imio.read_image(tmp_path / "sr_only" / b)
    )
  # --no_grids (e.g. 30k COCO prompts): the stage folder holds only the samples, the same images.
  code, stdout, stderr = _run(
    capsys,
    "--gin_file",
    runs / "cascade.gin",
    "--stages",
    "sr",
    "--lowres_images",
    out / "base" / "w1_dynamic99.5_ddpm2",
    "--prompts",
    "a red circle",
    long_prompt,
    "two blue squares",
    "--seed",
    "5",
    "--no_grids",
    "--out",
    tmp_path / "no_grids",
  )
  assert code == 0, stderr
  assert sorted(p.name for p in (tmp_path / "no_grids" / "sr").iterdir()) == sorted(
    p.name for p in (tmp_path / "sr_only" / "sr").iterdir() if p.name != "grid.png"
  )
  assert not (tmp_path / "no_grids" / "grid.png").exists() and "no grids" in stdout


def test_sample_command_dpm_solver_negative_prompt_and_inpainting(
  runs, tmp_path, capsys, monkeypatch
):
  """DPM-Solver++ on a Karras grid, a negative prompt, and inpainting through both stages: each
  stage keeps the known region at its own resolution. The T5 checkpoint is read once."""
  from imagen_jax.text import checkpoints as text_checkpoints

  reads = []
  load_any = text_checkpoints.load_any
  monkeypatch.setattr(
    text_checkpoints, "load_any", lambda *a, **k: reads.append(a[0]) or load_any(*a, **k)
  )
  rng = np.random.default_rng(0)
  known = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  mask = np.zeros((32, 32, 3), np.uint8)
  mask[:, :16] = 255  # white = keep: the left half
  imio.save_png(tmp_path / "known.png", known)
  imio.save_png(tmp_path / "mask.png", mask)
  out = tmp_path / "out"
  code, stdout, stderr = _run(
    capsys,
    "--gin_file",
    runs / "cascade.gin",
    "--prompts",
    "a red circle",
    "--samples_per_prompt",
    "2",
    "--sampler",
    "dpmpp_2m",
    "--spacing",
    "karras",
    "--steps",
    "4",
    "--guidance",
    "3",
    "--negative_prompt",
    "blue",
    "--init_images",
    tmp_path / "known.png",
    "--mask",
    tmp_path / "mask.png",
    "--resample",
    "2",
    "--out",
    out,
  )
  assert code == 0, stderr
  assert len(reads) == 1, reads  # prompts and the negative prompt share one read
  rec = json.loads((out / "settings.json").read_text())
  assert rec["negative_prompts"] == ["blue"]
  assert rec["inpainting"] == {"masks": 1, "resample": 2}
  assert len(rec["images"]) == 2
  for st in rec["stages"]:
    assert st["settings"][0]["sampler"] == "dpmpp_2m"
    assert st["settings"][0]["spacing"] == "karras"
    size = st["image_size"]
    want = imio.to_uint8(imio.downsample(imio.from_uint8(known[None]), size))[0]
    keep = size // 2 - 1  # the columns the resized mask keeps entirely
    for f in st["files"][0]:
      got = imio.read_image(out / f)
      np.testing.assert_array_equal(got[:, :keep], want[:, :keep])
      assert np.abs(got[:, size // 2 + 1 :].astype(int) - want[:, size // 2 + 1 :]).mean() > 10


def test_a_run_still_training_is_read_at_its_last_complete_checkpoint(runs, tmp_path, capsys):
  """A checkpoint being written (orbax's temporary directory) is skipped, not waited on."""
  run = tmp_path / "training"
  shutil.copytree(runs / "base", run)
  partial = run / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(run / "checkpoints" / "2", partial)
  shutil.rmtree(partial / "ema_params")
  gin_file = tmp_path / "one.gin"
  gin_file.write_text((runs / "cascade.gin").read_text().replace(str(runs / "base"), str(run)))
  code, stdout, stderr = _run(
    capsys,
    "--gin_file",
    gin_file,
    "--stages",
    "base",
    "--prompts",
    "a red circle",
    "--out",
    tmp_path / "out",
  )
  assert code == 0, stderr
  assert (
    json.loads((tmp_path / "out" / "settings.json").read_text())["stages"][0]["checkpoint"]["step"]
    == 2
  )


@pytest.mark.parametrize(
  "case",
  [
    "no_prompts",
    "sampler",
    "negative_steps",
    "thresholding",
    "sr_as_base",
    "missing_run",
    "empty_run",
    "half_written_run",
    "other_size",
    "lowres_size",
    "unreadable_lowres",
    "not_contiguous",
    "bad_checkpoint_step",
    "mask_without_image",
    "negative_count",
    "spacing",
    "mask_missing",
    "resample",
  ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(runs, tmp_path, capsys, case):
  g = ["--gin_file", runs / "cascade.gin"]
  p = ["--prompts", "a red circle"]
  (tmp_path / "empty").mkdir()
  half = tmp_path / "half"
  half.mkdir()
  (half / "run.json").write_text((runs / "base" / "run.json").read_text())
  (half / "checkpoints" / "1.orbax-checkpoint-tmp-1").mkdir(parents=True)
  small = tmp_path / "small"
  imio.save_png(small / "a.png", np.zeros((8, 8, 3), np.uint8))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "a.png").write_bytes(b"\x89PNG truncated")
  negatives = tmp_path / "negatives.txt"
  negatives.write_text("blue\nred\n")
  args, message = {
    "no_prompts": (g + ["--prompts"], "no prompts"),
    "sampler": (g + p + ["--sampler", "euler"], "unknown sampler 'euler'"),
    "negative_steps": (g + p + ["--steps", "base=-4"], "sampling steps must be >= 1"),
    "thresholding": (g + p + ["--thresholding", "clip"], "unknown thresholding 'clip'"),
    "sr_as_base": (
      g + p + [f"--gin.base/stage.run_dir='{runs / 'sr'}'"],
      "stage base: .* holds a super-resolution",
    ),
    "missing_run": (
      g + p + [f"--gin.sr/stage.run_dir='{tmp_path / 'nowhere'}'"],
      "run directory not found",
    ),
    "empty_run": (g + p + [f"--gin.sr/stage.run_dir='{tmp_path / 'empty'}'"], "no run.json"),
    "half_written_run": (
      g + p + ["--stages", "base", f"--gin.base/stage.run_dir='{half}'"],
      "no complete checkpoint",
    ),
    "other_size": (
      g + p + ["--gin.base/stage.expect={'model_channels': 64}"],
      "expects model_channels = 64",
    ),
    "lowres_size": (
      g + p + ["--stages", "sr", "--lowres_images", small],
      "a.png is 8x8, but this stage takes 16x16",
    ),
    "unreadable_lowres": (g + p + ["--stages", "sr", "--lowres_images", bad], "cannot read image"),
    "not_contiguous": (g + p + ["--stages", "sr,nope"], "no stage 'nope'"),
    "bad_checkpoint_step": (
      g + p + ["--checkpoint_step", "base=9"],
      "no complete checkpoint at step 9",
    ),
    "mask_without_image": (g + p + ["--mask", small / "a.png"], "masks need the image"),
    "negative_count": (
      g + p + ["--negative_prompts_file", negatives],
      "2 negative prompts for 1 prompts",
    ),
    "spacing": (g + p + ["--spacing", "cosine"], "unknown step spacing 'cosine'"),
    "mask_missing": (
      g + p + ["--init_images", small / "a.png", "--mask", tmp_path / "nope.png"],
      "no such image file or folder: .*nope.png",
    ),
    "resample": (
      g + p + ["--init_images", small / "a.png", "--mask", small / "a.png", "--resample", "0"],
      "resample must be >= 1, got 0",
    ),
  }[case]
  code, stdout, stderr = _run(capsys, *args, "--out", tmp_path / "out")
  assert code == 2
  lines = [x for x in stderr.splitlines() if x.strip()]
  assert len(lines) == 1 and lines[0].startswith("imagen-jax: error: "), stderr
  import re

  assert re.search(message, lines[0]), lines[0]
  assert not (tmp_path / "out").exists()
