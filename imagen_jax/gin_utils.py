"""Parsing gin files the t5x way: `--gin_file` paths relative to `gin_configs/`, then
`--gin.KEY=VALUE`.

Every gin problem a user can cause (a file that is not found or does not parse, a value gin cannot
parse, an unknown configurable or parameter, a required value left unset) is raised as a
`GinConfigError` whose message is one line naming what the user wrote or must write; the CLI prints
it and exits 2.
"""

from __future__ import annotations

import logging
import os
import tokenize
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import gin

from imagen_jax.errors import UserError


class GinConfigError(UserError):
  """A gin file, binding or required value the user has to fix; the message is one line."""


def configs_dir() -> Optional[Path]:
  """The shipped gin configs: `imagen_jax/gin_configs/` in an installed wheel (package data
  mapped from the repository's top-level folder, see pyproject.toml), the repository's
  `gin_configs/` in a source tree or an editable install."""
  here = Path(__file__).resolve().parent
  for candidate in (here / "gin_configs", here.parent / "gin_configs"):
    if candidate.is_dir():
      return candidate
  return None


class _QuietGinIncludes(logging.Filter):
  """gin first looks an `include` up as a Python package and logs 'Path not found' before it
  tries the search paths, where the file is; that message is noise."""

  def filter(self, record):
    return not (record.levelno == logging.ERROR and str(record.msg).startswith("Path not found"))


def search_paths(extra: Iterable[str] = ()) -> list:
  paths = [str(p) for p in extra]
  shipped = configs_dir()
  if shipped is not None:
    paths.append(str(shipped))
  paths.append(os.getcwd())
  return paths


def split_binding(binding: str) -> Tuple[str, str]:
  key, _, value = binding.partition("=")
  return key.strip(), value.strip()


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _binding_error(binding: str, e: BaseException) -> GinConfigError:
  key, value = split_binding(binding)
  flag = f"--gin.{key}={value}"
  if isinstance(e, (SyntaxError, tokenize.TokenError)):
    hint = "gin values are Python literals, @configurables or %MACROS"
    if value[:1] not in ("'", '"'):
      hint += f"; string values need quotes, as in --gin.{key}=\"'{value}'\""
    return GinConfigError(f"gin cannot parse the value of {flag}: {hint}")
  return GinConfigError(f"{flag}: {_first_line(e)}")


def _file_error(gin_file: str, e: BaseException) -> GinConfigError:
  if isinstance(e, SyntaxError):
    where = (
      f"{e.filename or gin_file}, line {e.lineno}" if e.lineno else str(e.filename or gin_file)
    )
    text = f": {e.text.strip()}" if e.text else ""
    return GinConfigError(f"gin file {where} does not parse ({str(e.msg).split(' (')[0]}){text}")
  if isinstance(e, OSError):
    return GinConfigError(f"gin file not found: {gin_file} (looked in {', '.join(search_paths())})")
  lines = [l.strip() for l in str(e).strip().splitlines()]
  where = next((l for l in lines[1:] if l.startswith("In file")), f"in {gin_file}")
  return GinConfigError(f"{lines[0] if lines else type(e).__name__} ({where})")


def parse_gin(
  gin_files: Iterable[str] = (),
  bindings: Iterable[str] = (),
  extra_search_paths: Iterable[str] = (),
  finalize: bool = False,
  clear: bool = True,
  optional_macros: Iterable[str] = (),
) -> None:
  """Parses gin files (found in the search paths), then each binding in order; clears previous
  config.

  Raises `GinConfigError` (one line, naming the file or the `--gin.KEY=VALUE` at fault) for anything
  the user has to fix. optional_macros: required macros the caller does not use (compile-check needs
  no MODEL_DIR).
  """
  if clear:
    gin.clear_config()
  for p in search_paths(extra_search_paths):
    gin.add_config_file_search_path(p)
  quiet = _QuietGinIncludes()
  root = logging.getLogger()
  root.addFilter(quiet)
  try:
    for gin_file in gin_files:
      try:
        gin.parse_config_file(gin_file)
      except (SyntaxError, tokenize.TokenError, OSError, ValueError) as e:
        raise _file_error(gin_file, e) from None
    for binding in bindings:
      try:
        gin.parse_config(binding)
      except (SyntaxError, tokenize.TokenError, ValueError) as e:
        raise _binding_error(binding, e) from None
    if finalize:
      for m in required_macros_left():
        if m in set(optional_macros):
          gin.parse_config(f"{m} = None")
      unset = required_macros_left()
      if unset:
        raise required_values_error(unset)
      try:
        gin.finalize()
      except ValueError as e:
        raise GinConfigError(_first_line(e)) from None
  finally:
    root.removeFilter(quiet)


def required_values_error(names) -> GinConfigError:
  """The one message for required gin values left unset, naming what the user binds."""
  return GinConfigError(
    f"required gin value(s) not set: {', '.join(names)} (set them in a gin file or with "
    f"--gin.{names[0]}=VALUE; strings in quotes)"
  )


def required_macros_left() -> List[str]:
  """Macros still bound to %gin.REQUIRED (the values a run's header says the user must set), in
  order."""
  import re

  return re.findall(r"^(\S+) = %gin\.REQUIRED\s*$", gin.config_str(), flags=re.MULTILINE)


def bindings_from_flags(flags: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Pulls t5x-style `--gin.KEY=VALUE` flags out of argv; returns (other args, ['KEY = VALUE',
  ...]).

  A `--gin.KEY` without `=VALUE` is a `GinConfigError`.
  """
  rest, bindings = [], []
  for a in flags:
    if a.startswith("--gin."):
      key, eq, value = a[len("--gin.") :].partition("=")
      if not eq or not key.strip():
        raise GinConfigError(
          f"{a} has no value: write --gin.KEY=VALUE (string values in quotes, as in "
          f"--gin.{key or 'KEY'}=\"'text'\")"
        )
      bindings.append(f"{key} = {value}")
    else:
      rest.append(a)
  return rest, bindings


def _macro_name(ref) -> Optional[str]:
  """'X' for a reference to the macro %X, else None."""
  selector = getattr(ref, "scoped_selector", "")
  if selector.endswith("gin.macro") and "/" in selector:
    return selector.rsplit("/", 1)[0]
  return None


def _is_required_ref(ref) -> bool:
  return getattr(ref, "scoped_selector", "").startswith("gin.REQUIRED")


def _what_to_set(configurable: str, parameter: str) -> str:
  """What the user has to bind so that `configurable.parameter` gets a value: the last macro of
  the chain `configurable.parameter = %A`, `A = %B`, `B = %gin.REQUIRED` (here B), or the
  parameter itself."""
  try:
    value = gin.query_parameter(f"{configurable}.{parameter}")
  except ValueError:
    return f"{configurable}.{parameter}"
  name = None
  for _ in range(32):  # macro chains are short; the bound guards against a cycle
    macro = _macro_name(value)
    if macro is None:
      break
    name = macro
    try:
      value = gin.query_parameter(f"{macro}/gin.macro.value")
    except ValueError:
      break
    if _is_required_ref(value):
      break
  return name or f"{configurable}.{parameter}"


def require(configurable: str, **values) -> None:
  """Raises a `GinConfigError` naming what the user must set (a macro such as VOCAB, or a binding
  such as `cache_embeddings.output_dir`) for every argument of `configurable` still equal to
  gin.REQUIRED."""
  missing = [k for k, v in values.items() if v is gin.REQUIRED]
  if missing:
    names = list(dict.fromkeys(_what_to_set(configurable, k) for k in missing))
    raise required_values_error(names)


def from_gin_runtime_error(e: RuntimeError) -> Optional[GinConfigError]:
  """gin's own error for a configurable called with a parameter whose default is gin.REQUIRED and
  which no binding sets ("Required bindings for `f` not provided in config: ['a']"), as a
  `GinConfigError` naming `f.a`; None for any other RuntimeError."""
  import ast
  import re

  m = re.match(r"Required bindings for `([^`]+)` not provided in config: (\[.*\])", str(e))
  if not m:
    return None
  try:
    params = ast.literal_eval(m.group(2))
  except (ValueError, SyntaxError):
    params = [m.group(2)]
  names = [f"{m.group(1)}.{p}" for p in params]
  return required_values_error(names)
