"""The shapes alignment scorer against the dataset's own ground truth, and `imagen-jax eval
shapes` end to end."""

import json

import numpy as np
import pytest

from imagen_jax import cli
from imagen_jax.data import synthetic
from imagen_jax.eval.metrics import shapes
from tests.helpers import write_micro_cascade

SCENES = [synthetic.make_scene(123, i) for i in range(120)]


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_scorer_is_right_on_every_render_of_the_dataset(resolution):
  scores = [shapes.score(synthetic.render(s, resolution), s.caption) for s in SCENES]
  kinds = {s.kind for s in scores}
  assert kinds == set(shapes.KINDS)  # every caption kind is covered
  agg = shapes.aggregate(scores)
  for kind in list(shapes.KINDS) + ["overall"]:
    for metric in shapes.METRICS:
      if metric == "relation" and kind != "left_of" and kind != "overall":
        assert np.isnan(agg[kind][metric])  # only left/right captions have a relation
        continue
      assert agg[kind][metric] == 1.0, (resolution, kind, metric)
  assert agg["overall"]["fidelity"] > 0.99


def test_scorer_agrees_with_ground_truth_on_images_of_other_captions():
  """Scene i scored against the caption of scene j: `all` is exactly whether scene i satisfies
  caption j (the oracle from the scene's objects), which for random pairs is rare."""
  rng = np.random.default_rng(0)
  agree, hits = 0, 0
  pairs = [
    (i, int(j))
    for i in range(len(SCENES))
    for j in rng.choice(len(SCENES), 3, replace=False)
    if j != i
  ]
  for i, j in pairs:
    s = shapes.score(synthetic.render(SCENES[i], 32), SCENES[j].caption)
    truth = shapes.scene_satisfies(SCENES[i], SCENES[j].caption)
    agree += s.all == truth
    hits += s.all
  assert agree == len(pairs)
  assert hits / len(pairs) < 0.05


def test_scorer_finds_nothing_in_noise():
  rng = np.random.default_rng(1)
  scores = []
  for s in SCENES[:40]:
    noise = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    scores.append(shapes.score(noise, s.caption))
  agg = shapes.aggregate(scores)["overall"]
  assert agg["all"] == 0.0 and agg["color"] < 0.1 and agg["count"] < 0.1
  assert agg["fidelity"] < 0.5  # noise is mostly off-palette


def _swap_color(caption):
  words = caption.split()
  named = [w for w in words if w in synthetic.COLORS]
  new = next(c for c in synthetic.COLORS if c not in named)
  return " ".join(new if w == named[0] else w for w in words)


def _swap_count(caption):
  numbers = {"a": "two", "an": "two", "two": "three", "three": "four", "four": "one"}
  words = caption.split()
  words[0] = numbers[words[0]]
  if words[0] != "one" and not words[2].endswith("s"):
    words[2] = synthetic.PLURAL[words[2]]
  elif words[0] == "one":
    words[2] = words[2][:-1]
  return " ".join(words)


def _swap_relation(caption):
  return (
    caption.replace(" left of ", " @ ")
    .replace(" right of ", " left of ")
    .replace(" @ ", " right of ")
  )


def _swap_shape(caption):
  words = caption.split()
  for k, w in enumerate(words):
    single = {v: k2 for k2, v in synthetic.PLURAL.items()}.get(w, w)
    if single in synthetic.SHAPES:
      named = {({v: k2 for k2, v in synthetic.PLURAL.items()}.get(x, x)) for x in words}
      other = next(s for s in synthetic.SHAPES if s not in named)
      words[k] = synthetic.PLURAL[other] if w.endswith("s") and w != single else other
      return " ".join(words)
  raise AssertionError(caption)


@pytest.mark.parametrize(
  "swap, metric, kinds",
  [
    (_swap_color, "color", shapes.KINDS),
    (_swap_count, "count", ("count",)),
    (_swap_relation, "relation", ("left_of",)),
    (_swap_shape, "shape", ("count", "left_of")),
  ],
)
def test_accuracy_drops_when_the_caption_is_changed(swap, metric, kinds):
  scenes = [s for s in SCENES if s.relation in kinds]
  if swap is _swap_shape:  # a shape not named in the caption exists
    scenes = [s for s in scenes if len({o.shape for o in s.objects}) < len(synthetic.SHAPES)]
  assert len(scenes) >= 10
  before = shapes.aggregate(shapes.score(synthetic.render(s, 32), s.caption) for s in scenes)[
    "overall"
  ]
  after = shapes.aggregate(shapes.score(synthetic.render(s, 32), swap(s.caption)) for s in scenes)[
    "overall"
  ]
  assert before[metric] == 1.0 and before["all"] == 1.0
  assert after[metric] == 0.0 and after["all"] == 0.0
  # The attributes not touched stay right (a colour swap leaves the count, a relation swap the
  # colours).
  untouched = {"color": "count", "count": "color", "relation": "color", "shape": "count"}[metric]
  assert after[untouched] == 1.0


def test_caption_grammar():
  r = shapes.parse("a blue square to the right of an orange triangle")
  assert r.kind == "left_of" and r.left_right == (("triangle", "orange"), ("square", "blue"))
  assert shapes.parse("three purple circles").objects == (("circle", "purple"),) * 3
  assert shapes.parse("a red circle, a blue square and a green triangle").kind == "list"
  for bad in ("a pink circle", "a red hexagon", "five red circles", "red circle"):
    with pytest.raises(shapes.CaptionError):
      shapes.parse(bad)


def test_best_setting_is_all_correct_then_partial_alignment_then_fidelity():
  from imagen_jax.eval.tasks import shapes_eval

  def row(setting, w, all_, partial, fidelity, relation=float("nan")):
    m = {
      "all": all_,
      "color": partial,
      "count": partial,
      "shape": partial,
      "relation": relation,
      "fidelity": fidelity,
    }
    return {
      "stage": "base",
      "setting": setting,
      "guidance": w,
      "thresholding": "static",
      "metrics": {"overall": m},
    }

  rows = [
    row("a", 1, 0.0, 0.1, 0.99),
    row("b", 3, 0.0, 0.3, 0.90),
    row("c", 5, 0.0, 0.3, 0.95),
    row("d", 8, 0.0, 0.3, 0.95),
  ]
  assert (
    shapes_eval.best_settings({"rows": rows})["base"]["setting"] == "c"
  )  # partial, fidelity, then lower w
  rows.append(row("e", 8, 0.25, 0.2, 0.5, relation=0.0))
  assert shapes_eval.best_settings({"rows": rows})["base"]["setting"] == "e"  # all-correct first
  rows.append(row("f", 8, 0.25, 0.2, 0.5, relation=1.0))
  assert (
    shapes_eval.best_settings({"rows": rows})["base"]["setting"] == "f"
  )  # a measured relation counts


# ------------------------------------------------------------------------------------ eval shapes
# CLI


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory, spm_model, tiny_t5_checkpoint):
  return write_micro_cascade(tmp_path_factory.mktemp("eval_runs"), spm_model, tiny_t5_checkpoint[0])


def test_eval_shapes_sweeps_with_one_compiled_sampler_per_stage(cascade_dir, tmp_path, capsys):
  out = tmp_path / "ev"
  args = [
    "eval",
    "shapes",
    f"--gin_file={cascade_dir / 'cascade.gin'}",
    "--out",
    str(out),
    "--num_prompts",
    "3",
    "--guidance",
    "1,4",
    "--thresholding",
    "none,static,dynamic:95",
    "--train_examples",
    "50",
    "--label",
    "micro",
  ]
  assert cli.main(args) == 0, capsys.readouterr().err
  result = json.loads((out / "shapes.json").read_text())
  assert len(result["rows"]) == 6 * 2  # one per setting x stage
  assert {(r["guidance"], r["thresholding"]) for r in result["rows"]} == {
    (w, t) for w in (1.0, 4.0) for t in ("none", "static", "dynamic")
  }
  assert {r["percentile"] for r in result["rows"] if r["thresholding"] == "dynamic"} == {95.0}
  assert {s["name"]: s["programs_compiled"] for s in result["stages"]} == {"base": 1, "sr": 1}
  for r in result["rows"]:
    m = r["metrics"]["overall"]
    assert m["n"] == 3 and 0.0 <= m["all"] <= m["color"] <= 1.0 and 0.0 <= m["fidelity"] <= 1.0
    # The scores are the scorer's on the written images.
    ims = [
      np.asarray(
        __import__("PIL.Image", fromlist=["Image"])
        .open(out / "images" / r["setting"] / r["stage"] / f"p{k:04d}.png")
        .convert("RGB")
      )
      for k in range(3)
    ]
    captions = [synthetic.make_scene(1000, k).caption for k in range(3)]
    assert (
      shapes.aggregate(shapes.score(im, c) for im, c in zip(ims, captions))["overall"]["all"]
      == m["all"]
    )
  assert result["stages"][0]["image_size"] == 16 and result["stages"][1]["image_size"] == 32
  for name in (
    "alignment_vs_guidance.png",
    "alignment_vs_fidelity.png",
    "alignment_vs_guidance_base.png",
    "sweep_base.png",
    "sweep_sr.png",
  ):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  # A second model against this one as the baseline: the plots take it, the table lists both.
  out2 = tmp_path / "ev2"
  assert (
    cli.main(
      args[:3]
      + [
        "--out",
        str(out2),
        "--num_prompts",
        "2",
        "--guidance",
        "2",
        "--thresholding",
        "dynamic",
        "--baseline",
        str(out),
        "--no_images",
        "--sampler",
        "dpmpp_2m",
        "--spacing",
        "logsnr",
        "--negative_prompt",
        "blue",
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "| micro |" in printed and "| model |" in printed
  assert not (out2 / "images").exists()
  second = json.loads((out2 / "shapes.json").read_text())
  assert second["negative_prompts"] == ["blue"]
  assert {(s["setting"]["sampler"], s["setting"]["spacing"]) for s in second["stages"]} == {
    ("dpmpp_2m", "logsnr")
  }


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--guidance", "1,x"], "not a comma-separated list"),
    (["--thresholding", "sharp"], "thresholding"),
    (["--checkpoints", "base"], "STAGE=RUN_DIR"),
    (["--checkpoints", "nope=/tmp"], "no stage 'nope'"),
    (["--seed", "0", "--train_examples", "10"], "training seed"),
    (["--baseline", "/nonexistent.json"], "baseline /nonexistent.json"),
    (
      ["--sweep_stage", "srr"],
      "sweep_stage srr: no stage of that name (stages: base, sr)",
    ),  # was: base swept
  ],
)
def test_eval_shapes_bad_input_is_one_line(cascade_dir, tmp_path, capsys, extra, message):
  code = cli.main(
    [
      "eval",
      "shapes",
      f"--gin_file={cascade_dir / 'cascade.gin'}",
      "--out",
      str(tmp_path / "o"),
      "--num_prompts",
      "1",
      *extra,
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_eval_fid_clip_refuses_an_unknown_sweep_stage(cascade_dir, tmp_path, capsys):
  """It swept the first stage instead (exit 0 after minutes of sampling); now one line, before
  any scoring model is loaded (the Inception and CLIP paths below do not exist)."""
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red circle\ntwo blue squares\n")
  code = cli.main(
    [
      "eval",
      "fid-clip",
      f"--gin_file={cascade_dir / 'cascade.gin'}",
      "--out",
      str(tmp_path / "o"),
      "--prompts_file",
      str(prompts),
      "--ref",
      str(tmp_path / "none.npz"),
      "--inception",
      str(tmp_path / "none"),
      "--clip",
      str(tmp_path / "none"),
      "--sweep_stage",
      "srr",
    ]
  )
  err = capsys.readouterr().err
  assert (
    code == 2
    and "sweep_stage srr: no stage of that name" in err
    and len(err.strip().splitlines()) == 1
  ), err
