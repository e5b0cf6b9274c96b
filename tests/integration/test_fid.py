"""FID: the Fréchet distance against closed forms and SciPy, and our Flax FID Inception against
torch-fidelity's self-contained PyTorch port (random weights made here, passed through our
converter; no download).

torch-fidelity is the reference because it installs and imports here: pytorch-fid builds its
network from torchvision, which has no CPU build on the registry. torch-fidelity's package
__init__ imports torchvision too, so the test loads its Inception module alone
(`_torch_fidelity_inception`); `make` installs it with --no-deps, pinned (torch-fidelity==0.4.0)."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import scipy.linalg

from imagen_jax.eval.metrics import frechet
from imagen_jax.eval.metrics.frechet import Stats, frechet_distance

# ------------------------------------------------------------------------------------ Fréchet
# distance


def _random_cov(rng, d, rank=None):
  a = rng.standard_normal((d, rank or d))
  return a @ a.T / d


def test_identical_gaussians_give_zero():
  rng = np.random.default_rng(0)
  s = _random_cov(rng, 32)
  mu = rng.standard_normal(32)
  assert frechet_distance(Stats(mu, s, 0), Stats(mu, s, 0)) == pytest.approx(0.0, abs=1e-9)


def test_shifted_means_give_the_squared_distance():
  rng = np.random.default_rng(1)
  s = _random_cov(rng, 16)
  mu = rng.standard_normal(16)
  shift = rng.standard_normal(16)
  assert frechet_distance(Stats(mu, s, 0), Stats(mu + shift, s, 0)) == pytest.approx(
    float(shift @ shift), rel=1e-9
  )


def test_agrees_with_scipy_sqrtm_and_the_diagonal_closed_form():
  rng = np.random.default_rng(2)
  for d in (4, 64):
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    ref = float(
      ((m1 - m2) ** 2).sum()
      + np.trace(s1)
      + np.trace(s2)
      - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    )
    assert frechet_distance(Stats(m1, s1, 0), Stats(m2, s2, 0)) == pytest.approx(ref, rel=1e-8)
  # Diagonal covariances: the 2-Wasserstein distance is sum (sqrt(a) - sqrt(b))^2 per dimension.
  a, b = rng.uniform(0.1, 2, 10), rng.uniform(0.1, 2, 10)
  got = frechet_distance(Stats(np.zeros(10), np.diag(a), 0), Stats(np.zeros(10), np.diag(b), 0))
  assert got == pytest.approx(float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum()), rel=1e-9)


def test_stable_on_rank_deficient_covariances():
  """Fewer samples than dimensions (every FID on < 2048 images): finite, 0 against itself, and
  equal to an exact small-matrix form: with centred features X (n1 x d), Y (n2 x d), tr((S1
  S2)^(1/2)) is the nuclear norm of X Y^T over sqrt((n1 - 1)(n2 - 1))."""
  rng = np.random.default_rng(3)
  d = 128
  f1, f2 = (
    rng.standard_normal((20, d)),
    rng.standard_normal((30, d)) @ rng.standard_normal((d, d)) * 0.2 + 0.5,
  )
  a, b = Stats.of(f1), Stats.of(f2)
  assert np.linalg.matrix_rank(a.sigma) == 19 and np.linalg.matrix_rank(b.sigma) == 29
  x, y = f1 - f1.mean(0), f2 - f2.mean(0)
  nuclear = np.linalg.svd(x @ y.T, compute_uv=False).sum() / np.sqrt(19 * 29)
  exact = float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) + np.trace(b.sigma) - 2 * nuclear)
  assert frechet_distance(a, b) == pytest.approx(exact, rel=1e-9)
  assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_not_a_covariance_is_an_error():
  rng = np.random.default_rng(4)
  s = _random_cov(rng, 8)
  bad = s.copy()
  bad[0, 1] += 5.0  # not symmetric
  with pytest.raises(frechet.StatsError):
    frechet_distance(Stats(np.zeros(8), -np.eye(8) * 3, 0), Stats(np.zeros(8), s, 0))
  with pytest.raises(frechet.StatsError, match="dimensions"):
    frechet_distance(Stats(np.zeros(8), s, 0), Stats(np.zeros(4), np.eye(4), 0))


def test_stats_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  st = Stats.of(rng.standard_normal((50, 6)))
  st.save(tmp_path / "s.npz")
  back = Stats.load(tmp_path / "s.npz")
  assert (
    np.array_equal(back.mu, st.mu) and np.array_equal(back.sigma, st.sigma) and back.count == 50
  )
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  (tmp_path / "obj.npz").write_bytes((tmp_path / "obj.npy").read_bytes())
  with pytest.raises(frechet.StatsError):
    Stats.load(tmp_path / "obj.npz")


# -------------------------------------------------------------------------------------------
# Inception


def _torch_fidelity_inception():
  """torch-fidelity's InceptionV3 module without running the package's __init__ (which imports
  torchvision)."""
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.fail(
      "torch-fidelity is not installed: `make test` installs torch-fidelity==0.4.0 with --no-deps"
    )
  if "torch_fidelity" not in sys.modules or not hasattr(
    sys.modules["torch_fidelity"], "FeatureExtractorInceptionV3"
  ):
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
  return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


@pytest.fixture(scope="module")
def inception_pair(tmp_path_factory):
  """(torch-fidelity's extractor, ours) with the same random weights, ours through the converter."""
  import torch

  from imagen_jax.eval.networks import inception

  tmp = tmp_path_factory.mktemp("inception")
  rng = np.random.default_rng(0)
  state = {}
  for key, leaf in inception.param_shapes().items():
    module, name = key.rsplit("/", 1)
    tname = module.replace("/", ".")
    if name == "conv_kernel":
      kh, kw, cin, cout = leaf
      w = rng.standard_normal((cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw))
      state[f"{tname}.conv.weight"] = torch.tensor(w, dtype=torch.float32)
    else:
      torch_name = {
        "bn_scale": "weight",
        "bn_bias": "bias",
        "bn_mean": "running_mean",
        "bn_var": "running_var",
      }[name]
      value = {
        "bn_scale": lambda n: rng.normal(1, 0.1, n),
        "bn_bias": lambda n: rng.normal(0, 0.1, n),
        "bn_mean": lambda n: rng.normal(0, 0.1, n),
        "bn_var": lambda n: rng.uniform(0.5, 1.5, n),
      }[name](leaf[0])
      state[f"{tname}.bn.{torch_name}"] = torch.tensor(value, dtype=torch.float32)
      if name == "bn_var":
        state[f"{tname}.bn.num_batches_tracked"] = torch.tensor(0)
  state["fc.weight"] = torch.tensor(rng.standard_normal((1008, 2048)) * 0.01, dtype=torch.float32)
  state["fc.bias"] = torch.zeros(1008)
  pth = tmp / "pt_inception-random.pth"
  torch.save(state, pth)

  module = _torch_fidelity_inception()
  original_load = torch.load
  module.torch.load = lambda f, **kw: original_load(
    f, **{**kw, "weights_only": True}
  )  # no pickle, even here
  try:
    reference = module.FeatureExtractorInceptionV3(
      "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(pth)
    )
  finally:
    module.torch.load = original_load
  converted = inception.convert(pth, tmp / "converted")
  ours = inception.FeatureExtractor(inception.load(converted), batch_size=4)
  return reference, ours, tmp


def test_inception_matches_torch_fidelity_through_the_converter(inception_pair):
  import torch

  reference, ours, _ = inception_pair
  rng = np.random.default_rng(1)
  for size in ((32, 32), (64, 64), (299, 299), (250, 333)):
    images = rng.integers(0, 256, (3, *size, 3), dtype=np.uint8)
    with torch.no_grad():
      want = (
        reference(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())[0]
        .numpy()
        .astype(np.float64)
      )
    got = ours(images)
    assert got.shape == (3, 2048)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, (size, rel)
    assert np.abs(want).mean() > 1e-3  # the features are not vanishing


def test_pytorch_resize_equals_f_interpolate():
  import torch
  import torch.nn.functional as F

  from imagen_jax.eval.networks import inception

  rng = np.random.default_rng(2)
  for h, w in ((32, 32), (64, 48), (400, 320)):
    x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    want = (
      F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2).float(),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .numpy()
    )
    got = np.asarray(inception.preprocess(x, "pytorch")) * 128.0 + 128.0
    # torch computes source coordinates in float32, we in float64: 1e-4 of the 0..255 range
    assert np.abs(got - want).max() < 0.0255, (h, w)


@pytest.mark.parametrize(
  "what, message",
  [
    ("not_safetensors", "not a safetensors file"),
    ("missing", "no Inception weights"),
    ("wrong_shapes", "missing"),
  ],
)
def test_bad_weights_are_one_line(inception_pair, tmp_path, what, message):
  from safetensors.numpy import save_file

  from imagen_jax.eval.networks import inception

  if what == "not_safetensors":
    (tmp_path / inception.WEIGHTS_FILE).write_bytes(b"\x80\x04pickle-ish")
  elif what == "wrong_shapes":
    save_file(
      {"Conv2d_1a_3x3/conv_kernel": np.zeros((3, 3, 3, 32), np.float32)},
      str(tmp_path / inception.WEIGHTS_FILE),
    )
  with pytest.raises(inception.WeightsError, match=message):
    inception.load(tmp_path)


# ------------------------------------------------------------------------------------------ the CLI


def _write_folder(folder, images):
  from imagen_jax import images as imio

  folder.mkdir(parents=True, exist_ok=True)
  for k, im in enumerate(images):
    imio.save_png(folder / f"{k:03d}.png", im)
  return folder


@pytest.mark.slow  # 47 s; its parts (Inception = torch-fidelity, the Frechet forms) stay in the run
def test_fid_command_end_to_end(inception_pair, tmp_path, capsys):
  from imagen_jax import cli
  from imagen_jax.eval.networks import inception

  _, ours, tmp = inception_pair
  rng = np.random.default_rng(7)
  a = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
  sa, sb = _write_folder(tmp_path / "a", a), _write_folder(tmp_path / "b", b)
  weights = tmp / "converted"
  out = tmp_path / "fid.json"
  args = [
    "eval",
    "fid",
    "--samples",
    str(sa),
    "--ref",
    str(sb),
    "--weights",
    str(weights),
    "--batch_size",
    "4",
    "--save_stats",
    str(tmp_path / "a.npz"),
    "--json",
    str(out),
  ]
  assert cli.main(args) == 0, capsys.readouterr().err
  import json

  got = json.loads(out.read_text())
  want = frechet_distance(Stats.of(ours(a)), Stats.of(ours(b)))
  assert (
    got["fid"] == pytest.approx(want, rel=1e-6) and got["num_samples"] == 6 and got["num_ref"] == 6
  )
  # Against saved statistics: the same number; against itself: 0.
  assert (
    cli.main(
      args[:4]
      + [
        "--ref",
        str(tmp_path / "a.npz"),
        "--weights",
        str(weights),
        "--batch_size",
        "4",
        "--json",
        str(out),
      ]
    )
    == 0
  )
  assert json.loads(out.read_text())["fid"] == pytest.approx(0.0, abs=1e-6)
  assert "FID" in capsys.readouterr().out
  assert inception.WEIGHTS_FILE in {p.name for p in weights.iterdir()}


@pytest.mark.parametrize(
  "case, message",
  [
    ("missing_weights", "no Inception weights"),
    ("pickle_weights", "not a safetensors file"),
    ("empty_samples", "no images"),
    ("mixed_sizes", "one size"),
    ("wrong_size", "expected 64x64"),
    ("one_image", "at least 2"),
  ],
)
def test_fid_bad_input_is_one_line(inception_pair, tmp_path, capsys, case, message):
  from imagen_jax import cli
  from imagen_jax.eval.networks import inception

  _, _, tmp = inception_pair
  rng = np.random.default_rng(8)
  weights = tmp / "converted"
  samples = _write_folder(tmp_path / "s", rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
  extra = []
  if case == "missing_weights":
    weights = tmp_path / "nothing"
  elif case == "pickle_weights":
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / inception.WEIGHTS_FILE).write_bytes(b"\x80\x04\x95pickled")
  elif case == "empty_samples":
    samples = tmp_path / "empty"
    samples.mkdir()
  elif case == "mixed_sizes":
    _write_folder(samples, [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)] * 1)
    (samples / "000.png").rename(samples / "zzz.png")
  elif case == "wrong_size":
    extra = ["--image_size", "64"]
  elif case == "one_image":
    samples = _write_folder(tmp_path / "one", rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
  code = cli.main(
    [
      "eval",
      "fid",
      "--samples",
      str(samples),
      "--ref",
      str(samples),
      "--weights",
      str(weights),
      "--batch_size",
      "4",
      *extra,
    ]
  )  # the extractor's compiled shape, shared with the fixture
  err = capsys.readouterr().err
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_converter_refuses_what_is_not_a_plain_state_dict(tmp_path, capsys):
  import torch

  from imagen_jax import cli

  class Evil:
    def __reduce__(self):
      return (print, ("this must never run",))

  torch.save({"x": Evil()}, tmp_path / "evil.pth")
  code = cli.main(
    ["eval", "convert-inception", "--from", str(tmp_path / "evil.pth"), "--to", str(tmp_path / "o")]
  )
  captured = capsys.readouterr()
  assert code == 2 and "weights_only" in captured.err and "this must never run" not in captured.out
  torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
  assert (
    cli.main(
      [
        "eval",
        "convert-inception",
        "--from",
        str(tmp_path / "other.pth"),
        "--to",
        str(tmp_path / "o"),
      ]
    )
    == 2
  )
  assert (
    "a convolution kernel is 4-d" in capsys.readouterr().err
  )  # was numpy's "axes don't match array"


# 43 s on 2 cores; the sweep runner it reuses is tested by eval shapes, FID and CLIP by their own
@pytest.mark.slow
def test_fid_clip_sweep_end_to_end(
  inception_pair, clip_checkpoint, tmp_path, spm_model, tiny_t5_checkpoint, capsys
):
  """The sweep runner through a micro cascade: a row per setting, one program per stage, and FID
  / CLIP scores that equal the metrics recomputed from the written images."""
  import json

  from imagen_jax import cli
  from imagen_jax import images as imio
  from imagen_jax.eval.networks import clip
  from tests.helpers import write_micro_cascade

  _, ours, tmp = inception_pair
  runs = write_micro_cascade(tmp_path / "runs", spm_model, tiny_t5_checkpoint[0])
  rng = np.random.default_rng(9)
  ref = Stats.of(ours(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)))
  ref.save(tmp_path / "ref.npz")
  prompts = ["a red circle", "blue circle", "red"]
  (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
  out = tmp_path / "fc"
  code = cli.main(
    [
      "eval",
      "fid-clip",
      f"--gin_file={runs / 'cascade.gin'}",
      "--prompts_file",
      str(tmp_path / "p.txt"),
      "--ref",
      str(tmp_path / "ref.npz"),
      "--inception",
      str(tmp / "converted"),
      "--clip",
      str(clip_checkpoint[0]),
      "--guidance",
      "1,3",
      "--thresholding",
      "none,dynamic",
      "--out",
      str(out),
      "--save_images",
      "--batch_size",
      "4",
    ]
  )
  assert code == 0, capsys.readouterr().err
  result = json.loads((out / "fid_clip.json").read_text())
  assert len(result["rows"]) == 4 and result["programs_compiled"] == {"base": 1, "sr": 1}
  model = clip.load(clip_checkpoint[0])
  for r in result["rows"]:
    ims = [imio.read_image(out / "images" / r["setting"] / f"p{k:05d}.png") for k in range(3)]
    m = r["metrics"]["overall"]
    assert m["fid"] == pytest.approx(frechet_distance(Stats.of(ours(np.stack(ims))), ref), rel=1e-6)
    assert m["clip"] == pytest.approx(clip.clip_score(model, ims, prompts)[0], rel=1e-5)
  assert (out / "fid_vs_clip.png").read_bytes()[:4] == b"\x89PNG"


def test_coco_prompts_draw_pairs_reproducibly(tmp_path, capsys):
  import json

  from imagen_jax import cli
  from imagen_jax import images as imio

  img_dir = tmp_path / "val2014"
  img_dir.mkdir()
  images, anns = [], []
  for i in range(10):
    name = f"COCO_val2014_{i:012d}.jpg"
    imio.save_png(img_dir / name, np.full((8, 8, 3), i * 20, np.uint8))
    images.append({"id": 100 + i, "file_name": name})
    anns += [{"image_id": 100 + i, "caption": f"image {i} caption {c}\n"} for c in range(3)]
  anns.append({"image_id": 999, "caption": "an image that does not exist"})
  ann = tmp_path / "captions_val2014.json"
  ann.write_text(json.dumps({"images": images, "annotations": anns}))
  for out in ("a", "b"):
    assert (
      cli.main(
        [
          "eval",
          "coco-prompts",
          "--annotations",
          str(ann),
          "--images",
          str(img_dir),
          "--out",
          str(tmp_path / out),
          "--num",
          "6",
          "--seed",
          "3",
        ]
      )
      == 0
    ), capsys.readouterr().err
  a, b = (json.loads((tmp_path / o / "coco_fid.json").read_text())["pairs"] for o in ("a", "b"))
  assert a == b and len({p["image_id"] for p in a}) == 6  # seeded, without replacement
  lines = (tmp_path / "a" / "prompts.txt").read_text().splitlines()
  links = sorted((tmp_path / "a" / "ref_images").iterdir())
  for p, line, link in zip(a, lines, links):
    k = p["image_id"] - 100
    assert line == p["caption"] and line.startswith(
      f"image {k} caption "
    )  # the caption is the image's
    assert link.resolve() == (img_dir / p["file_name"]).resolve()
  assert (
    cli.main(
      [
        "eval",
        "coco-prompts",
        "--annotations",
        str(ann),
        "--images",
        str(img_dir),
        "--out",
        str(tmp_path / "c"),
        "--num",
        "11",
      ]
    )
    == 2
  )
  assert "10 captioned images" in capsys.readouterr().err


def _analytic_inception_flops(batch: int) -> float:
  """2 x multiply-adds of every convolution, from the shapes alone (jax.eval_shape: nothing
  runs)."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from imagen_jax.eval.networks import inception

  net = inception.FIDInceptionV3()
  x = jnp.zeros((batch, inception.INPUT_SIZE, inception.INPUT_SIZE, 3))
  params = inception.abstract_params()
  _, state = jax.eval_shape(
    lambda p: net.apply(
      p,
      x,
      capture_intermediates=lambda m, _: isinstance(m, inception.BasicConv),
      mutable=["intermediates"],
    ),
    params,
  )
  kernels = {
    k[:-1]: v.shape
    for k, v in traverse_util.flatten_dict(params["params"]).items()
    if k[-1] == "conv_kernel"
  }
  total = 0.0
  for path, out in traverse_util.flatten_dict(state["intermediates"]).items():
    kh, kw, cin, cout = kernels[path[:-1]]
    n, ho, wo, c = out[0].shape if isinstance(out, tuple) else out.shape
    assert c == cout
    total += 2.0 * n * ho * wo * kh * kw * cin * cout
  assert len(kernels) == 94  # every convolution of the network counted once
  return total


def test_fid_bench_reports_throughput_and_flops_that_match_an_analytic_count(
  inception_pair, tmp_path, capsys
):
  import json

  from imagen_jax import cli

  _, _, tmp = inception_pair
  out = tmp_path / "fid_bench.json"
  code = cli.main(
    [
      "eval",
      "fid-bench",
      "--weights",
      str(tmp / "converted"),
      "--image_size",
      "32",
      "--batch_size",
      "3",
      "--repeats",
      "2",
      "--json",
      str(out),
    ]
  )
  assert code == 0, capsys.readouterr().err
  r = json.loads(out.read_text())
  n = r["batch"]  # 3 rounded up to a multiple of the devices (the data axis)
  assert n >= 3 and n % r["devices"] == 0
  assert r["what"] == "fid" and len(r["seconds"]) == 2 and not r["extra"]["random_weights"]
  assert r["images_per_second"] == pytest.approx(n / r["seconds_median"])
  analytic = _analytic_inception_flops(n) / r["devices"]
  assert abs(r["flops_per_device"] - analytic) / analytic < 0.10, (r["flops_per_device"], analytic)
  assert "images/s" in capsys.readouterr().out
  assert cli.main(["eval", "fid-bench", "--image_size", "0"]) == 2
  assert "positive" in capsys.readouterr().err
  for bad in (["--repeats", "0"], ["--warmup", "-1"]):  # a one-line error, not min() of nothing
    assert cli.main(["eval", "fid-bench", *bad]) == 2
    err = capsys.readouterr().err
    assert (
      "repeats must be at least 1 and warmup at least 0" in err
      and len(err.strip().splitlines()) == 1
    ), err


# `slow` like the sweep above (the Inception compile); the hook's sampling, logging and CLIP path
# run in tests/integration/test_workflow.py in every `make test`.
@pytest.mark.slow
def test_fid_clip_hook_logs_the_fid_of_its_samples(
  inception_pair, micro, shapes16, spm_model, tiny_t5_checkpoint, tmp_path
):
  """FidClipEvalHook with Inception weights and reference statistics: eval/fid equals the FID
  recomputed from the hook's own samples."""
  import json

  from imagen_jax.eval.hook import FidClipEvalHook
  from imagen_jax.train import data as tdata
  from imagen_jax.train import loop
  from tests.helpers import ADAM, BATCH, EMA

  _, ours, tmp = inception_pair
  ref = Stats.of(ours(np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)))
  ref.save(tmp_path / "ref.npz")
  (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\na green triangle\n")
  hook = FidClipEvalHook(
    prompts_file=str(tmp_path / "p.txt"),
    vocab=spm_model,
    encoder=str(tiny_t5_checkpoint[0]),
    inception_weights=str(tmp / "converted"),
    ref=str(tmp_path / "ref.npz"),
    num_steps=2,
    batch_size=4,
  )
  run = tmp_path / "run"
  loop.train(
    model_dir=str(run),
    num_steps=2,
    batch_source=tdata.InMemorySource(shapes16, BATCH),
    model_config=micro,
    optimizer=ADAM,
    ema_decay=EMA,
    log_every=2,
    checkpoint_every=2,
    progress=False,
    compilation_cache_dir=None,
    eval_every=2,
    eval_hook=hook,
  )
  (line,) = [json.loads(x) for x in (run / "eval" / "fid_clip.jsonl").read_text().splitlines()]
  ims = hook.last_images
  assert ims.shape == (3, 16, 16, 3)
  assert line["eval/fid"] == pytest.approx(frechet_distance(Stats.of(ours(ims)), ref), rel=1e-5)
