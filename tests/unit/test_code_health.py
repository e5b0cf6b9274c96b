"""Structure the rest of the code relies on: one source for each fact, no private JAX API, no
dead code."""

import ast

import pytest

from imagen_jax import batch_keys
from tests import helpers

PACKAGE = helpers.ROOT / "imagen_jax"


def _sources():
  return sorted(p for p in PACKAGE.rglob("*.py"))


def _docstring_nodes(tree):
  ids = set()
  for node in ast.walk(tree):
    if (
      isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
      and node.body
    ):
      first = node.body[0]
      if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        ids.add(id(first.value))
  return ids


def _string_constants(path):
  tree = ast.parse(path.read_text())
  docs = _docstring_nodes(tree)
  return [
    (n.lineno, n.value)
    for n in ast.walk(tree)
    if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
  ]


def test_batch_keys_are_spelled_only_in_batch_keys():
  # The condition fields are unambiguous names: nowhere else in the package as a string literal.
  distinctive = {
    batch_keys.TEXT_EMB,
    batch_keys.TEXT_MASK,
    batch_keys.LOWRES,
    batch_keys.LOWRES_AUG_LEVEL,
  }
  found = [
    f"{p.relative_to(PACKAGE)}:{line} {value!r}"
    for p in _sources()
    if p.name != "batch_keys.py"
    for line, value in _string_constants(p)
    if value in distinctive
  ]
  assert not found, found
  # The modules that build examples and batches index and build them with the constants, every
  # field.
  every = {v for k, v in vars(batch_keys).items() if k.isupper()}
  found = []
  for p in [PACKAGE / "data" / name for name in ("pipeline.py", "tasks.py")]:
    for node in ast.walk(ast.parse(p.read_text())):
      keys = []
      if isinstance(node, ast.Dict):
        keys = node.keys
      elif isinstance(node, ast.Subscript):
        keys = [node.slice]
      elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
      ):
        keys = node.args[:1]
      found += [
        f"{p.name}:{k.lineno} {k.value!r}"
        for k in keys
        if isinstance(k, ast.Constant) and k.value in every
      ]
  assert not found, found


def _bad_sample(**kw):
  import jax

  from imagen_jax import diffusion as D

  args = dict(schedule=D.CosineSchedule(), num_steps=2)
  args.update(kw)
  return D.sample(lambda z, l, c: z, jax.random.PRNGKey(0), (1, 2, 2, 3), **args)


def _cases():
  import flax.linen as nn
  import jax.numpy as jnp

  from imagen_jax import diffusion as D
  from imagen_jax import models as M
  from imagen_jax.models import layers
  from imagen_jax.sample.settings import StageSettings

  return [
    ("check_sampler", lambda: StageSettings(sampler="euler")),
    ("check_sampler", lambda: _bad_sample(sampler="euler")),
    ("check_thresholding", lambda: StageSettings(thresholding="soft")),
    ("check_thresholding", lambda: _bad_sample(thresholding_method="soft")),
    ("check_thresholding", lambda: D.threshold(jnp.zeros((1, 2)), "soft")),
    ("check_weighting", lambda: D.DiffusionConfig(loss_weighting="snr")),
    ("check_weighting", lambda: D.loss_weight(jnp.zeros(2), "eps", "snr")),
    ("check_objective", lambda: D.DiffusionConfig(objective="score")),
    ("check_remat", lambda: M.UNetConfig(remat="sometimes")),
    ("check_remat", lambda: M.EfficientUNetConfig(remat="sometimes")),
    ("check_remat", lambda: layers.maybe_remat(nn.Dense, "sometimes")),
  ]


@pytest.mark.parametrize("index", range(11))
def test_each_kind_of_name_is_validated_by_one_function(index):
  checker, make = _cases()[index]
  with pytest.raises(ValueError, match="unknown") as info:
    make()
  assert info.traceback[-1].name == checker


def test_cli_sizes_are_the_encoder_table(monkeypatch):
  from imagen_jax import cli
  from imagen_jax.text import t5

  monkeypatch.setitem(t5.T5_SIZES, "mini", (64, 2, 32, 128, 2))
  args = cli.build_parser().parse_args(
    ["t5", "convert", "--from", "a", "--to", "b", "--size", "mini"]
  )
  assert args.size == "mini"


def test_no_private_jax_api():
  found = [
    f"{p.relative_to(PACKAGE)}:{i}"
    for p in _sources()
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if "._cache_size" in line or "jax._src" in line or "jaxlib._" in line
  ]
  assert not found, found


# Methods that an external interface calls (seqio.DataSource), so nothing in this repository names
# them.
INTERFACE_METHODS = {"supports_arbitrary_sharding", "list_shards"}


def test_every_function_and_class_is_used_somewhere():
  """A definition whose name appears nowhere else (package, tests, gin files, README) is dead
  code."""
  import re

  root = PACKAGE.parent
  others = (
    list(_sources())
    + sorted((root / "tests").rglob("*.py"))
    + sorted((root / "gin_configs").rglob("*.gin"))
    + [root / "README.md"]
    + sorted((root / "docs").glob("*.md"))
  )
  text = "\n".join(p.read_text() for p in others)
  dead = []
  for p in _sources():
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("__"):
        if (
          node.name not in INTERFACE_METHODS
          and len(re.findall(rf"\b{re.escape(node.name)}\b", text)) <= 1
        ):
          dead.append(f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name}")
  assert not dead, dead


def test_random_init_and_abstract_params_agree_for_models_and_encoder():
  """One helper each: the boxed random initialisers and the abstract trees have the same leaves."""
  import flax.linen as nn
  import jax

  from imagen_jax import models as M
  from imagen_jax.text import t5
  from tests.helpers import load_config

  def spec(tree):
    leaves = jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    return [(x.names, tuple(x.value.shape), str(x.value.dtype)) for x in leaves]

  cfg = t5.t5_config("tiny")
  random = t5.init_random_encoder_params(cfg, jax.random.PRNGKey(0))
  assert spec(random) == spec(t5.abstract_encoder_params(cfg)) and spec(random)
  config = load_config("models/tiny_sr.gin")
  random = M.init_boxed_params(config, jax.random.PRNGKey(0))
  assert spec(random) == spec(M.abstract_params(config)) and spec(random)


def test_cited_documents_exist_in_the_repository():
  """Code, gin files and pyproject cite docs/*.md sections that exist; nothing cites a file
  outside the repo."""
  import re

  root = PACKAGE.parent
  files = (
    list(_sources())
    + sorted((root / "gin_configs").rglob("*.gin"))
    + sorted((root / "tests").rglob("*.py"))
    + [root / "pyproject.toml", root / "README.md"]
  )
  outside = "DESIGN" + ".md"  # the founders' reference card, not part of this repository
  assert not [str(p) for p in files if outside in p.read_text()]
  cites = [
    (p, m.group(1), m.group(2))
    for p in files
    for m in re.finditer(r"docs/([\w.-]+\.md)(?: §(\d+))?", p.read_text())
  ]
  assert any(doc == "paper.md" for _, doc, _ in cites)
  for path, doc, section in cites:
    target = root / "docs" / doc
    assert target.is_file(), f"{path.name} cites docs/{doc}"
    if section:
      assert re.search(rf"^## §{section} ", target.read_text(), flags=re.MULTILINE), (
        f"{path.name}: {doc} §{section}"
      )


# ------------------------------------------------------------------------------ the shape of the
# package
# Modules at the top of the package: what every room shares. Everything else lives in a room.
TOP_LEVEL = {
  "__init__.py",
  "batch_keys.py",
  "demo.py",
  "errors.py",
  "files.py",
  "gin_utils.py",
  "images.py",
  "partitioning.py",
  "startup.py",
}
ROOMS = {"cli", "data", "diffusion", "eval", "models", "sample", "scale", "text", "train"}
# A script with its own tiny command line (`python -m imagen_jax.demo prepare --out DIR`, the
# Makefile's).
OWN_COMMAND_LINE = {"demo.py"}


def _non_doc_strings(path):
  return _string_constants(path)


def test_every_module_lives_in_its_room():
  top = {p.name for p in PACKAGE.glob("*.py")}
  assert top <= TOP_LEVEL, top - TOP_LEVEL
  rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  assert rooms <= ROOMS, rooms - ROOMS


def test_only_the_command_line_names_flags():
  """Library messages name parameters; `--flag`s belong to imagen_jax/cli (gin's
  `--gin.KEY=VALUE`, which the gin helpers and the compile check's advice spell out as the way to
  bind a value, excepted)."""
  import re

  found = []
  for p in _sources():
    if "cli" in p.relative_to(PACKAGE).parts or p.name in OWN_COMMAND_LINE:
      continue
    for line, value in _non_doc_strings(p):
      for m in re.finditer(r"(?<![\w-])--(?!gin\.)[a-z][a-z_]*", value):
        found.append(f"{p.relative_to(PACKAGE)}:{line} {m.group(0)}")
  assert not found, found


def test_one_mesh_context_site():
  """`jax.set_mesh` + the logical-axis rules are entered in one place: partitioning.mesh_context."""
  found = [
    f"{p.relative_to(PACKAGE)}:{i}"
    for p in _sources()
    for i, line in enumerate(p.read_text().splitlines(), 1)
    if "set_mesh(" in line or "logical_axis_rules(" in line
  ]
  assert found == [f"partitioning.py:{_line_of('partitioning.py', 'jax.set_mesh(')}"], found


def _line_of(name, text):
  lines = (PACKAGE / name).read_text().splitlines()
  return next(i for i, line in enumerate(lines, 1) if text in line)


def _imports(path):
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return out


def test_scale_tooling_depends_on_the_trainer_never_the_reverse():
  for p in (PACKAGE / "scale").glob("*.py"):
    assert not [m for m in _imports(p) if m.startswith("imagen_jax.cli")], p
  for name in ("setup.py", "step.py", "state.py", "optimizer.py", "checkpoints.py"):
    assert not [
      m for m in _imports(PACKAGE / "train" / name) if m.startswith("imagen_jax.scale")
    ], name
  # The trainer, the compile check and the benchmark build the step in one place.
  for p in (
    PACKAGE / "scale" / "compile_check.py",
    PACKAGE / "scale" / "bench.py",
    PACKAGE / "train" / "loop.py",
  ):
    text = p.read_text()
    assert (
      "TrainSetup" in text and "step_signature(" not in text and "abstract_state(" not in text
    ), p


def test_no_function_is_longer_than_120_lines():
  """Counted without the docstring (an Args: section is not length)."""
  long = []
  for p in _sources():
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
          body = body[1:]
        n = (body[-1].end_lineno - body[0].lineno + 1) if body else 0
        if n > 120:
          long.append(f"{p.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} lines)")
  assert not long, long


def test_the_cli_reference_is_generated_from_the_parser():
  from imagen_jax.cli import reference

  doc = PACKAGE.parent / "docs" / "cli.md"
  assert doc.read_text() == reference.markdown(), "docs/cli.md is stale: run `make docs`"


def test_tests_share_helpers_through_one_module_and_fixtures_through_conftest():
  tests = PACKAGE.parent / "tests"
  bad = []
  for p in sorted(tests.rglob("*.py")):
    for m in _imports(p):
      if m.startswith("tests.conftest") or (
        m.startswith("tests.test_") and p.name != "conftest.py"
      ):
        bad.append(f"{p.name}: {m}")
  assert not bad, bad
