"""Small file helpers shared by every room: atomic JSON, prompt files, and pairing images with
prompts.

JSON is written atomically (a temporary name, then a rename), so a reader never sees half a file;
paths may be local or cloud (`etils.epath`).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, List, Sequence, Union

from etils import epath

from imagen_jax.errors import MissingFileError, UserError

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_GLOB = re.compile(r"[*?\[]")


def _brace_expand(pattern: str) -> List[str]:
  """`shard-{000..002}.tar` -> the three names (webdataset's and img2dataset's shard notation)."""
  parts, ranges = _BRACE.split(pattern), []
  for lo, hi in zip(parts[1::3], parts[2::3]):
    width = len(lo) if lo.startswith("0") and len(lo) == len(hi) else 0
    ranges.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
  names = []
  for combo in itertools.product(*ranges):
    name = parts[0]
    for k, value in enumerate(combo):
      name += value + parts[3 * k + 3]
    names.append(name)
  return names


def expand_paths(spec: Union[str, Sequence[str]], what: str = "files") -> List[epath.Path]:
  """The files a path specification names, local or cloud (`gs://...`), in sorted order.

  Args:
    spec: a path, a glob (`gs://bucket/laion/*.tar`), a brace range (`shards/{00000..00099}.tar`),
      a comma-separated string of these, or a list of them.
    what: what the files are, for the error message.

  Returns:
    The files: a glob gives its sorted matches; a plain path or a brace range gives its names in
    order (each must exist).

  Raises:
    MissingFileError: a plain path does not exist, or a glob matches nothing.
  """
  patterns = (
    [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
  )
  out: List[epath.Path] = []
  for pattern in (p for p in patterns if p):
    for name in _brace_expand(pattern):
      if _GLOB.search(name):
        # the folder part before the first wildcard component, then the rest as the glob
        head, _, _ = name.partition(_GLOB.search(name).group(0))
        root = head.rsplit("/", 1)[0] if "/" in head else "."
        matches = sorted(epath.Path(root).glob(name[len(root) + 1 :] if root != "." else name))
        if not matches:
          raise MissingFileError(f"no {what} match {name}")
        out.extend(matches)
      else:
        path = epath.Path(name)
        if not path.exists():
          raise MissingFileError(f"{what}: {name} does not exist")
        out.append(path)
  if not out:
    raise MissingFileError(f"no {what} given")
  return out


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
