"""The data pipeline: synthetic shapes, sources and bad records, the embedding cache, stage
batches."""

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from imagen_jax import images as imio
from imagen_jax.data import synthetic

# ------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_per_seed():
  a = list(synthetic.examples(seed=3, num_examples=6, resolution=32))
  b = list(synthetic.examples(seed=3, num_examples=6, resolution=32))
  c = list(synthetic.examples(seed=4, num_examples=6, resolution=32))
  assert [x["image"] for x in a] == [x["image"] for x in b]
  assert [x["caption"] for x in a] == [x["caption"] for x in b]
  assert [x["image"] for x in a] != [x["image"] for x in c]
  # An example does not depend on where the enumeration starts.
  assert list(synthetic.examples(3, 2, 32, start=4))[1]["image"] == a[5]["image"]


def test_synthetic_captions_agree_with_ground_truth_and_pixels():
  relations = set()
  for index in range(200):
    scene = synthetic.make_scene(seed=0, index=index)
    gt = scene.ground_truth()
    named = synthetic.parse_caption(scene.caption)
    assert sorted(named) == sorted((o["shape"], o["color"]) for o in gt["objects"]), scene.caption
    relations.add(gt["relation"])
    if gt["relation"] == "left_of":
      first, second = named
      pos = {(o["shape"], o["color"]): o["x"] for o in gt["objects"]}
      if " to the left of " in scene.caption:
        assert pos[first] < pos[second], scene.caption
      else:
        assert " to the right of " in scene.caption and pos[first] > pos[second], scene.caption
    # The rendered image shows each object's colour at its centre, on the recorded background.
    img = synthetic.render(scene, 64)
    for o in gt["objects"]:
      px = img[int(o["y"] * 64), int(o["x"] * 64)]
      np.testing.assert_allclose(px, synthetic.COLORS[o["color"]], atol=2)
    np.testing.assert_allclose(img[1, 1], synthetic.BACKGROUNDS[gt["background"]], atol=2)
  assert relations == {"count", "left_of", "list"}
  assert {len(synthetic.make_scene(0, i).objects) for i in range(200)} == {1, 2, 3, 4}


def test_synthetic_renders_crisp_at_1024():
  scene = synthetic.make_scene(1, 0)
  img = synthetic.render(scene, 1024)
  assert img.shape == (1024, 1024, 3)
  o = scene.objects[0]
  # Inside the object: flat colour, not blurred; the edge is at most a couple of pixels wide.
  cy, cx, r = int(o.y * 1024), int(o.x * 1024), int(o.size * 1024)
  patch = img[cy - r // 3 : cy + r // 3, cx - r // 3 : cx + r // 3]
  assert np.all(patch == np.asarray(synthetic.COLORS[o.color], np.uint8))
  row = img[cy, :, :].astype(int)
  changes = np.abs(np.diff(row, axis=0)).sum(1) > 0
  assert changes.sum() <= 4 * len([p for p in scene.objects if abs(p.y - o.y) < p.size]) + 4


# ---------------------------------------------------------------------------------------- sources


def _png(arr, mode=None):
  buf = io.BytesIO()
  img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
  img.save(buf, format="PNG" if (mode or "RGB") != "CMYK" else "JPEG")
  return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path):
  rng = np.random.default_rng(0)
  rgb = lambda s=40: rng.integers(0, 255, (s, s + 8, 3), dtype=np.uint8)
  files = {
    "a_rgb.png": (_png(rgb()), "a red circle"),
    "b_grey.png": (_png(rgb(), "L"), "a grey square"),
    "c_rgba.png": (_png(rgb(), "RGBA"), "a blue triangle"),
    "d_cmyk.jpg": (_png(rgb(), "CMYK"), "two green circles"),
    "e_palette.png": (_png(rgb(), "P"), "a yellow square"),
    "f_corrupt.png": (_png(rgb())[:60], "truncated bytes"),
    "g_garbage.jpg": (b"this is not an image at all", "garbage"),
    "h_tiny.png": (_png(rgb(8)[:8, :8]), "a tiny image"),
    "i_nocaption.png": (_png(rgb()), None),
    "j_empty.png": (_png(rgb()), "   "),
  }
  for name, (data, caption) in files.items():
    (tmp_path / name).write_bytes(data)
    if caption is not None:
      (tmp_path / name).with_suffix(".txt").write_text(caption)
  return tmp_path


def test_folder_with_bad_files_reads_the_rest_and_counts_reasons(messy_folder):
  from imagen_jax.data import sources

  stats = sources.SourceStats()
  out = list(
    sources.clean_records(
      sources.folder_records(messy_folder), stats, image_size=32, check_after=100
    )
  )
  assert [r["key"] for r in out] == [
    "a_rgb.png",
    "b_grey.png",
    "c_rgba.png",
    "d_cmyk.jpg",
    "e_palette.png",
  ]
  assert stats.seen == 10 and stats.kept == 5
  assert dict(stats.skipped) == {
    "corrupt_image": 2,
    "image_too_small": 1,
    "missing_or_empty_caption": 2,
  }
  assert dict(stats.converted) == {"L": 1, "RGBA": 1, "CMYK": 1, "P": 1}
  for r in out:
    img = Image.open(io.BytesIO(r["image"]))
    assert img.mode == "RGB" and img.size == (32, 32)
  assert "corrupt_image=2" in stats.summary()


def test_mostly_bad_source_fails_clearly(tmp_path):
  from imagen_jax.data import sources

  for i in range(10):
    (tmp_path / f"{i}.png").write_bytes(b"broken")
    (tmp_path / f"{i}.txt").write_text("caption")
  with pytest.raises(sources.DataError, match="more than 50% of the records are bad"):
    list(
      sources.clean_records(sources.folder_records(tmp_path), sources.SourceStats(), check_after=5)
    )
  with pytest.raises(sources.DataError, match="image folder not found"):
    list(sources.folder_records(tmp_path / "missing"))


def test_jsonl_source(tmp_path):
  from imagen_jax.data import sources

  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "x.png").write_bytes(_png(np.zeros((20, 20, 3), np.uint8)))
  lines = [
    json.dumps({"image": "img/x.png", "caption": "a black square"}),
    "{not json",
    json.dumps({"image": "img/missing.png", "caption": "gone"}),
    json.dumps({"caption": "no image key"}),
  ]
  (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  stats = sources.SourceStats()
  out = list(
    sources.clean_records(
      sources.jsonl_records(tmp_path / "pairs.jsonl"), stats, check_after=100, max_bad_fraction=1.0
    )
  )
  assert [r["caption"] for r in out] == ["a black square"]
  assert dict(stats.skipped) == {"malformed_record": 2, "missing_image": 1}


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds

  from imagen_jax.data import sources

  class TinyCaptionsForTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        img = np.full((24, 24, 3), 40 * i, np.uint8)
        yield i, {"image": img, "captions": {"text": [f"caption {i} a", f"caption {i} b"]}}

  TinyCaptionsForTest(data_dir=str(tmp_path)).download_and_prepare()
  first = list(sources.tfds_records("tiny_captions_for_test", "train", data_dir=str(tmp_path)))
  assert sorted(r["caption"].decode() for r in first) == [
    "caption 0 a",
    "caption 1 a",
    "caption 2 a",
  ]
  every = list(
    sources.tfds_records(
      "tiny_captions_for_test", "train", all_captions=True, data_dir=str(tmp_path)
    )
  )
  assert len(every) == 6
  stats = sources.SourceStats()
  clean = list(sources.clean_records(every, stats, image_size=16))
  assert stats.kept == 6 and Image.open(io.BytesIO(clean[0]["image"])).size == (16, 16)
  with pytest.raises(sources.DataError, match="feature 'captions/txt' not found"):
    list(
      sources.tfds_records(
        "tiny_captions_for_test", "train", caption_field="captions/txt", data_dir=str(tmp_path)
      )
    )


# ----------------------------------------------------------------------------------- the cache


def assert_bf16_of(got, ref_f32):
  """got (bfloat16) is ref_f32 cast to bfloat16, up to 1-ulp flips on < 0.1% of the values: the
  float32 encoder outputs of differently composed batches differ in the last bits (XLA blocking),
  and a value on a bfloat16 rounding boundary may round either way."""
  import ml_dtypes

  expect = ref_f32.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int64)
  ulps = np.abs(got.view(np.uint16).astype(np.int64) - expect)
  assert ulps.max() <= 1, ulps.max()
  assert (ulps > 0).mean() < 1e-3, (ulps > 0).mean()


def _register(name, spm_model, n=24, size=32, seed=0):
  from imagen_jax.data import tasks

  return tasks.register_source_task(
    name, "synthetic", spm_model, image_size=size, seed=seed, num_examples=n
  )


def _read_cache(cache_dir, spm_model, name):
  from imagen_jax.data import tasks

  task = tasks.register_cached_task(name, str(cache_dir), spm_model)
  return list(
    task.get_dataset(split="train", shuffle=False, sequence_length=None).as_numpy_iterator()
  )


def test_cache_round_trip(tmp_path, spm_model, tiny_t5_checkpoint):
  import ml_dtypes

  from imagen_jax.data import cache
  from imagen_jax.text.encoder import TextEncoder
  from imagen_jax.text.tokenizer import Tokenizer

  t5_dir, config, params = tiny_t5_checkpoint
  _register("rt_source", spm_model)
  summary = cache.cache_embeddings(
    "rt_source",
    str(tmp_path / "cache"),
    str(t5_dir),
    num_shards=3,
    batch_size=8,
    max_length=12,
    progress=False,
  )
  assert summary.examples == 24 and summary.shards_written == 3 and summary.bad_records == 0
  records = _read_cache(tmp_path / "cache", spm_model, "rt_cached")
  assert sorted(r["key"].decode() for r in records) == sorted(f"synthetic-0-{i}" for i in range(24))
  # Independently: tokenize each caption and run the encoder; the cache must hold exactly that, in
  # bf16.
  tok = Tokenizer(spm_model, max_length=12, use_seqio=False)
  enc = TextEncoder(config, params, batch_size=8)
  captions = [r["caption"].decode() for r in records]
  ref = tok(captions)
  ref_emb, ref_mask = enc.encode(ref.tokens)
  got_tokens = np.stack([r["tokens"] for r in records])
  np.testing.assert_array_equal(got_tokens, ref.tokens)
  np.testing.assert_array_equal(np.stack([r["text_mask"] for r in records]), ref_mask)
  got_emb = np.stack([r["text_emb"] for r in records])
  assert got_emb.dtype == ml_dtypes.bfloat16 and got_emb.shape == (24, 12, config.d_model)
  assert_bf16_of(got_emb, np.where(ref_mask[..., None], ref_emb, 0))
  assert summary.truncated == int(ref.stats.truncated) and summary.tokens == int(ref.lengths.sum())
  # Images are the synthetic renders, PNG at the cache resolution.
  by_key = {r["key"].decode(): r for r in records}
  ex = next(synthetic.examples(0, 1, 32))
  first = by_key["synthetic-0-0"]
  assert first["image"] == ex["image"] and first["caption"].decode() == ex["caption"]
  assert json.loads(first["ground_truth"]) == json.loads(ex["ground_truth"])


def test_resuming_a_half_written_cache_gives_the_same_records(
  tmp_path, spm_model, tiny_t5_checkpoint
):
  from imagen_jax.data import cache

  t5_dir, _, _ = tiny_t5_checkpoint
  _register("resume_source", spm_model, n=20)
  kw = dict(num_shards=4, batch_size=4, max_length=12, progress=False)
  full = cache.cache_embeddings("resume_source", str(tmp_path / "full"), str(t5_dir), **kw)
  part = cache.cache_embeddings(
    "resume_source", str(tmp_path / "part"), str(t5_dir), stop_after_shards=2, **kw
  )
  assert part.shards_written == 2
  # A crash in the middle of shard 2 leaves an incomplete file behind.
  incomplete = cache.shard_path(tmp_path / "part", "train", 2, 4)
  incomplete.with_name(incomplete.name + ".incomplete").write_bytes(b"partial garbage")
  resumed = cache.cache_embeddings("resume_source", str(tmp_path / "part"), str(t5_dir), **kw)
  assert resumed.shards_skipped == 2 and resumed.shards_written == 2
  assert (resumed.examples, resumed.tokens) == (full.examples, full.tokens)
  for i in range(4):
    a = cache.shard_path(tmp_path / "full", "train", i, 4).read_bytes()
    b = cache.shard_path(tmp_path / "part", "train", i, 4).read_bytes()
    assert a == b, f"shard {i} differs"
  # Settings that differ from the cache's are refused rather than mixed in.
  from imagen_jax.data.sources import DataError

  with pytest.raises(DataError, match="max_length: 12 -> 16"):
    cache.cache_embeddings(
      "resume_source",
      str(tmp_path / "part"),
      str(t5_dir),
      num_shards=4,
      max_length=16,
      progress=False,
    )


# --------------------------------------------------------------------------------- stage batches


@pytest.fixture(scope="module")
def cached_task(tmp_path_factory, spm_model, tiny_t5_checkpoint):
  from imagen_jax.data import cache, tasks

  t5_dir, _, _ = tiny_t5_checkpoint
  out = tmp_path_factory.mktemp("stage_cache")
  _register("stage_source", spm_model, n=24, size=64)
  cache.cache_embeddings(
    "stage_source", str(out), str(t5_dir), num_shards=2, batch_size=8, max_length=12, progress=False
  )
  tasks.register_cached_task("stage_cached", str(out), spm_model)
  return "stage_cached", out


def test_sr_batches_lowres_is_the_downsampled_target(cached_task):
  from imagen_jax.data import pipeline

  name, _ = cached_task
  cfg = pipeline.StageDataConfig(image_size=32, lowres_size=8, batch_size=4, shuffle_buffer=8)
  batch = next(pipeline.StageIterator(pipeline.stage_dataset(name, cfg)))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["lowres"].shape == (4, 8, 8, 3)
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  # The one down-sampler of the cascade (antialiased bicubic, as the base stage's targets are made),
  # not a box filter: an SR stage trains on the kind of image a base stage draws.
  low = np.clip(imio.downsample(batch["image"], 8), -1.0, 1.0)
  np.testing.assert_allclose(batch["lowres"], low, atol=1e-4)
  assert np.abs(batch["lowres"] - pipeline.box_downsample(batch["image"], 4)).max() > 0.02
  assert batch["text_emb"].shape == (4, 12, 32) and batch["text_mask"].shape == (4, 12)


def test_crop_training_batches_line_up(cached_task):
  from imagen_jax.data import pipeline

  name, _ = cached_task
  # 256->1024 style at toy scale: 32-pixel crops of 64-pixel images, with their 8-pixel conditioning
  # crops.
  cfg = pipeline.StageDataConfig(
    image_size=32, lowres_size=8, full_size=64, batch_size=8, shuffle_buffer=1
  )
  batch = next(pipeline.StageIterator(pipeline.stage_dataset(name, cfg)))
  # The crops come from different places, and each is a crop of the full image at a multiple of 4
  # whose conditioning image is the same crop of the full image's downsample.
  full_cfg = pipeline.StageDataConfig(image_size=64, batch_size=8, shuffle_buffer=1)
  full = next(pipeline.StageIterator(pipeline.stage_dataset(name, full_cfg)))["image"]
  low_full = np.clip(imio.downsample(full, 16), -1.0, 1.0)
  offsets = set()
  for i in range(8):
    hits = [
      (y, x)
      for y in range(0, 33, 4)
      for x in range(0, 33, 4)
      if np.allclose(full[i, y : y + 32, x : x + 32], batch["image"][i], atol=1e-5)
    ]
    assert hits, f"example {i} is not an aligned crop"
    y, x = hits[0]
    np.testing.assert_allclose(
      batch["lowres"][i], low_full[i, y // 4 : y // 4 + 8, x // 4 : x // 4 + 8], atol=1e-4
    )
    offsets.add(hits[0])
  assert len(offsets) > 1


def test_iterator_state_restores_in_a_fresh_process(cached_task, spm_model, tmp_path):
  from imagen_jax.data import pipeline

  name, cache_dir = cached_task
  cfg = pipeline.StageDataConfig(
    image_size=32, lowres_size=8, batch_size=4, shuffle_buffer=16, seed=7
  )
  it = pipeline.StageIterator(pipeline.stage_dataset(name, cfg))
  for _ in range(3):
    next(it)
  it.save(tmp_path / "iter")
  expected = next(it)
  script = textwrap.dedent(f"""
      import numpy as np
      from imagen_jax.data import pipeline, tasks
      tasks.register_cached_task({name!r}, {str(cache_dir)!r}, {spm_model!r})
      cfg = pipeline.StageDataConfig(image_size=32, lowres_size=8, batch_size=4, shuffle_buffer=16,
                                     seed=7)
      it = pipeline.StageIterator(pipeline.stage_dataset({name!r}, cfg))
      it.restore({str(tmp_path / "iter")!r})
      b = next(it)
      np.savez({str(tmp_path / "next.npz")!r}, image=b["image"], lowres=b["lowres"],
               text_emb=b["text_emb"].astype(np.float32), key=b["key"].astype(str))
  """)
  res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  got = np.load(tmp_path / "next.npz")
  np.testing.assert_array_equal(got["key"], expected["key"].astype(str))
  np.testing.assert_array_equal(got["image"], expected["image"])
  np.testing.assert_array_equal(got["lowres"], expected["lowres"])
  np.testing.assert_array_equal(got["text_emb"], expected["text_emb"].astype(np.float32))


def test_on_the_fly_batches_match_the_cache(cached_task, spm_model, tiny_t5_checkpoint):
  from imagen_jax.data import pipeline
  from imagen_jax.text.encoder import TextEncoder

  name, _ = cached_task
  _, config, params = tiny_t5_checkpoint
  cached = next(
    pipeline.StageIterator(
      pipeline.stage_dataset(
        name, pipeline.StageDataConfig(image_size=32, batch_size=24, shuffle_buffer=1)
      )
    )
  )
  fly = next(
    pipeline.StageIterator(
      pipeline.stage_dataset(
        "stage_source",
        pipeline.StageDataConfig(
          image_size=32, batch_size=24, shuffle_buffer=1, max_length=12, embeddings="on_the_fly"
        ),
      )
    )
  )
  assert "text_emb" not in fly
  order = {k: i for i, k in enumerate(fly["key"])}
  idx = [order[k] for k in cached["key"]]
  np.testing.assert_array_equal(fly["text_mask"][idx], cached["text_mask"])
  np.testing.assert_allclose(fly["image"][idx], cached["image"], atol=1e-6)
  emb, _ = TextEncoder(config, params, batch_size=24).encode(fly["tokens"][idx])
  assert_bf16_of(cached["text_emb"], np.where(cached["text_mask"][..., None], emb, 0))


def test_cache_embeddings_cli(tmp_path, spm_model, tiny_t5_checkpoint, capsys):
  from imagen_jax import cli

  t5_dir, _, _ = tiny_t5_checkpoint
  argv = [
    "cache-embeddings",
    "--gin_file",
    "runs/cache_synthetic.gin",
    f"--gin.VOCAB='{spm_model}'",
    f"--gin.ENCODER='{t5_dir}'",
    f"--gin.CACHE_DIR='{tmp_path / 'c'}'",
    "--gin.IMAGE_SIZE=32",
    "--gin.MAX_LENGTH=12",
    "--gin.register_source_task.num_examples=10",
    "--gin.cache_embeddings.num_shards=2",
    "--gin.cache_embeddings.batch_size=8",
    "--gin.TASK='cli_synthetic'",
  ]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "examples=10" in out and "shards written=2" in out
  assert cli.main(argv) == 0  # resumed: nothing left to do
  assert "skipped=2" in capsys.readouterr().out
  assert (
    cli.main(["cache-embeddings", "--gin_file", "runs/cache_synthetic.gin"]) == 2
  )  # required macros unset
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("imagen-jax: error:")


def test_each_host_reads_its_own_part(cached_task):
  from imagen_jax.data import pipeline

  name, _ = cached_task
  keys = []
  for host in range(2):
    cfg = pipeline.StageDataConfig(image_size=32, batch_size=4, shuffle_buffer=4, seed=1)
    ds = pipeline.stage_dataset(name, cfg, process_index=host, process_count=2, num_epochs=1)
    keys.append({k for b in ds.as_numpy_iterator() for k in b["key"]})
  assert keys[0] and keys[1] and not keys[0] & keys[1]
  assert (
    len(keys[0] | keys[1]) >= 20
  )  # 24 records over 2 files; drop_remainder may drop < 2 per host


def test_stages_skip_and_count_sources_smaller_than_their_output(
  tmp_path, spm_model, tiny_t5_checkpoint, capsys
):
  from imagen_jax.data import cache, pipeline, tasks
  from imagen_jax.train.data import TaskSource

  # Sources with shorter sides 20, 40 and 80 px, cached at 32 px: a 32 px stage must not train on
  # the 20 px ones (upscaled, they would teach blur), a 64 px stage on neither 20 nor 40.
  rng = np.random.default_rng(1)
  folder = tmp_path / "imgs"
  folder.mkdir()
  sizes = [20, 40, 80] * 4
  for i, s in enumerate(sizes):
    (folder / f"{i:02d}.png").write_bytes(_png(rng.integers(0, 255, (s, s + 5, 3), np.uint8)))
    (folder / f"{i:02d}.txt").write_text(f"a red circle number {i}")
  tasks.register_source_task("sized_source", "folder", spm_model, image_size=32, path=str(folder))
  t5_dir, _, _ = tiny_t5_checkpoint
  out = tmp_path / "cache"
  cache.cache_embeddings(
    "sized_source", str(out), str(t5_dir), num_shards=2, batch_size=4, max_length=12, progress=False
  )
  assert tasks.source_size_counts(out) == {20: 4, 40: 4, 80: 4}
  tasks.register_cached_task("sized_cached", str(out), spm_model)

  def keys(**kw):
    cfg = pipeline.StageDataConfig(batch_size=1, shuffle_buffer=1, **kw)
    ds = pipeline.stage_dataset("sized_cached", cfg, num_epochs=1)
    return sorted(int(b["key"][0].decode()[:2]) for b in ds.as_numpy_iterator())

  by_size = lambda *keep: sorted(i for i, s in enumerate(sizes) if s in keep)
  assert keys(image_size=32) == by_size(40, 80)  # default floor: the stage's output size
  assert keys(image_size=16, lowres_size=8, full_size=64) == by_size(80)  # crops: the full size
  assert keys(image_size=32, min_source_size=0) == by_size(20, 40, 80)
  assert keys(image_size=32, min_source_size=50) == by_size(80)
  # Counted per reason, like every other skip, and said when the trainer opens the data.
  cfg = pipeline.StageDataConfig(image_size=32, batch_size=2, shuffle_buffer=1)
  source = TaskSource("sized_cached", cfg, process_index=0, process_count=1)
  assert source.skips == {
    "records": 12,
    "kept": 8,
    "skipped_by_reason": {"source_smaller_than_32px": 4},
  }
  assert "data: 8 of 12 cached records used; skipped: source_smaller_than_32px=4" in (
    capsys.readouterr().out
  )
