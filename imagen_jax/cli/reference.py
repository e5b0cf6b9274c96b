"""docs/cli.md, the command-line reference, generated from the parser's own `--help` text.

`python -m imagen_jax.cli.reference > docs/cli.md` (or `make docs`); a test keeps the file up to
date.
"""

from __future__ import annotations

import argparse
import os
from typing import List


def _commands(parser: argparse.ArgumentParser, prefix: str) -> List[tuple]:
  out = [(prefix, parser)]
  for action in parser._actions:  # argparse has no public walk over sub-commands
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        out += _commands(sub, f"{prefix} {name}")
  return out


def markdown() -> str:
  """The reference: every command's help, in the order of `imagen-jax --help`."""
  from imagen_jax.cli import build_parser

  old = os.environ.get("COLUMNS")
  os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the file must not depend on it
  try:
    parts = [
      "# imagen-jax command line\n",
      "Generated from `imagen-jax --help` by `python -m imagen_jax.cli.reference` (`make docs`); "
      "do not edit by hand.\n",
    ]
    for name, parser in _commands(build_parser(), "imagen-jax"):
      parts.append(f"## {name}\n\n```\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)
  finally:
    if old is None:
      os.environ.pop("COLUMNS", None)
    else:
      os.environ["COLUMNS"] = old


if __name__ == "__main__":
  print(markdown(), end="")
