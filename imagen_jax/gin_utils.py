"""Parsing gin files the t5x way: `--gin_file` paths relative to `gin_configs/`, then `--gin.KEY=VALUE`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import gin

# gin_configs/ sits beside the package in the repository (an editable install keeps it there).
GIN_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "gin_configs"


class _QuietGinIncludes(logging.Filter):
  """gin first looks an `include` up as a Python package and logs 'Path not found' before it tries the
  search paths, where the file is; that message is noise."""

  def filter(self, record):
    return not (record.levelno == logging.ERROR and str(record.msg).startswith("Path not found"))


def search_paths(extra: Iterable[str] = ()) -> list:
  paths = [str(p) for p in extra]
  if GIN_CONFIGS_DIR.is_dir():
    paths.append(str(GIN_CONFIGS_DIR))
  paths.append(os.getcwd())
  return paths


def parse_gin(gin_files: Iterable[str] = (), bindings: Iterable[str] = (), extra_search_paths: Iterable[str] = (),
              finalize: bool = False, clear: bool = True) -> None:
  """Parses gin files (found in the search paths) and bindings; clears previous config by default."""
  if clear:
    gin.clear_config()
  for p in search_paths(extra_search_paths):
    gin.add_config_file_search_path(p)
  quiet = _QuietGinIncludes()
  root = logging.getLogger()
  root.addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=finalize)
  finally:
    root.removeFilter(quiet)


def require(**values) -> None:
  """Raises a clear error for arguments still bound to gin.REQUIRED (e.g. through an unset macro)."""
  missing = sorted(k for k, v in values.items() if v is gin.REQUIRED)
  if missing:
    raise ValueError(f"required gin value(s) not set: {', '.join(missing)} (bind them in a gin file or with "
                     "--gin.KEY=VALUE)")
