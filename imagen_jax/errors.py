"""The one base class of errors a user causes and must fix (bad input, configuration or files).

The command line maps every `UserError` to one line on stderr and exit code 2 in one place
(`imagen_jax.cli.main`); any other exception is a bug and keeps its traceback. Messages name the
library's parameters, never command-line flags: only `imagen_jax.cli` speaks in flags.
"""

from __future__ import annotations


class UserError(ValueError):
  """Input the user has to fix; the message's first line says what and how.

  A `ValueError`, so that callers which validated arguments with `except ValueError` keep working.
  """


class ConfigError(UserError):
  """A configuration value out of range, or an unknown name (sampler, schedule, remat policy,
  ...)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named does not exist."""
