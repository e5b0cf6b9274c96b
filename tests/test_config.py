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
  cfg = D.DiffusionConfig()
  assert isinstance(cfg.schedule, D.CosineSchedule)
  assert (cfg.objective, cfg.cond_drop_prob, cfg.thresholding, cfg.dynamic_percentile) == ("eps", 0.1, "dynamic", 99.5)
  assert cfg.guidance_scale == 1.35
  assert _parse("diffusion/base_64.gin") == cfg


def test_stage_files():
  sr256 = _parse("diffusion/sr_256.gin")
  assert isinstance(sr256.schedule, D.CosineSchedule) and sr256.guidance_scale == 8.0
  gin.clear_config()
  sr1024 = _parse("diffusion/sr_1024.gin", "DiffusionConfig.objective = 'v'")
  assert sr1024.schedule == D.LinearSchedule(1e-4, 0.02, 1000)
  assert sr1024.guidance_scale == 8.0 and sr1024.objective == "v"
  hash(sr1024)   # static jit argument


def test_bad_values_fail_at_construction():
  with pytest.raises(ValueError, match="unknown objective"):
    D.DiffusionConfig(objective="score")
  with pytest.raises(ValueError, match="unknown thresholding"):
    D.DiffusionConfig(thresholding="soft")
  with pytest.raises(ValueError, match="cond_drop_prob"):
    D.DiffusionConfig(cond_drop_prob=1.5)
  with pytest.raises(ValueError, match="unknown noise schedule"):
    D.DiffusionConfig(schedule="quadratic")
  assert D.DiffusionConfig(schedule="linear").schedule == D.LinearSchedule()
