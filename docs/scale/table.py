"""Render docs/scale.md's results table from the compile-check reports beside this file.

    python docs/scale/table.py            # prints the Markdown table

Each ``*.json`` here is one ``imagen-jax compile-check --json`` report; rows are ordered by stage,
then generation, then remat policy. Nothing is computed here that the report does not hold.
"""

from __future__ import annotations

import json
import pathlib
import sys

GIB = 2.0**30
STAGES = {"base": "64 base 2B", "sr256": "64→256 SR", "sr1024": "256→1024 SR"}
GENERATIONS = {"v4": "v4", "v5": "v5p", "v6e": "v6e"}


def _stage(path: pathlib.Path) -> str:
  return path.stem.split("_")[0]


def _row(path: pathlib.Path) -> str:
  r = json.loads(path.read_text())
  gen = GENERATIONS.get(r["topology"].split(":")[0], r["topology"])
  mesh = r["mesh"]
  mesh_text = f"data {mesh['data']} × fsdp {mesh['fsdp']}" + (
    f" × tensor {mesh['tensor']}" if mesh.get("tensor", 1) > 1 else ""
  )
  limit = r["hbm_limit"] / GIB
  layout = "" if r["scan_layers"] else ", unscanned"
  if r["memory"]:
    m = r["memory"]
    args, temps, total = (m[k] / GIB for k in ("arguments", "temporaries", "total"))
    memory = f"{args:.2f} / {temps:.2f} / **{total:.2f}** of {limit:.2f}"
    free = f"{100 * r['headroom']:.0f}%"
  else:
    memory, free = f"— of {limit:.2f}", "—"
  fits = "**yes**" if r["fits"] else "no"
  if r["error"]:
    err = r["error"]
    marker = "RESOURCE_EXHAUSTED: " if "RESOURCE" in err else ": "
    why = err.split(marker, 1)[-1]
    fits += f" ({why})"
  flops = f"{r['flops_per_chip']:.2e}" if r["flops_per_chip"] else "—"
  step = f"{1e3 * r['step_seconds_at_100pct']:.0f} ms" if r["step_seconds_at_100pct"] else "—"
  ips = f"{r['images_per_second_at_mfu']:,.0f}" if r["images_per_second_at_mfu"] else "—"
  how = "full topology"
  if r["measured_on"]:
    how = f"derived from {r['measured_on']['topology']}"
  how += f", {r['compile_seconds']:.0f} s"
  if r.get("peak_host_rss"):
    how += f", {r['peak_host_rss'] / GIB:.1f} GiB"
  cells = [
    STAGES.get(_stage(path), _stage(path)),
    f"{gen} {r['chips']}",
    mesh_text,
    f"{r['per_chip_batch']:g}",
    r["remat"] + layout,
    fits,
    memory,
    free,
    flops,
    step,
    ips,
    how,
  ]
  return "| " + " | ".join(cells) + " |"


def render(directory: pathlib.Path) -> str:
  paths = sorted(
    directory.glob("*.json"),
    key=lambda p: (list(STAGES).index(_stage(p)) if _stage(p) in STAGES else 9, p.stem),
  )
  head = (
    "| stage | pod | mesh | per chip | remat | fits | GiB per chip: args / temps / **total** of "
    "limit "
    "| free | FLOPs per chip | step at 100% MFU | img/s at 50% MFU | how: compiled on, compile "
    "time, host RAM |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
  )
  return "\n".join([head] + [_row(p) for p in paths])


if __name__ == "__main__":
  here = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent
  print(render(here))
