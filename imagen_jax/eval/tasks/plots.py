"""Matplotlib figures of the evaluations (files only: the Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC_TITLES = {
  "all": "all correct",
  "color": "colours",
  "count": "count",
  "shape": "shapes",
  "relation": "left/right (left/right captions)",
}
THRESHOLDING_STYLE = {
  "none": ("tab:red", "o"),
  "static": ("tab:orange", "s"),
  "dynamic": ("tab:blue", "^"),
}
BASELINE_STYLE = (
  ("--", "0.55"),
  (":", "0.3"),
  ("-.", "0.7"),
)  # (line, grey) of the 1st, 2nd, 3rd baseline


def _baseline_style(b: int):
  return BASELINE_STYLE[b % len(BASELINE_STYLE)]


def _series(rows: Sequence[dict], stage: str, metric: str, x_of) -> Dict[str, List[tuple]]:
  out: Dict[str, List[tuple]] = {}
  for r in rows:
    if r["stage"] != stage:
      continue
    out.setdefault(r["thresholding"], []).append(
      (x_of(r), r["metrics"]["overall"][metric], r["guidance"])
    )
  return {k: sorted(v, key=lambda t: t[2]) for k, v in out.items()}


def alignment_vs_guidance(
  path: Path,
  result: dict,
  stage: str,
  metrics: Sequence[str],
  baselines: Sequence[dict] = (),
  title: Optional[str] = None,
) -> None:
  """One panel per metric: the metric against the guidance weight, a line per thresholding; each
  baseline's rows grey, each baseline in its own line style."""
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.2), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for thr, pts in _series(result["rows"], stage, metric, lambda r: r["guidance"]).items():
      color, marker = THRESHOLDING_STYLE.get(thr, ("k", "o"))
      ax.plot(
        [p[0] for p in pts],
        [p[1] for p in pts],
        marker=marker,
        color=color,
        label=f"{result['label']}: {thr}",
      )
    for b, base in enumerate(baselines):
      for thr, pts in _series(base["rows"], stage, metric, lambda r: r["guidance"]).items():
        ls, grey = _baseline_style(b)
        ax.plot(
          [p[0] for p in pts],
          [p[1] for p in pts],
          ls=ls,
          color=grey,
          marker=THRESHOLDING_STYLE.get(thr, ("k", "o"))[1],
          ms=3,
          label=f"{base['label']}: {thr}",
        )
    ax.set_title(METRIC_TITLES.get(metric, metric))
    ax.set_xlabel("guidance weight w")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("fraction of images")
  axes[0][-1].legend(fontsize=6, loc="best")
  fig.suptitle(title or f"{stage}: alignment against guidance", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def alignment_vs_fidelity(
  path: Path,
  result: dict,
  stage: str,
  alignment: str = "all",
  fidelity: str = "fidelity",
  baselines: Sequence[dict] = (),
  title: Optional[str] = None,
  fidelity_label: str = "fidelity proxy (fraction of palette pixels)",
  alignment_label: Optional[str] = None,
) -> None:
  """The Pareto view: alignment against fidelity, each thresholding's points joined in order of w
  and labelled."""
  fig, ax = plt.subplots(figsize=(5.2, 4.0))
  for b, res in enumerate([result] + list(baselines)):
    dashed = b > 0
    for thr, pts in _series(
      res["rows"], stage, alignment, lambda r: r["metrics"]["overall"][fidelity]
    ).items():
      color, marker = THRESHOLDING_STYLE.get(thr, ("k", "o"))
      ls, grey = _baseline_style(b - 1) if dashed else ("-", color)
      ax.plot(
        [p[0] for p in pts],
        [p[1] for p in pts],
        marker=marker,
        ls=ls,
        color=grey,
        label=f"{res['label']}: {thr}",
      )
      if not dashed:
        for x, y, w in pts:
          ax.annotate(f"{w:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel(fidelity_label)
  ax.set_ylabel(alignment_label or METRIC_TITLES.get(alignment, alignment))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  ax.set_title(title or f"{stage}: alignment against fidelity (labels: w)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
