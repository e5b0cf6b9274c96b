"""DrawBench: the CSV loader's quirks, resumable sampling through a cascade, the tally against
hand counts and its intervals, and the rating page in a real headless Chromium (clicks, keys,
reload, download, un-blinding)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from imagen_jax import cli
from imagen_jax import images as imio
from imagen_jax.eval.tasks import drawbench
from tests import helpers
from tests.helpers import write_micro_cascade

SHARED_CSV = helpers.ROOT.parent / "shared" / "data" / "drawbench_partial.csv"
CHROMIUM = "/usr/bin/chromium"


def test_csv_quirks_load(tmp_path):
  f = tmp_path / "db.csv"
  f.write_text(
    "\ufeffPrompts,Category\n"
    "A red colored car.,Colors   \n"
    "\n"
    '"A horse riding an astronaut, on the moon.",Conflicting\n'
    '"She said ""hi"", then left.", Text \n'
    "   \n"
    "Two cats.,Counting\n",
    encoding="utf-8",
  )
  got = [(p.index, p.prompt, p.category) for p in drawbench.load_prompts(f)]
  assert got == [
    (0, "A red colored car.", "Colors"),
    (1, "A horse riding an astronaut, on the moon.", "Conflicting"),
    (2, 'She said "hi", then left.', "Text"),
    (3, "Two cats.", "Counting"),
  ]


def test_the_published_partial_file_loads():
  if not SHARED_CSV.is_file():
    pytest.fail(f"{SHARED_CSV} is missing: ../shared/data must sit beside the checkout")
  prompts = drawbench.load_prompts(SHARED_CSV)
  cats = {p.category for p in prompts}
  assert len(prompts) == 104
  assert cats == {"Colors", "Conflicting", "Counting", "DALL-E", "Gary Marcus et al.", "Positional"}


@pytest.mark.parametrize(
  "text, message",
  [
    ("Prompt,Kind\nx,y\n", "Prompts,Category"),
    ("Prompts,Category\n", "no prompts"),
    ("Prompts,Category\nonly-a-prompt\n", "row 2"),
    ("Prompts,Category\n,Colors\n", "empty prompt"),
  ],
)
def test_bad_csv_is_one_line(tmp_path, capsys, text, message):
  f = tmp_path / "bad.csv"
  f.write_text(text)
  with pytest.raises(drawbench.DrawBenchError, match=message):
    drawbench.load_prompts(f)


# ----------------------------------------------------------------------------------- sampling
# (resume)


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory, spm_model, tiny_t5_checkpoint):
  return write_micro_cascade(tmp_path_factory.mktemp("db_runs"), spm_model, tiny_t5_checkpoint[0])


def test_sampling_resumes_and_skips_done_prompts(cascade_dir, tmp_path, capsys):
  csv_file = tmp_path / "db.csv"
  csv_file.write_text(
    "Prompts,Category\na red circle,Colors \ntwo blue squares,Counting\na green triangle,Colors\n"
  )
  out = tmp_path / "a"
  args = [
    "eval",
    "drawbench",
    f"--gin_file={cascade_dir / 'cascade.gin'}",
    "--csv",
    str(csv_file),
    "--out",
    str(out),
    "--samples_per_prompt",
    "2",
    "--label",
    "micro",
  ]
  assert cli.main(args) == 0, capsys.readouterr().err
  assert "0 done before, 3 to sample" in capsys.readouterr().out
  files = sorted(out.glob("p*/s*.png"))
  assert len(files) == 6
  before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
  # An interrupted prompt: its marker and an image gone. Only it is sampled again, to the same
  # images.
  (out / "p0001" / "done.json").unlink()
  (out / "p0001" / "s1.png").unlink()
  assert cli.main(args) == 0
  assert "2 done before, 1 to sample" in capsys.readouterr().out
  for f, (mtime, data) in before.items():
    assert f.read_bytes() == data  # same seeds: the same images
    if "p0001" not in str(f):
      assert f.stat().st_mtime_ns == mtime  # done prompts untouched
  assert cli.main(args) == 0
  assert "3 done before, 0 to sample" in capsys.readouterr().out
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["label"] == "micro" and [p["category"] for p in manifest["prompts"]] == [
    "Colors",
    "Counting",
    "Colors",
  ]
  # Another prompt list into the same folder is refused, and so is another sample count.
  csv_file.write_text("Prompts,Category\na yellow circle,Colors\n")
  assert cli.main(args) == 2 and "another prompt list" in capsys.readouterr().err
  assert cli.main(args[:-4] + ["--samples_per_prompt", "3"]) == 2
  assert "resume with the same" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# tally


def _fake_key(n_prompts, categories, rng):
  return {
    "what": "drawbench page key",
    "page_id": "p1",
    "a": {"label": "A"},
    "b": {"label": "B"},
    "prompts": {
      str(i): {
        "left": "a" if rng.random() < 0.5 else "b",
        "prompt": f"prompt {i}",
        "category": categories[i % len(categories)],
      }
      for i in range(n_prompts)
    },
  }


def _blind(key, truth):
  """Answers a rater gives when the winner (a / b / tie) per prompt and question is `truth`."""
  answers = {}
  for pid, per_q in truth.items():
    left = key["prompts"][pid]["left"]
    answers[pid] = {
      q: ("indifferent" if w == "tie" else "left" if w == left else "right")
      for q, w in per_q.items()
    }
  return {"page_id": key["page_id"], "answers": answers}


def test_tally_equals_a_hand_count(tmp_path):
  rng = np.random.default_rng(0)
  key = _fake_key(12, ["Colors", "Text"], rng)
  winners = ["a", "b", "tie"]
  truth1 = {str(i): {q: winners[rng.integers(3)] for q in drawbench.QUESTIONS} for i in range(12)}
  truth2 = {
    str(i): {q: winners[rng.integers(3)] for q in drawbench.QUESTIONS} for i in range(0, 12, 2)
  }
  f1, f2 = tmp_path / "r1.json", tmp_path / "r2.json"
  f1.write_text(json.dumps(_blind(key, truth1) | {"rater": "r1"}))
  f2.write_text(json.dumps(_blind(key, truth2) | {"rater": "r2"}))
  result = drawbench.tally([f1, f2], key, resamples=200)
  for q in drawbench.QUESTIONS:
    for cat in ["Colors", "Text", "overall"]:
      votes = [
        t[pid][q]
        for t in (truth1, truth2)
        for pid in t
        if cat == "overall" or key["prompts"][pid]["category"] == cat
      ]
      n, a, b = len(votes), votes.count("a"), votes.count("b")
      got = result["questions"][q][cat]
      assert got["ratings"] == n
      assert got["a_preferred"] == pytest.approx(a / n) and got["b_preferred"] == pytest.approx(
        b / n
      )
      assert got["preference_for_a"] == pytest.approx((a + 0.5 * (n - a - b)) / n)
      lo, hi = got["ci95"]["preference_for_a"]
      assert lo <= got["preference_for_a"] <= hi
  assert result["raters"] == ["r1", "r2"]


def test_tally_intervals_cover_the_true_rate():
  """Raters who prefer A with probability 0.7 (no ties) on 150 prompts: the 95% interval covers
  0.7 in about 95% of 60 simulated studies, and is about as wide as the binomial one."""
  rng = np.random.default_rng(1)
  covered, widths = 0, []
  key = _fake_key(150, ["Colors", "Text", "Counting"], rng)
  for study in range(60):
    truth = {
      pid: {q: ("a" if rng.random() < 0.7 else "b") for q in drawbench.QUESTIONS}
      for pid in key["prompts"]
    }
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"imagen_jax_tally_{os.getpid()}_{study}.json"
    path.write_text(json.dumps(_blind(key, truth)))
    try:
      res = drawbench.tally([path], key, resamples=400, seed=study)["questions"]["fidelity"][
        "overall"
      ]
    finally:
      path.unlink()
    lo, hi = res["ci95"]["preference_for_a"]
    covered += lo <= 0.7 <= hi
    widths.append(hi - lo)
  assert covered >= 52  # 95% of 60 = 57; binomial slack
  binomial = 2 * 1.96 * np.sqrt(0.7 * 0.3 / 150)
  assert 0.8 * binomial < np.median(widths) < 1.2 * binomial


def test_tally_refuses_answers_of_another_page(tmp_path, capsys):
  rng = np.random.default_rng(0)
  key = _fake_key(3, ["Colors"], rng)
  (tmp_path / "key.json").write_text(json.dumps(key))
  (tmp_path / "ans.json").write_text(json.dumps({"page_id": "other", "answers": {}}))
  code = cli.main(
    [
      "eval",
      "drawbench-tally",
      str(tmp_path / "ans.json"),
      "--key",
      str(tmp_path / "key.json"),
      "--out",
      str(tmp_path / "t"),
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and "page 'other'" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------- page in
# Chromium


def _fake_samples(folder, label, color, prompts, n=4):
  """A folder as `eval drawbench` writes it, every image one flat colour (so the test can tell
  models apart)."""
  folder.mkdir()
  for p in prompts:
    (folder / p.folder).mkdir()
    for j in range(n):
      imio.save_png(folder / p.folder / f"s{j}.png", np.full((16, 16, 3), color, np.uint8))
    (folder / p.folder / "done.json").write_text(
      json.dumps({"prompt": p.prompt, "category": p.category})
    )
  (folder / "manifest.json").write_text(
    json.dumps(
      {
        "what": "drawbench samples",
        "label": label,
        "samples_per_prompt": n,
        "seed": 0,
        "prompts": [vars(p) for p in prompts],
      }
    )
  )


def test_rating_page_in_headless_chromium(tmp_path, capsys):
  if not os.path.exists(CHROMIUM):
    pytest.fail(
      f"{CHROMIUM} not found: the rating page is tested in Debian's chromium "
      "(apt-get install -y chromium; `make test` installs it when it can)"
    )
  from playwright.sync_api import sync_playwright

  prompts = [drawbench.Prompt(i, f"prompt number {i}", ["Colors", "Text"][i % 2]) for i in range(4)]
  red, blue = (220, 30, 30), (40, 70, 220)
  _fake_samples(tmp_path / "a", "model-red", red, prompts)
  _fake_samples(tmp_path / "b", "model-blue", blue, prompts)
  page_dir = tmp_path / "page"
  assert (
    cli.main(
      [
        "eval",
        "drawbench-page",
        "--a",
        str(tmp_path / "a"),
        "--b",
        str(tmp_path / "b"),
        "--out",
        str(page_dir),
      ]
    )
    == 0
  )
  key_path = tmp_path / "page-key.json"
  key = json.loads(key_path.read_text())
  html = (page_dir / "index.html").read_text()
  assert "model-red" not in html and "model-blue" not in html and str(tmp_path / "a") not in html
  assert len(list((page_dir / "img").glob("*.png"))) == 2 * 4 * 4

  def red_side(page):
    """Which side shows red images, read from the pixels of the files the page displays."""
    src = page.locator("#left img").first.get_attribute("src")
    pixel = imio.read_image(page_dir / src)[0, 0]
    return "left" if tuple(pixel) == red else "right"

  with sync_playwright() as pw:
    browser = pw.chromium.launch(
      executable_path=CHROMIUM,
      args=[
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    )
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto((page_dir / "index.html").as_uri())
    assert page.inner_text("#progress") == "0 of 4 prompts answered"
    assert page.locator("#left img").count() == 4 and page.locator("#right img").count() == 4
    # Prompt 0 by clicking: red is more photorealistic; indifferent on alignment.
    assert page.inner_text("#prompt") == "prompt number 0"
    side = red_side(page)
    page.click(f"[data-question=fidelity] button[data-choice={side}]")
    page.click("[data-question=alignment] button[data-choice=indifferent]")
    assert page.inner_text("#progress") == "1 of 4 prompts answered"
    # Prompt 1 by keys: red on fidelity (A/D), blue on alignment (J/L).
    page.keyboard.press("n")
    assert page.inner_text("#prompt") == "prompt number 1"
    side = red_side(page)
    page.keyboard.press("a" if side == "left" else "d")
    page.keyboard.press("l" if side == "left" else "j")
    page.fill("#rater", "tester")
    page.press("#rater", "Enter")  # leaves the field: keys rate again
    page.keyboard.press("ArrowRight")
    # Prompt 2: only fidelity, then a reload: nothing is lost and the page reopens where it was.
    side = red_side(page)
    page.keyboard.press("s")
    page.reload()
    assert page.inner_text("#prompt") == "prompt number 2"
    assert page.inner_text("#progress") == "2 of 4 prompts answered"
    assert page.input_value("#rater") == "tester"
    assert (
      page.locator("[data-question=fidelity] button.chosen").get_attribute("data-choice")
      == "indifferent"
    )
    page.keyboard.press("ArrowLeft")
    assert page.locator("[data-question=alignment] button.chosen").get_attribute("data-choice") == (
      "right" if red_side(page) == "left" else "left"
    )
    with page.expect_download() as dl:
      page.click("#download")
    answers_path = tmp_path / "answers.json"
    dl.value.save_as(answers_path)
    browser.close()

  answers = json.loads(answers_path.read_text())
  assert answers["page_id"] == key["page_id"] and answers["rater"] == "tester"
  assert set(answers["answers"]) == {"0", "1", "2"}
  out = tmp_path / "tally"
  assert (
    cli.main(
      ["eval", "drawbench-tally", str(answers_path), "--key", str(key_path), "--out", str(out)]
    )
    == 0
  )
  printed = capsys.readouterr().out
  result = json.loads((out / "tally.json").read_text())
  fid, ali = result["questions"]["fidelity"]["overall"], result["questions"]["alignment"]["overall"]
  # Fidelity: red (model A) twice, one indifferent. Alignment: one indifferent, blue (model B) once.
  assert (fid["ratings"], fid["a_preferred"], fid["indifferent"]) == (
    3,
    pytest.approx(2 / 3),
    pytest.approx(1 / 3),
  )
  assert (ali["ratings"], ali["indifferent"], ali["b_preferred"]) == (2, 0.5, 0.5)
  assert result["a"]["label"] == "model-red" and "model-red" in printed
  assert (out / "tally.png").read_bytes()[:4] == b"\x89PNG"
