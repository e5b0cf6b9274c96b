"""DrawBench (Saharia et al. 2022, §4.2): the prompt CSV, resumable sampling of a model on it, a
blinded side-by-side rating page (static, file://) and the tally of raters' answers with bootstrap
intervals over prompts. Folders and page: docs/outputs.md.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from imagen_jax import files
from imagen_jax.errors import UserError

QUESTIONS = ("fidelity", "alignment")
QUESTION_TEXT = {
  "fidelity": "Which set of images is more photorealistic?",
  "alignment": "Which set of images better represents the text caption?",
}
CHOICES = ("left", "indifferent", "right")
MANIFEST = "manifest.json"


class DrawBenchError(UserError):
  """Bad DrawBench input (CSV, sample folders, answers, key): one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  index: int
  prompt: str
  category: str

  @property
  def folder(self) -> str:
    return f"p{self.index:04d}"


def load_prompts(path) -> List[Prompt]:
  """The DrawBench CSV (`Prompts,Category` header): prompts in file order; categories stripped of
  spaces."""
  try:
    text = Path(path).read_text(encoding="utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise DrawBenchError(f"cannot read DrawBench CSV {path}: {e}") from None
  reader = csv.reader(io.StringIO(text))
  header = next((row for row in reader if any(c.strip() for c in row)), None)
  cols = [c.strip().lower() for c in header] if header else []
  if "prompts" not in cols or "category" not in cols:
    raise DrawBenchError(f"{path}: expected a header with columns Prompts,Category, got {header}")
  ip, ic = cols.index("prompts"), cols.index("category")
  out: List[Prompt] = []
  for line, row in enumerate(reader, start=2):
    if not any(c.strip() for c in row):
      continue
    if len(row) <= max(ip, ic):
      raise DrawBenchError(
        f"{path}: row {line} has {len(row)} column(s), expected Prompts and Category: {row}"
      )
    prompt, category = row[ip].strip(), row[ic].strip()
    if not prompt:
      raise DrawBenchError(f"{path}: row {line} has an empty prompt")
    out.append(Prompt(len(out), prompt, category or "(none)"))
  if not out:
    raise DrawBenchError(f"{path}: no prompts")
  return out


# ------------------------------------------------------------------------------------------
# sampling


def done_prompts(out: Path, prompts: Sequence[Prompt], samples_per_prompt: int) -> List[int]:
  """Indices of prompts whose folder is complete (done marker naming the same prompt, every image
  present)."""
  done = []
  for p in prompts:
    marker = out / p.folder / "done.json"
    if not marker.is_file():
      continue
    rec = files.read_json(marker, "done marker")
    if rec.get("prompt") != p.prompt:
      raise DrawBenchError(
        f"{out}: {p.folder} holds samples of {rec.get('prompt')!r}, not {p.prompt!r}: "
        "this folder was made from another prompt list"
      )
    if all((out / p.folder / f"s{j}.png").is_file() for j in range(samples_per_prompt)):
      done.append(p.index)
  return done


def sample_prompts(
  cascade,
  prompts: Sequence[Prompt],
  out_dir,
  *,
  samples_per_prompt: int = 8,
  seed: int = 0,
  label: Optional[str] = None,
  command: Optional[List[str]] = None,
  negative_prompt: Optional[str] = None,
  log=print,
) -> dict:
  """Samples every prompt not done yet (see the module doc); returns the manifest.
  negative_prompt: one negative prompt for every prompt (guidance's unconditional half)."""
  from imagen_jax import images as imio

  if samples_per_prompt < 1:
    raise DrawBenchError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  manifest_path = out / MANIFEST
  stages = cascade.stages
  manifest = {
    "what": "drawbench samples",
    "label": label or out.name,
    "samples_per_prompt": samples_per_prompt,
    "seed": seed,
    "prompts": [dataclasses.asdict(p) | {"folder": p.folder} for p in prompts],
    "stages": [
      {
        "name": st.spec.name,
        "network": st.description,
        "checkpoint": st.checkpoint,
        "setting": vars(st.setting),
      }
      for st in stages
    ],
    "seed_rule": "image j of prompt k: seed + k * samples_per_prompt + j",
    "command": command,
  }
  if manifest_path.is_file():
    old = files.read_json(manifest_path, "manifest")
    if old.get("samples_per_prompt") != samples_per_prompt or old.get("seed") != seed:
      raise DrawBenchError(
        f"{out} was sampled with samples_per_prompt {old.get('samples_per_prompt')} and seed "
        f"{old.get('seed')}; resume with the same or choose a new out_dir"
      )
    manifest["label"] = old.get("label", manifest["label"]) if label is None else label
  files.write_json(manifest_path, manifest)
  done = set(done_prompts(out, prompts, samples_per_prompt))
  todo = [p for p in prompts if p.index not in done]
  log(
    f"drawbench: {len(prompts)} prompts, {len(done)} done before, {len(todo)} to sample "
    f"({samples_per_prompt} images each) into {out}"
  )
  if not todo:
    return manifest
  text = cascade.encode([p.prompt for p in todo])
  negative = None
  if negative_prompt is not None:
    negative = cascade.encode_negative([negative_prompt], len(todo), warn=log)
  per_call = max(1, stages[0].batch_size // samples_per_prompt)
  t0, n_images = time.perf_counter(), 0
  for c in range(0, len(todo), per_call):
    chunk = list(range(c, min(c + per_call, len(todo))))
    idx = np.repeat(np.array(chunk), samples_per_prompt)
    seeds = [
      seed + todo[k].index * samples_per_prompt + j
      for k in chunk
      for j in range(samples_per_prompt)
    ]
    final = cascade.generate(
      text,
      idx,
      seeds,
      [st.setting for st in stages],
      guided=[None] * len(stages),
      negative=negative,
    )[-1]
    for n, k in enumerate(chunk):
      p = todo[k]
      folder = out / p.folder
      folder.mkdir(exist_ok=True)
      for j in range(samples_per_prompt):
        imio.save_png(folder / f"s{j}.png", final[n * samples_per_prompt + j])
      files.write_json(
        folder / "done.json",
        {
          "prompt": p.prompt,
          "category": p.category,
          "seeds": seeds[n * samples_per_prompt : (n + 1) * samples_per_prompt],
        },
      )
    n_images += len(idx)
    log(
      f"drawbench: {min(c + per_call, len(todo))}/{len(todo)} prompts, "
      f"{n_images / (time.perf_counter() - t0):.2f} images/s"
    )
  return manifest


# ----------------------------------------------------------------------------------------------
# page


def read_samples(folder) -> dict:
  """A sample folder's manifest with only its done prompts."""
  d = Path(folder)
  m = d / MANIFEST
  if not m.is_file():
    raise DrawBenchError(
      f"{folder}: no {MANIFEST} (not a folder written by `imagen-jax eval drawbench`)"
    )
  manifest = files.read_json(m, "manifest")
  prompts = [Prompt(p["index"], p["prompt"], p["category"]) for p in manifest["prompts"]]
  done = set(done_prompts(d, prompts, manifest["samples_per_prompt"]))
  manifest["done"] = [p for p in prompts if p.index in done]
  return manifest


def default_key_path(page_dir) -> Path:
  page = Path(page_dir)
  return page.with_name(page.name + "-key.json")


def write_page(
  a_dir, b_dir, page_dir, *, key_path=None, seed: Optional[int] = None, title: str = "DrawBench"
) -> dict:
  """Writes the rating page for the prompts both folders hold; returns the key (also written to
  key_path)."""
  a, b = read_samples(a_dir), read_samples(b_dir)
  b_by_text = {(p.prompt, p.category): p for p in b["done"]}
  pairs = [
    (p, b_by_text[(p.prompt, p.category)]) for p in a["done"] if (p.prompt, p.category) in b_by_text
  ]
  if not pairs:
    raise DrawBenchError(f"{a_dir} and {b_dir} have no sampled prompt in common")
  page = Path(page_dir)
  if page.exists() and any(page.iterdir()):
    raise DrawBenchError(f"out_dir {page} is not empty; choose a new directory")
  key_path = Path(key_path) if key_path else default_key_path(page)
  (page / "img").mkdir(parents=True)
  rng = np.random.default_rng(seed)
  page_id = secrets.token_hex(6)
  items, key_prompts = [], {}
  for n, (pa, pb) in enumerate(pairs):
    sets = {
      "a": [Path(a_dir) / pa.folder / f"s{j}.png" for j in range(a["samples_per_prompt"])],
      "b": [Path(b_dir) / pb.folder / f"s{j}.png" for j in range(b["samples_per_prompt"])],
    }
    left = "a" if rng.random() < 0.5 else "b"
    right = "b" if left == "a" else "a"
    shown = {}
    for side, model in (("left", left), ("right", right)):
      names = []
      for src in sets[model]:
        name = f"img/{secrets.token_hex(8)}.png"
        shutil.copyfile(src, page / name)
        names.append(name)
      shown[side] = names
    items.append({"id": n, "prompt": pa.prompt, "category": pa.category, **shown})
    key_prompts[str(n)] = {"left": left, "prompt": pa.prompt, "category": pa.category}
  data = {
    "page_id": page_id,
    "title": title,
    "questions": [{"id": q, "text": QUESTION_TEXT[q]} for q in QUESTIONS],
    "items": items,
  }
  (page / "index.html").write_text(
    _PAGE.replace("__TITLE__", html.escape(title)).replace(
      "__DATA__", json.dumps(data).replace("</", "<\\/")
    ),
    encoding="utf-8",
  )
  key = {
    "what": "drawbench page key",
    "page_id": page_id,
    "page": str(page),
    "a": {"label": a.get("label"), "dir": str(a_dir)},
    "b": {"label": b.get("label"), "dir": str(b_dir)},
    "prompts": key_prompts,
  }
  key_path.parent.mkdir(parents=True, exist_ok=True)
  files.write_json(key_path, key)
  return key


# ---------------------------------------------------------------------------------------------
# tally


def unblind(answer_files: Sequence, key: dict) -> List[dict]:
  """[{prompt id, category, rater, question, winner: 'a' | 'b' | 'tie'}] from answer downloads
  and the key."""
  out = []
  for f in answer_files:
    ans = files.read_json(Path(f), "answers")
    if not isinstance(ans, dict) or "answers" not in ans:
      raise DrawBenchError(f"{f}: not a DrawBench answers file (no 'answers')")
    if ans.get("page_id") != key["page_id"]:
      raise DrawBenchError(
        f"{f}: answers to page {ans.get('page_id')!r}, but the key is for page {key['page_id']!r}"
      )
    rater = ans.get("rater") or Path(f).stem
    for pid, qs in ans["answers"].items():
      if pid not in key["prompts"]:
        raise DrawBenchError(f"{f}: prompt id {pid} is not on the page")
      info = key["prompts"][pid]
      for q in QUESTIONS:
        choice = (qs or {}).get(q)
        if choice is None:
          continue
        if choice not in CHOICES:
          raise DrawBenchError(f"{f}: prompt {pid} {q}: {choice!r} is not one of {CHOICES}")
        right = "b" if info["left"] == "a" else "a"
        winner = {"left": info["left"], "right": right, "indifferent": "tie"}[choice]
        out.append(
          {
            "prompt": int(pid),
            "category": info["category"],
            "rater": rater,
            "question": q,
            "winner": winner,
          }
        )
  return out


def _rates(rows: Sequence[dict]) -> np.ndarray:
  n = len(rows)
  a = sum(r["winner"] == "a" for r in rows)
  b = sum(r["winner"] == "b" for r in rows)
  return (
    np.array([a / n, (n - a - b) / n, b / n, (a + 0.5 * (n - a - b)) / n])
    if n
    else np.full(4, np.nan)
  )


def _bootstrap(rows: Sequence[dict], rng: np.random.Generator, resamples: int) -> np.ndarray:
  """(resamples, 4) rates over prompts resampled with replacement (a prompt's answers stay
  together)."""
  by_prompt: Dict[int, List[dict]] = {}
  for r in rows:
    by_prompt.setdefault(r["prompt"], []).append(r)
  groups = list(by_prompt.values())
  counts = np.array(
    [[sum(r["winner"] == w for r in g) for w in ("a", "tie", "b")] for g in groups], np.float64
  )
  picks = rng.integers(0, len(groups), size=(resamples, len(groups)))
  tot = counts[picks].sum(1)  # (resamples, 3)
  n = tot.sum(1, keepdims=True)
  a, tie, b = (tot / n).T
  return np.stack([a, tie, b, a + 0.5 * tie], 1)


def tally(answer_files: Sequence, key: dict, *, resamples: int = 2000, seed: int = 0) -> dict:
  """Preference rates per question, per category and overall, with 95% bootstrap intervals (see
  module doc)."""
  rows = unblind(answer_files, key)
  if not rows:
    raise DrawBenchError("the answers hold no rating")
  rng = np.random.default_rng(seed)
  categories = sorted({r["category"] for r in rows})
  result = {
    "a": key["a"],
    "b": key["b"],
    "page_id": key["page_id"],
    "raters": sorted({r["rater"] for r in rows}),
    "resamples": resamples,
    "questions": {},
  }
  for q in QUESTIONS:
    per = {}
    for cat in categories + ["overall"]:
      sel = [r for r in rows if r["question"] == q and (cat == "overall" or r["category"] == cat)]
      if not sel:
        continue
      point = _rates(sel)
      boot = _bootstrap(sel, rng, resamples)
      lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
      per[cat] = {
        "ratings": len(sel),
        "prompts": len({r["prompt"] for r in sel}),
        **{
          name: float(point[i])
          for i, name in enumerate(
            ("a_preferred", "indifferent", "b_preferred", "preference_for_a")
          )
        },
        "ci95": {
          name: [float(lo[i]), float(hi[i])]
          for i, name in enumerate(
            ("a_preferred", "indifferent", "b_preferred", "preference_for_a")
          )
        },
      }
    result["questions"][q] = per
  return result


def tally_files(
  answer_files: Sequence, key_path, out_dir, *, resamples: int = 2000, seed: int = 0
) -> dict:
  """`tally` of answer files against a key file, written as out_dir/tally.json and the bar chart
  tally.png.

  Args:
    answer_files: answer downloads of the rating page.
    key_path: the page's key file (written beside the page).
    out_dir: the output folder.
    resamples: bootstrap resamples.
    seed: bootstrap seed.

  Returns:
    The tally.
  """
  key = files.read_json(key_path, "key")
  if not isinstance(key, dict) or key.get("what") != "drawbench page key":
    raise DrawBenchError(f"{key_path}: not a key written by the DrawBench rating page")
  result = tally(answer_files, key, resamples=resamples, seed=seed)
  out = Path(out_dir)
  files.write_json(out / "tally.json", result)
  plot_tally(out / "tally.png", result)
  return result


def format_tally(result: dict) -> str:
  a, b = result["a"]["label"], result["b"]["label"]
  lines = [
    f"DrawBench: A = {a}, B = {b}; raters: {', '.join(result['raters'])}; 95% intervals: "
    "bootstrap over "
    f"prompts ({result['resamples']} resamples)",
    "",
  ]
  for q, per in result["questions"].items():
    lines.append(f"{q}: {QUESTION_TEXT[q]}")
    lines.append(
      f"  {'category':<24} {'ratings':>7}  {'prefer A':>8}  {'indiff.':>7}  {'prefer B':>8}  "
      f"{'pref. for A (ties half)':>24}  95% CI"
    )
    for cat, r in per.items():
      lo, hi = r["ci95"]["preference_for_a"]
      lines.append(
        f"  {cat:<24} {r['ratings']:>7}  {r['a_preferred']:>8.1%}  {r['indifferent']:>7.1%}  "
        f"{r['b_preferred']:>8.1%}  {r['preference_for_a']:>24.1%}  [{lo:.1%}, {hi:.1%}]"
      )
    lines.append("")
  return "\n".join(lines)


def plot_tally(path, result: dict) -> None:
  """Bars like the paper's Fig. 3: per category and overall, the preference rate for A per
  question, with the 95% intervals; 50% = no preference."""
  from imagen_jax.eval.tasks import plots

  plt = plots.plt
  cats = list(result["questions"][QUESTIONS[0]])
  fig, axes = plt.subplots(
    1, len(QUESTIONS), figsize=(5.5 * len(QUESTIONS), 0.45 * len(cats) + 1.4), sharey=True
  )
  y = np.arange(len(cats))
  for ax, q in zip(np.atleast_1d(axes), QUESTIONS):
    per = result["questions"][q]
    vals = np.array([per.get(c, {}).get("preference_for_a", np.nan) for c in cats])
    lo = np.array([per[c]["ci95"]["preference_for_a"][0] if c in per else np.nan for c in cats])
    hi = np.array([per[c]["ci95"]["preference_for_a"][1] if c in per else np.nan for c in cats])
    ax.barh(y, 100 * vals, color=["tab:gray" if c == "overall" else "tab:blue" for c in cats])
    ax.errorbar(
      100 * vals, y, xerr=[100 * (vals - lo), 100 * (hi - vals)], fmt="none", ecolor="k", capsize=3
    )
    ax.axvline(50, color="k", lw=0.8, ls="--")
    ax.set_xlim(0, 100)
    ax.set_yticks(y, cats)
    ax.invert_yaxis()
    ax.set_xlabel(f"% preference for A ({result['a']['label']})")
    ax.set_title(f"{q}: {QUESTION_TEXT[q]}", fontsize=8)
  fig.suptitle(f"DrawBench: A = {result['a']['label']} vs B = {result['b']['label']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0 1.5em 2em; background: #fafafa; color: #222; }
 header { display: flex; gap: 1.5em; align-items: baseline; flex-wrap: wrap; }
 #prompt { font-size: 1.35em; margin: .6em 0; padding: .5em .8em; background: #fff; border: 1px solid #ccc; }
 .sets { display: flex; gap: 2em; }
 .set { flex: 1; background: #fff; border: 1px solid #ccc; padding: .5em; }
 .set h2 { margin: 0 0 .4em; font-size: 1.1em; }
 .imgs { display: grid; grid-template-columns: repeat(4, 1fr); gap: 4px; }
 .imgs img { width: 100%; image-rendering: pixelated; }
 .q { margin: .8em 0; } .q button { font-size: 1em; margin-right: .5em; padding: .35em 1em; }
 .q button.chosen { background: #2a6; color: #fff; border-color: #2a6; }
 kbd { border: 1px solid #999; border-radius: 3px; padding: 0 .3em; font-size: .85em; }
 #progress { font-weight: bold; } .hint { color: #666; font-size: .9em; }
</style></head>
<body>
<header><h1>__TITLE__</h1>
 <span id="progress"></span>
 <label>Rater: <input id="rater" size="12"></label>
 <button id="download">Download answers (JSON)</button>
</header>
<p class="hint">Keys: fidelity <kbd>A</kbd> left / <kbd>S</kbd> indifferent / <kbd>D</kbd> right;
 alignment <kbd>J</kbd> left / <kbd>K</kbd> indifferent / <kbd>L</kbd> right; <kbd>N</kbd> or <kbd>&rarr;</kbd> next,
 <kbd>P</kbd> or <kbd>&larr;</kbd> back. Answers are kept in this browser as you go.</p>
<div id="counter"></div>
<div id="prompt"></div>
<div class="sets">
 <div class="set"><h2>Set A (left)</h2><div class="imgs" id="left"></div></div>
 <div class="set"><h2>Set B (right)</h2><div class="imgs" id="right"></div></div>
</div>
<div id="questions"></div>
<p><button id="prev">&larr; Back</button> <button id="next">Next &rarr;</button></p>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const STORE = "drawbench:" + DATA.page_id;
const CHOICES = [["left", "A (left)"], ["indifferent", "Indifferent"], ["right", "B (right)"]];
const KEYS = {fidelity: {a: "left", s: "indifferent", d: "right"},
              alignment: {j: "left", k: "indifferent", l: "right"}};
let state = {rater: "", pos: 0, answers: {}};
try { const saved = JSON.parse(localStorage.getItem(STORE)); if (saved && saved.answers) state = saved; } catch (e) {}
function save() { localStorage.setItem(STORE, JSON.stringify(state)); }
function complete(id) { const a = state.answers[id]; return a && DATA.questions.every(q => a[q.id]); }
function choose(q, value) {
  const id = DATA.items[state.pos].id;
  state.answers[id] = Object.assign({}, state.answers[id] || {}, {[q]: value});
  save(); render();
}
function go(delta) { state.pos = Math.min(DATA.items.length - 1, Math.max(0, state.pos + delta)); save(); render(); }
function render() {
  const item = DATA.items[state.pos];
  document.getElementById("counter").textContent = "Prompt " + (state.pos + 1) + " of " + DATA.items.length;
  document.getElementById("prompt").textContent = item.prompt;
  for (const side of ["left", "right"]) {
    const box = document.getElementById(side); box.innerHTML = "";
    for (const src of item[side]) { const im = document.createElement("img"); im.src = src; im.alt = side; box.appendChild(im); }
  }
  const qs = document.getElementById("questions"); qs.innerHTML = "";
  const ans = state.answers[item.id] || {};
  for (const q of DATA.questions) {
    const div = document.createElement("div"); div.className = "q"; div.dataset.question = q.id;
    const p = document.createElement("p"); p.textContent = q.text; div.appendChild(p);
    for (const [value, text] of CHOICES) {
      const b = document.createElement("button"); b.textContent = text; b.dataset.choice = value;
      if (ans[q.id] === value) b.className = "chosen";
      b.onclick = () => choose(q.id, value); div.appendChild(b);
    }
    qs.appendChild(div);
  }
  const n = DATA.items.filter(it => complete(it.id)).length;
  document.getElementById("progress").textContent = n + " of " + DATA.items.length + " prompts answered";
  document.getElementById("rater").value = state.rater;
}
document.getElementById("rater").oninput = e => { state.rater = e.target.value; save(); };
document.getElementById("rater").onkeydown = e => { if (e.key === "Enter" || e.key === "Escape") e.target.blur(); };
document.getElementById("prev").onclick = () => go(-1);
document.getElementById("next").onclick = () => go(1);
document.getElementById("download").onclick = () => {
  const out = {page_id: DATA.page_id, rater: state.rater, saved: new Date().toISOString(), answers: state.answers};
  const url = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], {type: "application/json"}));
  const a = document.createElement("a"); a.href = url;
  a.download = "drawbench-answers-" + DATA.page_id + (state.rater ? "-" + state.rater : "") + ".json";
  document.body.appendChild(a); a.click(); a.remove();
};
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  for (const q of DATA.questions) if (KEYS[q.id] && KEYS[q.id][k]) { choose(q.id, KEYS[q.id][k]); return; }
  if (k === "n" || e.key === "ArrowRight") go(1);
  else if (k === "p" || e.key === "ArrowLeft") go(-1);
});
render();
</script></body></html>
"""
