"""The `imagen-jax` command line: one module per command group; each command parses its flags, calls
one library function and prints. `main` is the one place where a `UserError` becomes one line on
stderr and exit code 2; any other exception keeps its traceback. Reference: `imagen-jax --help`,
docs/cli.md.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from imagen_jax.cli import common
from imagen_jax.cli import convert as convert_cli
from imagen_jax.cli import eval as eval_cli
from imagen_jax.cli import sample as sample_cli
from imagen_jax.cli import scale as scale_cli
from imagen_jax.cli import t5 as t5_cli
from imagen_jax.cli import train as train_cli

# The CLI's API: the gin modules of a training run (launch/ and tests use them) and its error.
from imagen_jax.cli.common import RUN_ONLY_MACROS, TRAIN_GIN_MODULES, UsageError

GROUPS = (t5_cli, convert_cli, train_cli, sample_cli, scale_cli, eval_cli)


def build_parser() -> common.Parser:
  """The whole command line."""
  parser = common.Parser(
    prog="imagen-jax",
    description="Imagen-style cascaded text-to-image diffusion in "
    "JAX/Flax: train, sample, evaluate, and check a stage at pod scale.",
    epilog="Bad input ends with one line on stderr and exit code 2; a training run stopped "
    "by non-finite steps exits 3; compile-check exits 1 when the step does not fit and 3 when "
    "it stopped before exhausting host RAM. Reference: docs/cli.md.",
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for group in GROUPS:
    group.add_parsers(sub)
  return parser


def _setup_gin(args) -> None:
  import importlib

  from imagen_jax import gin_utils

  if getattr(args, "gin_modules", None) is None:
    if args.gin_bindings:
      raise UsageError(f"{args.command} takes no --gin.KEY=VALUE bindings")
    return
  if not args.gin_file:
    raise UsageError(f"{args.command} needs at least one --gin_file (e.g. {args.gin_example})")
  for module in args.gin_modules:
    importlib.import_module(module)
  gin_utils.parse_gin(
    args.gin_file, args.gin_bindings, finalize=True, optional_macros=args.gin_optional
  )


def main(argv: Optional[List[str]] = None) -> int:
  """Runs one command; returns its exit code.

  Args:
    argv: the arguments (default: sys.argv[1:]).

  Returns:
    0 on success, 2 for a `UserError` (one line on stderr), or the command's own code.
  """
  from imagen_jax import startup

  startup.quiet()
  from imagen_jax.errors import UserError
  from imagen_jax.gin_utils import bindings_from_flags, from_gin_runtime_error

  full_argv = list(
    sys.argv[1:] if argv is None else argv
  )  # as given: a watched child runs it again
  args = None
  try:
    rest, bindings = bindings_from_flags(full_argv)
    args = build_parser().parse_args(rest)
    args.gin_bindings = bindings
    args.argv = full_argv
    try:
      _setup_gin(args)
      return args.fn(args)
    except RuntimeError as e:
      raise from_gin_runtime_error(e) or e
  except UserError as e:
    print(f"imagen-jax: error: {common.first_line(e)}", file=sys.stderr)
    return 2
  finally:
    if args is not None and getattr(args, "gin_modules", None) is not None:
      # Leave gin as a fresh process has it (unlocked, empty): a second main() in the same process
      # (a notebook,
      # a test) may import modules that register configurables, which gin refuses while the config
      # is locked.
      import gin

      gin.clear_config()
