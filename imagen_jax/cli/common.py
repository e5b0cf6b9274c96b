"""What every command shares: the parser with one-line errors, gin commands, and flag parsing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from imagen_jax import files
from imagen_jax.errors import UserError


class UsageError(UserError):
  """A command-line flag the user has to fix."""


class Parser(argparse.ArgumentParser):
  """argparse with one-line errors (argparse prints the whole usage block first)."""

  def error(self, message):
    self.exit(2, f"imagen-jax: error: {message} (see {self.prog} --help)\n")


# The modules whose configurables a training run's gin files bind.
TRAIN_GIN_MODULES = (
  "imagen_jax.models",
  "imagen_jax.diffusion",
  "imagen_jax.train.loop",
  "imagen_jax.train.optimizer",
  "imagen_jax.train.data",
  "imagen_jax.data.pipeline",
  "imagen_jax.data.tasks",
  "imagen_jax.sample.grid_hook",
)
# What a training run's gin needs only to run (compile-check and bench build the step without them).
RUN_ONLY_MACROS = ("MODEL_DIR", "TRAIN_DATA")
# The modules whose configurables a sampling config binds.
SAMPLE_GIN_MODULES = ("imagen_jax.sample.cascade",)
# The sampling configs' run directories: the evaluations may give them with --checkpoints instead.
RUN_DIR_MACROS = ("BASE_DIR", "SR_DIR", "SR256_DIR", "SR1024_DIR")


def gin_command(
  parser: argparse.ArgumentParser,
  fn,
  modules: Sequence[str],
  example: str,
  optional_macros: Sequence[str] = (),
) -> None:
  """Makes `parser` a gin-configured command.

  `--gin_file` (repeatable) plus `--gin.KEY=VALUE`; `main` imports `modules` (which register the
  configurables), parses and finalizes the config before calling `fn`.

  Args:
    parser: the command's parser.
    fn: the command, fn(args) -> exit code.
    modules: the modules to import first.
    example: a gin file to name when none is given.
    optional_macros: required macros that may stay unset (the command does not use them).
  """
  parser.add_argument(
    "--gin_file",
    action="append",
    default=[],
    help="gin file, relative to gin_configs/ or a path (repeatable)",
  )
  parser.epilog = (
    "gin bindings: --gin.KEY=VALUE (repeatable, after the files; string values in quotes, as in "
    "--gin.MODEL_DIR=\"'out/run'\")"
  )
  parser.set_defaults(
    fn=fn, gin_modules=tuple(modules), gin_example=example, gin_optional=tuple(optional_macros)
  )


def prompts(texts: Optional[Sequence[str]], prompts_file: Optional[str]) -> List[str]:
  """--prompts and --prompts_file together; at least one prompt."""
  out = list(texts or [])
  if prompts_file:
    out += files.read_prompts(prompts_file)
  if not out:
    raise UsageError("no prompts: give --prompts or --prompts_file")
  return out


def stage_values(
  items: Optional[Sequence[str]],
  flag: str,
  example: str,
  need_stage: bool = True,
  form: str = "STAGE=VALUE",
) -> List[Tuple[Optional[str], str]]:
  """The one parser of `STAGE=VALUE` flags: [(stage or None, value)] for each comma-separated item.

  Args:
    items: the flag's values as argparse gives them (repeatable flags).
    flag: the flag, for messages.
    example: an example value, for messages.
    need_stage: every item must name its stage (else a bare VALUE means every stage).
    form: the item's form, for messages.

  Returns:
    (stage, value) pairs; stage is None for a bare value.
  """
  out = []
  for item in items or []:
    name, eq, value = item.partition("=")
    if not eq:
      if need_stage:
        raise UsageError(f"{flag} {item}: write {form}, e.g. {example}")
      out.append((None, item))
    elif not name or not value:
      raise UsageError(f"{flag} {item}: write {form}, e.g. {example}")
    else:
      out.append((name, value))
  return out


def checkpoint_steps(items: Optional[Sequence[str]]) -> Dict[str, int]:
  """--checkpoint_step STAGE=STEP ... -> {stage: step}."""
  steps = {}
  for name, value in stage_values(items, "--checkpoint_step", "base=5000", form="STAGE=STEP"):
    if not value.isdigit():
      raise UsageError(f"--checkpoint_step {name}={value}: write STAGE=STEP, e.g. base=5000")
    steps[name] = int(value)
  return steps


def checkpoints(items: Optional[Sequence[str]]) -> Dict[str, dict]:
  """--checkpoints STAGE=RUN_DIR[@STEP][,...] ... -> {'run_dirs': {stage: dir},
  'checkpoint_steps': {stage: step}}."""
  parts = [p for item in items or [] for p in item.split(",")]
  dirs, steps = {}, {}
  for name, value in stage_values(
    parts, "--checkpoints", "base=out/demo/base", form="STAGE=RUN_DIR or STAGE=RUN_DIR@STEP"
  ):
    path, at, step = value.rpartition("@") if "@" in value else (value, "", "")
    if at and not step.isdigit():
      raise UsageError(f"--checkpoints {name}={value}: the step after @ must be a number")
    dirs[name] = path
    if at:
      steps[name] = int(step)
  return {"run_dirs": dirs, "checkpoint_steps": steps}


# Setting flags of `sample` and the evaluations -> StageSettings fields, and their types.
SETTING_FLAGS = {
  "sampler": ("sampler", str),
  "steps": ("num_steps", int),
  "guidance": ("guidance_scale", float),
  "thresholding": ("thresholding", str),
  "aug_level": ("aug_level", float),
  "ddim_eta": ("ddim_eta", float),
  "spacing": ("spacing", str),
}


def setting_overrides(
  args, flags: Sequence[str] = tuple(SETTING_FLAGS)
) -> List[Tuple[Optional[str], str, list]]:
  """The setting flags `--FLAG [STAGE=]V1,V2 ...` -> [(stage or None for every stage, field,
  values)]."""
  out = []
  for flag in flags:
    field, cast = SETTING_FLAGS[flag]
    for stage, text in stage_values(
      getattr(args, flag, None), f"--{flag}", "base=1,3,5", need_stage=False, form="[STAGE=]V1,V2"
    ):
      try:
        values = [cast(v) for v in text.split(",") if v != ""]
      except ValueError:
        raise UsageError(f"--{flag} {text}: not a list of {cast.__name__} values") from None
      if not values:
        raise UsageError(f"--{flag} {text}: no value")
      out.append((stage, field, values))
  return out


def float_list(text: str, flag: str) -> List[float]:
  """'1,3,5' -> [1.0, 3.0, 5.0]."""
  try:
    return [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise UsageError(f"{flag} {text}: not a comma-separated list of numbers") from None


def name_list(text: str) -> List[str]:
  """'a,b' -> ['a', 'b']."""
  return [t for t in text.split(",") if t]


def command_line(args) -> List[str]:
  """The command as the user typed it (recorded in outputs)."""
  return ["imagen-jax"] + list(args.argv)


def first_line(e: BaseException) -> str:
  """The first line of an error (gin appends "In call to configurable ..." lines)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def add_negative_flags(parser) -> None:
  """--negative_prompt / --negative_prompts_file: guidance's unconditional half."""
  parser.add_argument(
    "--negative_prompt",
    help="a negative prompt for every prompt: guidance pushes away from it instead of from the "
    "empty condition ('' = the plain null condition)",
  )
  parser.add_argument(
    "--negative_prompts_file",
    help="a text file of negative prompts, one per prompt line (an empty line: none for that one)",
  )


def negative_prompts(args):
  """The negative prompts of --negative_prompt / --negative_prompts_file, or None."""
  if args.negative_prompt is not None and args.negative_prompts_file:
    raise UsageError("give --negative_prompt or --negative_prompts_file, not both")
  if args.negative_prompt is not None:
    return [args.negative_prompt]
  if args.negative_prompts_file:
    try:
      text = Path(args.negative_prompts_file).read_text()
    except OSError as e:
      raise UsageError(f"--negative_prompts_file: {e}") from None
    return text.splitlines()
  return None
