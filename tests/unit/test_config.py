import gin
import pytest

from imagen_jax import diffusion as D
from imagen_jax.gin_utils import parse_gin


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _parse(name, *bindings):
  parse_gin([name], bindings)
  return D.DiffusionConfig()


def test_defaults_are_the_papers_base_stage():
  from imagen_jax.sample.settings import StageSettings

  cfg = D.DiffusionConfig()
  assert isinstance(cfg.schedule, D.CosineSchedule)
  assert (cfg.objective, cfg.cond_drop_prob) == ("eps", 0.1)
  assert _parse("diffusion/base_64.gin") == cfg
  s = StageSettings()  # sampling: the one settings type
  assert (s.sampler, s.num_steps, s.thresholding, s.percentile, s.guidance_scale, s.aug_level) == (
    "ddpm",
    256,
    "dynamic",
    99.5,
    1.35,
    0.0,
  )


def test_stage_files():
  sr256 = _parse("diffusion/sr_256.gin")
  assert isinstance(sr256.schedule, D.CosineSchedule)
  gin.clear_config()
  sr1024 = _parse("diffusion/sr_1024.gin", "DiffusionConfig.objective = 'v'")
  assert sr1024.schedule == D.LinearSchedule(1e-4, 0.02, 1000)
  assert sr1024.objective == "v"
  hash(sr1024)  # static jit argument
  # The paper's sampling settings per stage live in the sampling config (w = 1.35 base, 8 for the SR
  # stages).
  from imagen_jax.sample import cascade

  gin.clear_config()
  parse_gin(
    ["runs/sample_cascade.gin"],
    ["VOCAB = '/v'", "ENCODER = '/e'", "BASE_DIR = '/b'", "SR256_DIR = '/s'", "SR1024_DIR = '/t'"],
  )
  stages = gin.query_parameter("cascade_config.stages")
  assert [
    gin.query_parameter(f"{s}/stage.guidance_scale") for s in ("base", "sr256", "sr1024")
  ] == [1.35, 8.0, 8.0]
  assert len(stages) == 3 and cascade.stage is not None


def test_bad_values_fail_at_construction():
  with pytest.raises(ValueError, match="unknown objective"):
    D.DiffusionConfig(objective="score")
  from imagen_jax.sample.settings import StageSettings

  with pytest.raises(ValueError, match="unknown thresholding"):
    StageSettings(thresholding="soft")
  with pytest.raises(ValueError, match="cond_drop_prob"):
    D.DiffusionConfig(cond_drop_prob=1.5)
  with pytest.raises(ValueError, match="unknown noise schedule"):
    D.DiffusionConfig(schedule="quadratic")
  assert D.DiffusionConfig(schedule="linear").schedule == D.LinearSchedule()


CACHE_MACROS = ["VOCAB = '/v'", "ENCODER = '/e'", "CACHE_DIR = '/c'"]


@pytest.mark.parametrize(
  "run,kind,extra",
  [
    ("runs/cache_synthetic.gin", "synthetic", []),
    ("runs/cache_folder.gin", "folder", ["DATA = '/d'"]),
    ("runs/cache_tfds.gin", "tfds", []),
  ],
)
def test_cache_runs_share_a_base_and_nothing_source_specific(run, kind, extra):
  from imagen_jax.data import cache, tasks  # noqa: F401  (registers the configurables)

  parse_gin([run], CACHE_MACROS + extra)
  assert gin.query_parameter("register_source_task.kind") == kind
  assert gin.query_parameter("cache_embeddings.max_length") is not None  # the shared part is there
  bound = {
    name: _is_bound(f"register_source_task.{name}")
    for name in ("seed", "num_examples", "path", "tfds_name")
  }
  # Synthetic-only settings do not leak into folder and tfds runs (nor theirs into the others).
  assert bound == {
    "seed": kind == "synthetic",
    "num_examples": kind == "synthetic",
    "path": kind == "folder",
    "tfds_name": kind == "tfds",
  }


def _is_bound(key):
  try:
    gin.query_parameter(key)
    return True
  except ValueError:
    return False


@pytest.mark.parametrize(
  "run,macros,names",
  [
    (
      "runs/sample_cascade.gin",
      ["BASE_DIR", "SR256_DIR", "SR1024_DIR"],
      ["base", "sr256", "sr1024"],
    ),
    ("runs/sample_demo.gin", ["BASE_DIR", "SR_DIR"], ["base", "sr"]),
  ],
)
def test_sampling_configs_name_their_required_values_and_build_their_stages(run, macros, names):
  import gin

  from imagen_jax.gin_utils import GinConfigError, parse_gin
  from imagen_jax.sample import cascade  # noqa: F401  (registers the configurables)

  with pytest.raises(GinConfigError, match="required gin value"):
    parse_gin([run], [], finalize=True)
  parse_gin(
    [run], [f"{m} = '/runs/{m.lower()}'" for m in macros + ["VOCAB", "ENCODER"]], finalize=True
  )
  stages = gin.query_parameter("cascade_config.stages")
  specs = [ref.scoped_configurable_fn() for ref in stages]
  assert [s.name for s in specs] == names
  assert [s.run_dir for s in specs] == [f"/runs/{m.lower()}" for m in macros]
  if run.endswith(
    "cascade.gin"
  ):  # the paper's COCO guidance weights (docs/paper.md §2), sizes 64/256/1024
    assert [(s.image_size, s.settings[0].guidance_scale) for s in specs] == [
      (64, 1.35),
      (256, 8.0),
      (1024, 8.0),
    ]
