"""Small file helpers shared by every room: atomic JSON, prompt files, and pairing images with
prompts.

JSON is written atomically (a temporary name, then a rename), so a reader never sees half a file;
paths may be local or cloud (`etils.epath`).
"""

from __future__ import annotations

import json
from typing import Any, List

from etils import epath

from imagen_jax.errors import MissingFileError, UserError


def write_json(path, obj: Any, indent: int = 1) -> None:
  """Writes `obj` as JSON to `path` atomically, creating the parent folder.

  Args:
    path: the file (local or cloud path).
    obj: a JSON-serialisable value.
    indent: JSON indentation.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=indent))
  tmp.replace(path)


def read_json(path, what: str = "file") -> Any:
  """The JSON value in `path`.

  Args:
    path: the file.
    what: what the file is, for the error message.

  Returns:
    The parsed value.

  Raises:
    UserError: the file is missing or is not JSON.
  """
  try:
    return json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {what} {path}: {e}") from None


def read_prompts(path) -> List[str]:
  """The non-blank lines of a UTF-8 text file (one prompt per line).

  Args:
    path: the file.

  Returns:
    The prompts, in order.

  Raises:
    UserError: the file is missing, unreadable or holds no prompt.
  """
  p = epath.Path(path)
  if not p.exists():
    raise MissingFileError(f"prompts file not found: {path}")
  try:
    prompts = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read prompts file {path}: {e}") from None
  if not prompts:
    raise UserError(f"prompts file {path} holds no prompt")
  return prompts


def pair_prompts(n_images: int, n_prompts: int, what: str = "images") -> List[int]:
  """The prompt index of each of `n_images` images, taken in order.

  One prompt serves every image; otherwise each prompt takes an equal run of consecutive images (one
  each, or `samples_per_prompt` each, as a sampling folder holds them).

  Args:
    n_images: how many images.
    n_prompts: how many prompts.
    what: what the images are, for the error message.

  Returns:
    A list of prompt indices, one per image.

  Raises:
    UserError: the images do not split evenly over the prompts.
  """
  if n_prompts < 1:
    raise UserError(f"{what}: no prompts")
  if n_prompts == 1:
    return [0] * n_images
  if n_images % n_prompts:
    raise UserError(
      f"{what}: {n_images} images but {n_prompts} prompts (give one prompt, one per image, "
      "or the same number of images for each prompt)"
    )
  per = n_images // n_prompts
  return [k // per for k in range(n_images)]
