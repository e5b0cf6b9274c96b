"""`imagen-jax eval sr-conditioning`: the downsample-consistency oracle and the command end to
end on a micro cascade."""

import json

import numpy as np
import pytest

from imagen_jax import cli
from imagen_jax import images as imio
from imagen_jax.data import synthetic
from imagen_jax.eval.tasks import sr_conditioning as src
from tests.helpers import write_micro_cascade


def test_consistency_of_a_perfect_upsampler_beats_the_mismatched_floor():
  # Outputs that are the renders themselves: downsampled they give back their inputs (up to the
  # 8-bit rounding), far above the floor of pairing each with another image's input.
  hi = np.stack([synthetic.render(synthetic.make_scene(1000, k), 32) for k in range(6)])
  hi = hi.astype(np.float32) / 127.5 - 1.0
  low = imio.from_uint8(imio.to_uint8(imio.downsample(hi, 16)))
  good = src.consistency(hi, low)
  assert good["psnr_own_db"] > 40.0
  assert good["margin_db"] > 10.0
  # An SR stage that ignores its input and draws the same image for all: no margin at all.
  same = np.repeat(hi[:1], 6, axis=0)
  bad = src.consistency(same, low)
  assert abs(bad["margin_db"]) < 3.0 and bad["psnr_own_db"] < good["psnr_own_db"] - 10
  with pytest.raises(src.SampleError):
    src.consistency(hi[:1], low[:1])
  # Against the full-resolution renders: the renders themselves are exact (the PSNR cap), bicubic
  # upsampling of the input is the finite trivial baseline, and drawing one image for all is worse.
  t = src.against_target(hi, low, hi)
  assert t["psnr_target_db"] == pytest.approx(120.0 + 10 * np.log10(4.0), abs=1e-6)
  assert 10.0 < t["psnr_bicubic_db"] < 40.0
  assert src.against_target(same, low, hi)["psnr_target_db"] < t["psnr_bicubic_db"]
  assert src.fidelity(imio.to_uint8(hi)) > 0.95  # clean renders
  noisy = np.random.default_rng(0).integers(0, 256, hi.shape, dtype=np.uint8)
  assert src.fidelity(noisy) < 0.5


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory, spm_model, tiny_t5_checkpoint):
  return write_micro_cascade(tmp_path_factory.mktemp("src_runs"), spm_model, tiny_t5_checkpoint[0])


def test_eval_sr_conditioning_writes_curves_and_consistency(cascade_dir, tmp_path, capsys):
  out = tmp_path / "src"
  args = [
    "eval",
    "sr-conditioning",
    f"--gin_file={cascade_dir / 'cascade.gin'}",
    "--out",
    str(out),
    "--num_images",
    "3",
    "--times",
    "0.5,0.9",
    "--aug_level",
    "sr=0.1",
  ]
  assert cli.main(args) == 0, capsys.readouterr().err
  printed = capsys.readouterr().out
  assert "samples from renders" in printed and "samples from cascade" in printed
  r = json.loads((out / "sr_conditioning.json").read_text())
  assert r["stage"]["name"] == "sr" and (r["stage"]["lowres_size"], r["stage"]["image_size"]) == (
    16,
    32,
  )
  assert "aug0.1" in r["stage"]["setting"]
  curves = r["x0_error"]
  assert curves["t"] == [0.5, 0.9]
  for c in ("own", "other", "zero"):
    assert len(curves[c]) == 2 and all(0.0 <= e <= 4.0 for e in curves[c])
  assert set(r["samples"]) == {"renders", "cascade"}
  for s in r["samples"].values():
    assert s["margin_db"] == pytest.approx(s["psnr_own_db"] - s["psnr_mismatched_db"])
    assert 0.0 <= s["fidelity"] <= 1.0
  assert {"psnr_target_db", "psnr_bicubic_db"} <= set(r["samples"]["renders"])
  for name in ("grid_renders.png", "grid_cascade.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--stage", "base"], "is a base stage"),
    (["--stage", "nope"], "no stage 'nope'"),
    (["--num_images", "1"], "num_images must be >= 2"),
    (["--times", "0.5,1.0"], "times must lie in [0, 1)"),
  ],
)
def test_eval_sr_conditioning_bad_input_is_one_line(cascade_dir, tmp_path, capsys, extra, message):
  code = cli.main(
    [
      "eval",
      "sr-conditioning",
      f"--gin_file={cascade_dir / 'cascade.gin'}",
      "--out",
      str(tmp_path / "o"),
      *extra,
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
